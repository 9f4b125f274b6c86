"""Context parallelism for attention: sequence layouts, all-gather attention, and the global-array dispatcher.

Layouts are data-pipeline permutations, applied once per batch to every per-token array (inputs, targets,
positions, segment ids, loss mask) before the batch is sharded contiguously over the context axis; the kernels see
positions only (``lcjax.ops.masks``), so they never need to know the layout:

==========  ===============================================  ========================  ===========
layout      device r holds (n devices, T = L/n, c = L/2n)    load balance (causal)      needs
==========  ===============================================  ========================  ===========
contiguous  tokens ``[rT, (r+1)T)``                          device n-1 does ~2x mean   L % n == 0
zigzag      chunks ``r`` and ``2n-1-r`` of length c          exact (max/mean = 1)       L % 2n == 0
striped     tokens ``r, r+n, r+2n, ...``                     1 + (n-1)/(L+1)            L % n == 0
==========  ===============================================  ========================  ===========

Zigzag is the DualChunkSwap of Llama-3 context parallelism (zhuzilin/ring-flash-attention
``test/test_zigzag_ring_flash_attn_func.py::extract_local``, MaxText ``max_utils.reorder_sequence``); striped is
"Striped Attention", Brandon et al. 2023, https://arxiv.org/abs/2311.09431. Outputs and the loss stay in the
permuted order during training; ``undo_layout`` restores the original order for evaluation. Recurrent blocks are
not layout-agnostic: context-parallel Mamba-2 (``lcjax.ops.ssd_context_parallel``) passes the state from device
r-1 to device r, so models with such blocks must use the contiguous layout.

Two context-parallel attention strategies with the same signature, both called inside ``jax.shard_map``:

* ``ring_attention`` (``lcjax.ops.ring_attention``): K/V blocks travel around the ring; per-device memory O(L/n)
  in the forward and backward pass. Needed when the gathered K/V of a layer no longer fit one device.
* ``allgather_attention`` (here): Q stays sharded, K/V (at ``kv_heads``, with positions and segment ids) are
  all-gathered once, dK/dV are reduce-scattered by the all-gather's transpose. One collective instead of n - 1
  latency-bound hops, and one large kernel call, so it wins at moderate lengths and with GQA, where K/V are small:
  the gather moves ``2·B·L·K·P`` values against ``4·B·L²·H·P/n`` attention FLOPs, an intensity of
  ``L·H/(K·n)`` (MaxText sharding guide; MaxText v5p: all-gather 52.9% MFU vs ring 28.5% at 32K, cp=16, while only
  ring fits at 1M). Its cost is O(L) K/V memory per device (saved for the backward pass).

``context_parallel_attention`` is the global-array entry point used by the Attention layer: ``shard_map`` over the
active mesh with the sequence on ``act_seq``; without a mesh (or a context axis of size 1) it runs on one device.

Dimension key (lcjax/typing.py): B batch, L length (local inside shard_map), S key length, H heads, K kv heads,
P head dim.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax import sharding
from lcjax.checks import require, require_int, validated_by
from lcjax.ops import masks
from lcjax.ops._common import AxisName, check_axis_name, check_context_attention, context_axis_name
from lcjax.ops.attention_blockwise import blockwise_attention
from lcjax.ops.ring_attention import ring_attention, tile_sizes
from lcjax.typing import Array, ArrayLike, Float, Int

__all__ = [
    "Layout", "Strategy", "permutation", "inverse_permutation", "apply_layout", "undo_layout", "allgather_attention",
    "context_parallel_attention", "ring_work", "pair_work",
]  # fmt: skip


class Layout(enum.StrEnum):
    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"
    STRIPED = "striped"


class Strategy(enum.StrEnum):
    RING = "ring"
    ALLGATHER = "allgather"


# ---- layouts ---------------------------------------------------------------------------------------------------
def _layout(layout) -> Layout:
    require(layout in tuple(Layout), f"layout must be one of {[m.value for m in Layout]}, got {layout!r}")
    return Layout(layout)


def permutation(length: int, n: int, layout: Layout | str) -> np.ndarray:
    """``perm[p]`` = original index of the token at new position ``p`` (int32 ``[length]``).

    Apply with ``x_new = x[:, perm]`` and shard the result contiguously over ``n`` devices. Examples, L=16, n=4:
    zigzag ``[0,1,14,15 | 2,3,12,13 | 4,5,10,11 | 6,7,8,9]``, striped ``[0,4,8,12 | 1,5,9,13 | ...]``.
    """
    layout = _layout(layout)
    length, n = require_int("permutation: length", length, min=1), require_int("permutation: n", n, min=1)
    need = 2 * n if layout is Layout.ZIGZAG else n
    require(length % need == 0, f"sequence length {length} must be divisible by {need} for layout={layout.value!r} "
                                f"with context size n={n}" + (" (zigzag uses 2n chunks)" if need == 2 * n else ""))
    if layout is Layout.CONTIGUOUS:
        return np.arange(length, dtype=np.int32)
    if layout is Layout.STRIPED:
        return np.arange(length, dtype=np.int32).reshape(length // n, n).T.reshape(-1)
    c = length // (2 * n)
    chunks = np.arange(length, dtype=np.int32).reshape(2 * n, c)
    order = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)  # r, 2n-1-r for each device
    return chunks[order].reshape(-1)


def inverse_permutation(length: int, n: int, layout: Layout | str) -> np.ndarray:
    """``inv[o]`` = new position of original token ``o``: ``x == x_new[:, inv]``."""
    return np.argsort(permutation(length, n, layout)).astype(np.int32)


def _take(x, index, axis):
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return jnp.take(x, jnp.asarray(index), axis=axis)


def apply_layout(batch: Mapping[str, object], *, n: int, layout: Layout | str, axis: int = 1) -> dict:
    """Permute every per-token array of a batch dict along ``axis`` (the length axis) into ``layout``.

    For the data pipeline, before the batch is put on the devices: all values must have the same length on
    ``axis`` (``inputs, targets, loss_mask, segment_ids, positions, ...``). If ``positions`` is missing it is added
    first (0, 1, ... restarting at every change of ``segment_ids``, as ``LM`` would compute from the unpermuted
    sequence), because positions computed after the permutation would be wrong. numpy in, numpy out; jax arrays
    must not be sharded along ``axis`` (use ``undo_layout`` on host or replicated data).
    """
    require(isinstance(batch, Mapping) and bool(batch),
            f"batch must be a non-empty mapping of per-token arrays, got {type(batch).__name__}")  # fmt: skip
    for key, x in batch.items():
        _require_length_axis(f"batch[{key!r}]", x, axis)
    lengths = {key: x.shape[axis] for key, x in batch.items()}
    require(len(set(lengths.values())) == 1, f"every batch array needs the same length on axis {axis}, got {lengths}")
    length = next(iter(lengths.values()))
    perm = permutation(int(length), n, layout)
    out = dict(batch)
    if "positions" not in out:
        ref = next(iter(batch.values()))
        shape = ref.shape[: axis + 1]
        if "segment_ids" in batch:
            out["positions"] = _positions_from_segments(np.asarray(batch["segment_ids"]), axis)
        else:
            out["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
    return {key: _take(x, perm, axis) for key, x in out.items()}


def _require_length_axis(name: str, x, axis: int) -> None:
    require(hasattr(x, "shape") and len(x.shape) > axis,
            f"{name} must be an array with a length axis {axis}, got {getattr(x, 'shape', x)}")  # fmt: skip


def _positions_from_segments(seg: np.ndarray, axis: int) -> np.ndarray:
    """0, 1, ... along ``axis``, restarting wherever the segment id changes (numpy)."""
    seg = np.moveaxis(seg, axis, -1)
    idx = np.arange(seg.shape[-1])
    start = np.concatenate([np.ones(seg.shape[:-1] + (1,), bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    last_start = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
    return np.moveaxis((idx - last_start).astype(np.int32), -1, axis)


def undo_layout(x, *, n: int, layout: Layout | str, axis: int = 1):
    """Back to the original token order: the inverse of ``apply_layout`` for one array (outputs, logits)."""
    _require_length_axis("x", x, axis)
    return _take(x, inverse_permutation(int(x.shape[axis]), n, layout), axis)


# ---- all-gather attention ----------------------------------------------------------------------------------------
def _check_allgather(q, k, v, *, axis_name=None, **kw) -> None:
    check_axis_name("allgather_attention", axis_name)
    check_context_attention(q, k, v, **kw)


@validated_by(_check_allgather)
def allgather_attention(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    *,
    axis_name: AxisName,
    q_positions: Int[Array, "B L"],
    kv_positions: Int[Array, "B S"],
    q_segment_ids: Int[Array, "B L"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Attention of the local queries against the K/V of every device, gathered once (same contract as
    ``ring_attention``; call inside ``jax.shard_map``).

    K, V (at ``kv_heads``), kv positions and kv segment ids are ``lax.all_gather``-ed along ``axis_name`` (in
    device order; the mask uses positions, so the gathered order does not matter), then one blockwise flash
    attention runs with its custom VJP; the gradient of the gather reduce-scatters dK/dV back to their owners.
    Tiles default to ``default_block`` of the local lengths, so they line up with zigzag chunks for skipping.
    """
    qs, ks, scale = check_context_attention(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)
    bq, bk = tile_sizes(q.shape[1], k.shape[1], block_q, block_kv)
    kp = kv_positions.astype(jnp.int32)
    if axis_name is not None:
        gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
        k, v, kp = gather(k), gather(v), gather(kp)
        ks = None if ks is None else gather(ks)
    return blockwise_attention(q, k, v, causal=causal, q_segment_ids=qs, kv_segment_ids=ks,
                               q_positions=q_positions.astype(jnp.int32), kv_positions=kp, window=window,
                               scale=scale, return_lse=return_lse, block_q=bq, block_kv=bk)


# ---- global-array dispatcher ---------------------------------------------------------------------------------------
def _check_dispatch(q, k, v, *, strategy=Strategy.RING, **kw) -> None:
    """Checks of ``context_parallel_attention`` (ValueError), run before its runtime type check."""
    require(strategy in tuple(Strategy), f"strategy must be one of {[s.value for s in Strategy]}, got {strategy!r}")
    check_context_attention(q, k, v, **kw)
    n = sharding.axis_size("act_seq")
    for name, x in (("q", q), ("k", k)):
        require(x.shape[1] % n == 0, f"{name} sequence length {x.shape[1]} must be divisible by the context-parallel "
                                     f"size {n} (mesh axes {sharding.mesh_axes('act_seq')} of act_seq)")  # fmt: skip


@validated_by(_check_dispatch)
def context_parallel_attention(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    *,
    q_positions: Int[Array, "B L"],
    kv_positions: Int[Array, "B S"],
    q_segment_ids: Int[Array, "B L"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    strategy: Strategy | str = Strategy.RING,
    return_lse: bool = False,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Attention on global arrays whose sequence axis is sharded over the mesh axes of ``act_seq``.

    ``sharding.shard_map`` over the active mesh: q, k, v, positions and segment ids are split on ``act_seq``
    (batch on ``act_batch``, heads on ``act_heads`` / ``act_kv_heads``), and ``strategy`` (``"ring"`` or
    ``"allgather"``) runs on the local shards. Without a mesh, or with ``act_seq`` unsharded, this is one-device
    blockwise attention. The arrays must already be in the chosen layout (``apply_layout``); L and S must be
    divisible by the context size.
    """
    strategy = Strategy(strategy)
    axis_name = context_axis_name()
    fn = ring_attention if strategy is Strategy.RING else allgather_attention
    has_seg = q_segment_ids is not None

    def local(q, k, v, qp, kp, *seg):
        qs, ks = seg if has_seg else (None, None)
        return fn(q, k, v, axis_name=axis_name, q_positions=qp, kv_positions=kp, q_segment_ids=qs,
                  kv_segment_ids=ks, causal=causal, window=window, scale=scale, return_lse=return_lse,
                  block_q=block_q, block_kv=block_kv)

    q_spec = ("act_batch", "act_seq", "act_heads", None)
    kv_spec = ("act_batch", "act_seq", "act_kv_heads", None)
    tok = ("act_batch", "act_seq")
    args = (q, k, v, q_positions, kv_positions) + ((q_segment_ids, kv_segment_ids) if has_seg else ())
    out_specs = (q_spec, ("act_batch", "act_seq", "act_heads")) if return_lse else q_spec
    return sharding.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, tok, tok) + (tok, tok) * has_seg,
                              out_specs=out_specs)(*args)


# ---- work accounting (load balance) ------------------------------------------------------------------------------
def ring_work(
    q_positions: Int[ArrayLike, "B L"],
    kv_positions: Int[ArrayLike, "B L"],
    q_segment_ids: Int[ArrayLike, "B L"] | None = None,
    kv_segment_ids: Int[ArrayLike, "B L"] | None = None,
    *,
    n: int,
    causal: bool = True,
    window: int | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> np.ndarray:
    """Score tiles each device computes in ``ring_attention``'s forward pass: int ``[n]``.

    Inputs are the global (already permuted) positions / segment ids. Replays the kernel's schedule with its own
    rule: over the n hops device r meets every block once, and each (q tile, kv tile) pair of ``block_q x
    block_kv`` is computed iff ``masks.tile_may_attend`` holds for the tile (tiles from ``default_block`` when None,
    padded at the edge as in the kernel). max/mean of the result is the load imbalance.
    """
    qp, kp = np.asarray(q_positions, np.int32), np.asarray(kv_positions, np.int32)
    qs = np.zeros_like(qp) if q_segment_ids is None else np.asarray(q_segment_ids, np.int32)
    ks = np.zeros_like(kp) if kv_segment_ids is None else np.asarray(kv_segment_ids, np.int32)
    B, L = qp.shape
    require(L % n == 0 and kp.shape[1] % n == 0, f"lengths {L}, {kp.shape[1]} must be divisible by n={n}")
    T, Tk = L // n, kp.shape[1] // n
    bq, bk = tile_sizes(T, Tk, block_q, block_kv)

    def tiles(x, t, b):  # [B, n*t] -> [n, n_tiles, B, b], edge padding as blockwise_fwd
        x = x.reshape(B, n, t).transpose(1, 0, 2)
        x = np.pad(x, [(0, 0), (0, 0), (0, -t % b)], mode="edge")
        return x.reshape(n, B, -1, b).transpose(0, 2, 1, 3)

    may = jax.jit(jax.vmap(lambda a, b_, c, d: masks.tile_may_attend(a, b_, c, d, causal=causal, window=window)))
    flat = lambda *xs: [x.reshape(-1, *x.shape[-2:]) for x in xs]  # noqa: E731
    # tile visibility for every (device r, block j, q tile, kv tile); device r meets every block j once per ring
    qt, qst, kt, kst = tiles(qp, T, bq), tiles(qs, T, bq), tiles(kp, Tk, bk), tiles(ks, Tk, bk)
    nq, nk = qt.shape[1], kt.shape[1]
    a = np.broadcast_to(qt[:, None, :, None], (n, n, nq, nk, B, bq))
    c = np.broadcast_to(qst[:, None, :, None], (n, n, nq, nk, B, bq))
    b_ = np.broadcast_to(kt[None, :, None, :], (n, n, nq, nk, B, bk))
    d = np.broadcast_to(kst[None, :, None, :], (n, n, nq, nk, B, bk))
    tile_visible = np.asarray(may(*flat(a, b_, c, d))).reshape(n, n, nq, nk)
    return tile_visible.sum(axis=(1, 2, 3))


def pair_work(
    positions: Int[ArrayLike, "B L"], segment_ids: Int[ArrayLike, "B L"] | None = None, *, n: int, causal: bool = True,
    window: int | None = None,
) -> np.ndarray:
    """Unmasked (query, key) pairs owned by each device's queries (global permuted inputs): int ``[n]``."""
    pos = jnp.asarray(positions, jnp.int32)
    seg = jnp.zeros_like(pos) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    mask = np.asarray(masks.make_mask(pos, pos, seg, seg, causal=causal, window=window))  # [B, L, L]
    B, L = pos.shape
    return mask.reshape(B, n, L // n, L).sum(axis=(0, 2, 3))
