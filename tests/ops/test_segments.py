"""lcjax.ops.segments: the one meaning of segment ids (check and layout helpers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ops import segments

PIPELINE_ROW = [[1, 1, 2, 2, 2, 3, 0, 0]]  # what lcjax.data writes: documents 1, 2, 3, then padding


def test_layout_helpers_on_the_pipeline_layout():
    ids = jnp.asarray(PIPELINE_ROW + [[5, 5, 5, 5, 0, 0, 9, 9]], jnp.int32)  # padding may sit between documents
    np.testing.assert_array_equal(segments.is_document(ids)[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(segments.run_starts(ids)[0], [1, 0, 1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(segments.document_starts(ids)[1], [1, 0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(segments.document_index(ids)[0, :6], [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(segments.document_index(ids)[1], [0, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(segments.run_offsets(ids)[0], [0, 1, 0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(segments.document_start_positions(ids, 4), [[0, 2, 5, 8], [0, 6, 8, 8]])


def test_check_segment_ids():
    out = segments.check_segment_ids("ids", np.asarray(PIPELINE_ROW, np.int64))
    assert out.dtype == jnp.int32 and out.shape == (1, 8)
    segments.check_segment_ids("ids", jnp.asarray([[1, 1, 0, 2, 0]]))  # padding may recur; documents may not
    segments.check_segment_ids("ids", jnp.asarray([[2, 1, 2]]), ordered=False)  # a permuted (zigzag) row
    jax.jit(lambda s: segments.check_segment_ids("ids", s))(jnp.asarray([[-1, 2, 1, 2]]))  # traced: no value check
    bad = [
        (jnp.asarray([[1, 1, -1]]), "ids: segment ids must be >= 0"),
        (jnp.asarray([[1, 2, 1]]), "ids: row 0 reuses segment id 1 after a different id"),
        (jnp.asarray([[1, 1], [3, 3]], jnp.float32), "ids must be an integer"),
        (jnp.asarray([1, 1, 2]), r"ids must have shape \[batch, length\]"),
    ]
    for ids, message in bad:
        with pytest.raises(ValueError, match=message):
            segments.check_segment_ids("ids", ids)
    with pytest.raises(ValueError, match=r"ids must have shape \(2, 3\)"):
        segments.check_segment_ids("ids", jnp.ones((1, 3), jnp.int32), shape=(2, 3))
