"""Segment ids: the one meaning of packed-document ids in lcjax, and the layout helpers the mixers build on.

Packing several documents into one row (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination", https://arxiv.org/abs/2107.02027) needs a per-token document id. In lcjax it is:

* ``segment_ids`` is an integer ``[B, L]`` array;
* a **document** is a run of positions with the same **positive** id;
* ``0`` (``PADDING``) is padding: it belongs to no document;
* a row never reuses a document id after a different id (the data pipeline writes ``1, 1, 2, 2, 2, 3, 0, 0``), so
  a document is both a run and an id; padding may stand anywhere, also more than once;
* negative ids are rejected at public boundaries (internal cache sentinels, e.g. attention's empty KV slots, are
  not user input);
* ``segment_ids=None`` at the LM means the whole row is one document.

How each mixer reads it (the same documents everywhere): attention lets equal ids attend (``lcjax.ops.masks``), so
documents never see each other, padding sees only padding and real tokens never see padding; Mamba-2 starts a
document wherever the id changes (a padding run is its own run, so no state crosses it); M2 computes every document
as if it were alone and gives padding the output 0 (``lcjax.layers.monarch_mixer.CausalM2Mixer``).

``check_segment_ids`` checks concrete arrays (eager calls, the data pipeline); under a plain ``jax.jit`` the ids are
tracers and only their dtype and shape are checked (as ``lcjax.checks.check_token_ids`` documents for token ids).
Context-parallel layouts (zigzag, striped) permute a row, so its ids are checked before the permutation
(``ordered=False`` skips the reuse rule for an already permuted row).
Dimension key (lcjax/typing.py): B batch, L length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax import checks
from lcjax.typing import Array, Bool, Int

PADDING = 0
"""The segment id of padding (no document)."""


def check_segment_ids(
    name: str, segment_ids: Any, *, shape: tuple[int, ...] | None = None, ordered: bool = True
) -> Int[Array, "B L"]:
    """``segment_ids`` as an int32 ``[B, L]`` array, checked against the definition in the module docstring.

    ``ValueError`` naming ``name`` when the array is not integer, not rank 2 (or not ``shape``), and, when its values
    are concrete, when an id is negative or (``ordered``) a document id is reused in a row after a different id.
    """
    if not hasattr(segment_ids, "dtype") or not hasattr(segment_ids, "shape"):
        segment_ids = np.asarray(segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer [batch, length] array, got dtype {segment_ids.dtype}")
    want = "[batch, length]" if shape is None else f"{tuple(shape)} ([batch, length])"
    if segment_ids.ndim != 2 or (shape is not None and tuple(segment_ids.shape) != tuple(shape)):
        raise ValueError(f"{name} must have shape {want}, got {tuple(segment_ids.shape)}")
    if checks.is_concrete(segment_ids):
        ids = np.asarray(segment_ids)
        if ids.size and ids.min() < 0:
            raise ValueError(f"{name}: segment ids must be >= 0 (0 = padding, 1, 2, ... = documents); got min "
                             f"{ids.min()}")  # fmt: skip
        if ordered:
            _check_no_reuse(name, ids)
    return jnp.asarray(segment_ids, jnp.int32)


def _check_no_reuse(name: str, ids: np.ndarray) -> None:
    starts = np.ones(ids.shape, bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    for b in range(ids.shape[0]):
        runs = ids[b][starts[b] & (ids[b] != PADDING)]
        values, counts = np.unique(runs, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(
                f"{name}: row {b} reuses segment id {values[counts > 1][0]} after a different id; a document is a run "
                "of one positive id and document ids never repeat in a row (e.g. 1, 1, 2, 2, 3, 0, 0)"
            )


def is_document(segment_ids_BL: Int[Array, "B L"]) -> Bool[Array, "B L"]:
    """True on document tokens, False on padding (the padding mask, inverted)."""
    return segment_ids_BL > PADDING


def run_starts(segment_ids_BL: Int[Array, "B L"]) -> Bool[Array, "B L"]:
    """True where a run of equal ids begins (position 0 and every change of id); Mamba-2's document starts."""
    first_B1 = jnp.ones_like(segment_ids_BL[:, :1], dtype=bool)
    return jnp.concatenate([first_B1, segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)


def run_offsets(segment_ids_BL: Int[Array, "B L"]) -> Int[Array, "B L"]:
    """Each token's offset in its run (0 at every run start): positions that restart in every document."""
    L = segment_ids_BL.shape[1]
    idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BL.shape)
    return idx_BL - jax.lax.cummax(jnp.where(run_starts(segment_ids_BL), idx_BL, 0), axis=1)


def document_starts(segment_ids_BL: Int[Array, "B L"]) -> Bool[Array, "B L"]:
    """True on the first token of every document (run starts that are not padding)."""
    return run_starts(segment_ids_BL) & is_document(segment_ids_BL)


def document_index(segment_ids_BL: Int[Array, "B L"]) -> Int[Array, "B L"]:
    """``0, 1, 2, ...``: each token's document number in its row (padding carries the number of the document
    before it, or -1; mask it with ``is_document``)."""
    return jnp.cumsum(document_starts(segment_ids_BL), axis=1, dtype=jnp.int32) - 1


def document_start_positions(segment_ids_BL: Int[Array, "B L"], n: int) -> Int[Array, "B n"]:
    """The start positions of the first ``n`` documents of each row; ``L`` where a row has fewer."""
    L = segment_ids_BL.shape[1]
    return jax.vmap(lambda s: jnp.nonzero(s, size=n, fill_value=L)[0].astype(jnp.int32))(
        document_starts(segment_ids_BL)
    )


__all__ = [
    "PADDING", "check_segment_ids", "document_index", "document_start_positions", "document_starts", "is_document",
    "run_offsets", "run_starts",
]  # fmt: skip
