"""Sequence packing against an independent statement of the rule; streaming == static layout; exact resume."""

import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcjax.data.packing import PackedRows, PackIterDataset, build_row, document_pieces, pack_layout

PAD = 999


def _expected_pieces(docs, L):
    """The rule, stated directly: pairs (t[j], t[j+1]) of each document, cut every L pairs, in document order."""
    pieces = []
    for t in docs:
        x, y = t[:-1], t[1:]
        for s in range(0, len(x), L):
            pieces.append((x[s : s + L], y[s : s + L]))
    return pieces


def _segments(rows, L):
    """The (inputs, targets) of every segment of ``rows`` in order, after checking each row's invariants."""
    out, used = [], []
    for row in rows:
        assert set(row) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for k in ("inputs", "targets", "segment_ids", "positions"):
            assert row[k].dtype == np.int32 and row[k].shape == (L,)
        seg, pos = row["segment_ids"], row["positions"]
        n = int(np.sum(seg > 0))
        assert n > 0 and np.all(seg[:n] > 0) and np.all(seg[n:] == 0), "padding only at the tail"
        np.testing.assert_array_equal(row["loss_mask"], seg > 0)
        assert np.all(row["inputs"][n:] == PAD) and np.all(row["targets"][n:] == PAD) and np.all(pos[n:] == 0)
        assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # contiguous, restarting at 0
            out.append((row["inputs"][idx], row["targets"][idx]))
        used.append(n)
    return out, used


def _stream(docs, L):
    return list(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=L, pad_id=PAD))


def _random_docs(lengths):
    return [np.random.default_rng(n + 7 * i).integers(0, 300, n).astype(np.int32) for i, n in enumerate(lengths)]


docs_strategy = st.lists(st.integers(0, 30), min_size=1, max_size=12).map(_random_docs)


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, L=st.integers(1, 12))
def test_packing_follows_the_rule(docs, L):
    rows = _stream(docs, L)
    got, used = _segments(rows, L)
    want = _expected_pieces(docs, L)
    assert len(got) == len(want)  # nothing dropped, nothing invented
    for (gx, gy), (wx, wy) in zip(got, want):  # targets are the document's own next tokens: no cross-document target
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)
    # next fit: a row is closed only when the next piece does not fit into it
    first_piece = [len(np.flatnonzero(r["segment_ids"] == 1)) for r in rows]
    for r in range(len(rows) - 1):
        assert used[r] + first_piece[r + 1] > L
    # the static layout (eval path) gives the same rows
    static = PackedRows(docs, lambda t: t, seq_len=L, pad_id=PAD)
    assert len(static) == len(rows)
    for i, row in enumerate(rows):
        for k in row:
            np.testing.assert_array_equal(static[i][k], row[k])


@settings(max_examples=15, deadline=None)
@given(docs=docs_strategy, L=st.integers(1, 8))
def test_streaming_packer_resumes_exactly(docs, L):
    rows = _stream(docs, L)
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=L, pad_id=PAD)
    for k in range(len(rows) + 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what grain's orbax handler writes and reads
        fresh = iter(ds)
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(rows) - k
        for a, b in zip(rest, rows[k:]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_pieces_and_layout_by_hand():
    assert document_pieces(0, 4) == [] and document_pieces(1, 4) == []
    assert document_pieces(10, 4) == [(0, 4), (4, 8), (8, 9)]  # 9 pairs: explicit chunks of 4, remainder 1
    assert pack_layout([3, 10, 2, 4], 4) == [[(0, 0, 2)], [(1, 0, 4)], [(1, 4, 8)], [(1, 8, 9), (2, 0, 1)], [(3, 0, 3)]]
    row = build_row([(np.array([5, 6, 7]), 0, 2), (np.array([8, 9]), 0, 1)], 4, PAD)
    np.testing.assert_array_equal(row["inputs"], [5, 6, 8, PAD])
    np.testing.assert_array_equal(row["targets"], [6, 7, 9, PAD])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 0, 0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="seq_len"):
        PackIterDataset(grain.MapDataset.source([np.arange(3)]).to_iter_dataset(), seq_len=0, pad_id=PAD)
    with pytest.raises(ValueError, match="1-D integer"):
        _stream([np.zeros((2, 3), np.int32)], 4)
    with pytest.raises(ValueError, match="seq_len"):
        pack_layout([3], 0)


def test_token_ids_and_arguments_are_checked():
    # ids outside [0, vocab_size) fail where the packer reads the document, naming it (not clamped by the model)
    bad = grain.MapDataset.source([np.array([1, 2, 12])]).to_iter_dataset()
    with pytest.raises(ValueError, match=r"packed document: token ids must be in \[0, vocab_size=10\)"):
        next(iter(PackIterDataset(bad, seq_len=4, pad_id=0, vocab_size=10)))
    with pytest.raises(ValueError, match="packed document"):
        PackedRows([np.array([-1, 2, 3])], lambda d: d, seq_len=4, pad_id=0, vocab_size=10)
    with pytest.raises(ValueError, match="PackIterDataset: pad_id=10"):
        PackIterDataset(bad, seq_len=4, pad_id=10, vocab_size=10)
    with pytest.raises(TypeError, match="PackIterDataset: seq_len"):  # a bool is not an int
        PackIterDataset(bad, seq_len=True, pad_id=0)
    with pytest.raises(TypeError, match="pack_layout: seq_len must be an int"):
        pack_layout([3], False)
