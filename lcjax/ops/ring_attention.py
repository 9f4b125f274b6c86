"""Ring attention: exact attention over a sequence sharded across devices, K/V passed around a ring.

"Ring Attention with Blockwise Transformers for Near-Infinite Context", Liu, Zaharia & Abbeel 2023,
https://arxiv.org/abs/2310.01889. Checked against haoliuhl/ringattention ``ringattention/ringattention_jax.py``
(algorithm) and zhuzilin/ring-flash-attention ``ring_flash_attn/zigzag_ring_flash_attn.py`` (load-balanced
layouts, fp32 dK/dV rings); written from the math, not copied.

Runs inside ``jax.shard_map`` over ``axis_name`` (n devices). Every device holds its local q, k, v shards and the
int32 positions / segment ids of those tokens. At hop ``s`` device ``r`` holds the K/V block of device
``(r - s) mod n``; the block's positions and segment ids travel with it (``lax.ppermute``), so the mask
(``lcjax.ops.masks``: same segment, causal by positions, window by positions) never depends on the layout:
contiguous, zigzag and striped are data-pipeline permutations (``lcjax.ops.context_parallel``).

Forward: the local queries are tiled once; the K/V block travels the ring already tiled. Every (q tile, kv tile)
pair is one online-softmax update of float32 (m, l, o) with the blockwise flash attention's tile kernel
(``lcjax.ops.attention_blockwise``); the state stays tiled across hops and is updated in place, so there is no
per-hop normalise-and-merge. Tiles no query of the tile can see (position / segment-id ranges,
``masks.tile_may_attend``) are skipped with ``lax.cond``, so a fully masked block costs only the range tests
(with zigzag tiles of half a shard, every hop after the first computes exactly half the tiles). The next hop's
``ppermute`` is issued before the current hop's compute, and K/V are not rotated after the last hop (n - 1 hops).

Backward (``jax.custom_vjp``): the residuals are only q, k, v, out, lse and the int32 positions / segment ids, all
O(L/n) per device. K/V travel the ring again; each block's dk/dv float32 accumulator travels with it and gains this
device's contributions (tile gradients recomputed from the global lse, ``delta = rowsum(dO ∘ O) - dlse``); after
n shifts every accumulator is back on its owner, so no final collective is needed. dq accumulates in place. GQA/MQA
never repeats K/V heads (q is viewed as ``[B, T, K, R, P]``), so ring traffic is at ``kv_heads``. Memory per
device: the O(L/n) arrays above plus one in-flight copy of the travelling K/V and dk/dv (double buffering) and
O(block²) tile temporaries.

Per device and hop: 3 ``ppermute`` (k, v, kv_positions) forward, plus kv_segment_ids when segment ids are given;
backward the same plus dk and dv, and one last dk/dv shift home.

Dimension key (lcjax/typing.py): B batch, L local query length, S local key length, H query heads, K kv heads,
P head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.checks import validated_by
from lcjax.ops import masks
from lcjax.ops._common import AxisName, axis_size, check_axis_name, check_context_attention, send_to_next
# The tile kernels of the blockwise flash attention (one (q tile, kv tile) online-softmax update, one tile's
# gradients, the tile mask and the tiling helpers) are shared; the loops around them are ring specific.
from lcjax.ops.attention_blockwise import (
    DEFAULT_BLOCK, _kv_valid_tiles, _tile_bwd, _tile_fwd, _tile_mask, _tiles, _untile,
)  # fmt: skip
from lcjax.typing import Array, Float, Int

__all__ = ["ring_attention", "default_block", "tile_sizes"]

_F32 = jnp.float32


def default_block(length: int, cap: int = DEFAULT_BLOCK) -> int:
    """Tile length for a local shard of ``length`` tokens: the largest divisor of ``length // 2`` that is <= cap.

    Tiles that split each local shard into halves (and smaller) line up with the zigzag chunks, so per-tile
    skipping saves exactly the masked half-blocks; the rule is harmless for contiguous and striped layouts. Falls
    back to ``min(cap, length)`` (padded last tile) when ``length // 2`` has no reasonably large divisor.
    """
    if length < 2 or length % 2:
        return min(cap, length)
    half = length // 2
    best = max(d for d in range(1, min(cap, half) + 1) if half % d == 0)
    return best if best == half or best >= cap // 4 else min(cap, length)


def tile_sizes(L: int, S: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    """Tile lengths for local query / key lengths L, S: the given ones (capped at the length) or ``default_block``."""
    bq = default_block(L) if block_q is None else min(block_q, L)
    bk = default_block(S) if block_kv is None else min(block_kv, S)
    return bq, bk


def _check_call(q, k, v, *, axis_name=None, **kw) -> None:
    check_axis_name("ring_attention", axis_name)
    check_context_attention(q, k, v, **kw)


# ---- tiled layout shared by the forward and backward ring ----------------------------------------------------------
# The local queries are tiled once ([nq, B, bq, ...]) and the K/V block travels the ring already tiled
# ([nk, B, bk, ...]), so no hop re-tiles anything. The online-softmax state (m, l, o) and the dq / dk / dv float32
# accumulators stay in the tiled layout across hops and are updated in place (``.at[i].set``), one buffer each.
class _Tiling(NamedTuple):
    B: int
    L: int
    S: int
    K: int
    R: int
    P: int
    bq: int
    bk: int
    nq: int
    nk: int
    valid: Array | None  # [nk, bk] real keys (None when S is a multiple of bk)


def _tiling(q, k, bq, bk) -> _Tiling:
    B, L, H, P = q.shape
    S, K = k.shape[1], k.shape[2]
    return _Tiling(B, L, S, K, H // K, P, bq, bk, -(-L // bq), -(-S // bk), _kv_valid_tiles(S, bk))


def _kv_tiles(t: _Tiling, k, v, kp, ks):
    """The travelling block: k, v ``[nk, B, bk, K, P]``, positions (and segment ids) ``[nk, B, bk]``."""
    kv = (_tiles(k, t.bk), _tiles(v, t.bk), _tiles(kp, t.bk, edge=True))  # edge: min/max stay in range
    return kv if ks is None else kv + (_tiles(ks, t.bk, edge=True),)


# ---- forward ---------------------------------------------------------------------------------------------------------
def _ring_fwd_impl(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk):
    t = _tiling(q, k, bq, bk)
    n = axis_size(axis_name)
    ring_seg = qs is not None  # without segment ids every token is in segment 0: nothing to send
    qs_ = qs if ring_seg else jnp.zeros(qp.shape, jnp.int32)
    q_t = _tiles(q.reshape(t.B, t.L, t.K, t.R, t.P), bq)
    qp_t, qs_t = _tiles(qp, bq, edge=True), _tiles(qs_, bq, edge=True)
    ks0_t = None if ring_seg else _tiles(jnp.zeros(kp.shape, jnp.int32), bk, edge=True)
    kv_block = lambda kv: (*kv[:3], kv[3] if ring_seg else ks0_t)  # noqa: E731

    def hop(state, kv):
        k_t, v_t, kp_t, ks_t = kv_block(kv)

        def q_tile(i, state):
            m, l_, o = state
            q_i, qp_i, qs_i = q_t[i], qp_t[i], qs_t[i]

            def kv_step(c, j):
                def compute(c):
                    mask = _tile_mask(qp_i, kp_t[j], qs_i, ks_t[j], None if t.valid is None else t.valid[j], causal,
                                      window)  # fmt: skip
                    return _tile_fwd(c, q_i, k_t[j], v_t[j], mask, scale)

                visible = masks.tile_may_attend(qp_i, kp_t[j], qs_i, ks_t[j], causal=causal, window=window)
                return lax.cond(visible, compute, lambda c: c, c), None

            (m_i, l_i, o_i), _ = lax.scan(kv_step, (m[i], l_[i], o[i]), jnp.arange(t.nk))
            return m.at[i].set(m_i), l_.at[i].set(l_i), o.at[i].set(o_i)

        return lax.fori_loop(0, t.nq, q_tile, state)

    def body(carry, _):
        state, kv = carry
        kv_next = send_to_next(kv, axis_name)  # issued first so the transfer can overlap this hop's compute
        return (hop(state, kv), kv_next), None

    rows = (t.nq, t.B, t.K, t.R, bq)
    state = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros((*rows, t.P), _F32))
    kv = _kv_tiles(t, k, v, kp, ks)
    if n > 1:
        (state, kv), _ = lax.scan(body, (state, kv), None, length=n - 1)  # no rotation after the last hop
    m, l_, o = hop(state, kv)
    seen = l_ > 0
    l_safe = jnp.where(seen, l_, 1.0)
    out_t = jnp.moveaxis(o / l_safe[..., None], 4, 2)  # [nq, B, bq, K, R, P]; o == 0 where nothing was seen
    lse_t = jnp.moveaxis(jnp.where(seen, m + jnp.log(l_safe), -jnp.inf), 4, 2)  # [nq, B, bq, K, R]
    out = _untile(out_t, t.L).reshape(t.B, t.L, t.K * t.R, t.P)
    lse = _untile(lse_t, t.L).reshape(t.B, t.L, t.K * t.R)
    return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk):
    out, lse = _ring_fwd_impl(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk)
    return (out, lse), (q, k, v, qp, kp, qs, ks, out, lse)


# ---- backward --------------------------------------------------------------------------------------------------------
def _ring_bwd(axis_name, causal, window, scale, bq, bk, residuals, cotangents):
    q, k, v, qp, kp, qs, ks, out, lse = residuals
    dout, dlse = cotangents
    t = _tiling(q, k, bq, bk)
    n = axis_size(axis_name)
    ring_seg = qs is not None
    qs_ = qs if ring_seg else jnp.zeros(qp.shape, jnp.int32)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1) - dlse.astype(_F32)

    def rows(x_BLH, pad_value):  # [B, L, H] -> [nq, B, K, R, bq]
        return jnp.moveaxis(_tiles(x_BLH.astype(_F32).reshape(t.B, t.L, t.K, t.R), bq, pad_value=pad_value), 2, -1)

    q_t = _tiles(q.reshape(t.B, t.L, t.K, t.R, t.P), bq)
    do_t = _tiles(dout.astype(q.dtype).reshape(t.B, t.L, t.K, t.R, t.P), bq)
    lse_t, delta_t = rows(lse, jnp.inf), rows(delta, 0.0)  # padded query rows: lse = +inf, so P = 0
    qp_t, qs_t = _tiles(qp, bq, edge=True), _tiles(qs_, bq, edge=True)
    ks0_t = None if ring_seg else _tiles(jnp.zeros(kp.shape, jnp.int32), bk, edge=True)

    def hop(acc, kv):
        """Add this block's contributions to dq (kept here) and to the block's travelling dk / dv."""
        k_t, v_t, kp_t = kv[:3]
        ks_t = kv[3] if ring_seg else ks0_t

        def kv_tile(j, acc):
            dq, dk, dv = acc

            def q_tile(i, c):
                dq, dk_j, dv_j = c

                def compute(_):
                    mask = _tile_mask(qp_t[i], kp_t[j], qs_t[i], ks_t[j], None if t.valid is None else t.valid[j],
                                      causal, window)  # fmt: skip
                    return _tile_bwd(q_t[i], k_t[j], v_t[j], do_t[i], lse_t[i], delta_t[i], mask, scale)

                def skip(_):
                    return (jnp.zeros((t.B, bq, t.K, t.R, t.P), _F32), jnp.zeros((t.B, bk, t.K, t.P), _F32),
                            jnp.zeros((t.B, bk, t.K, t.P), _F32))  # fmt: skip

                visible = masks.tile_may_attend(qp_t[i], kp_t[j], qs_t[i], ks_t[j], causal=causal, window=window)
                dq_i, dk_i, dv_i = lax.cond(visible, compute, skip, None)
                return dq.at[i].add(dq_i), dk_j + dk_i, dv_j + dv_i

            dq, dk_j, dv_j = lax.fori_loop(0, t.nq, q_tile, (dq, dk[j], dv[j]))
            return dq, dk.at[j].set(dk_j), dv.at[j].set(dv_j)

        return lax.fori_loop(0, t.nk, kv_tile, acc)

    def body(carry, _):
        dq, kv, dkv = carry
        kv_next = send_to_next(kv, axis_name)  # K/V for the next hop: independent of this hop's compute
        dq, dk, dv = hop((dq, *dkv), kv)
        return (dq, kv_next, send_to_next((dk, dv), axis_name)), None  # the accumulators follow their block

    kv = _kv_tiles(t, k, v, kp, ks)
    dq = jnp.zeros((t.nq, t.B, bq, t.K, t.R, t.P), _F32)
    dkv = (jnp.zeros(kv[0].shape, _F32), jnp.zeros(kv[1].shape, _F32))
    if n > 1:
        (dq, kv, dkv), _ = lax.scan(body, (dq, kv, dkv), None, length=n - 1)
    dq, dk, dv = hop((dq, *dkv), kv)
    if n > 1:  # the last block's accumulators go home: block j now sits on device j - 1
        dk, dv = send_to_next((dk, dv), axis_name)
    dq = _untile(dq, t.L).reshape(q.shape)
    dk, dv = _untile(dk, t.S), _untile(dv, t.S)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring = jax.custom_vjp(_ring_fwd_impl, nondiff_argnums=(7, 8, 9, 10, 11, 12))
_ring.defvjp(_ring_fwd, _ring_bwd)


@validated_by(_check_call)
def ring_attention(
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
    """Exact attention of the local queries against the keys of every device on the ring ``axis_name``.

    Call inside ``jax.shard_map`` with q, k, v the local shards (``[B, L/n, H | K, P]``) and positions / segment
    ids the int32 ``[B, L/n]`` values of those tokens (any layout; see ``lcjax.ops.context_parallel``). The mask
    rule is ``lcjax.ops.masks``. ``axis_name=None`` runs the single-device path (one hop, no collective). Output in
    ``q.dtype``; with ``return_lse`` also the float32 lse ``[B, L/n, H]`` (differentiable). ``block_q`` /
    ``block_kv`` (tile sizes of the per-hop kernel) default to ``default_block``. Gradient memory is O(L/n) per
    device: only q, k, v, out and lse are saved, and the backward pass re-rings K/V.
    """
    qs, ks, scale = check_context_attention(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)
    bq, bk = tile_sizes(q.shape[1], k.shape[1], block_q, block_kv)
    qp, kp = q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32)
    out, lse = _ring(q, k, v, qp, kp, qs, ks, axis_name, bool(causal), None if window is None else int(window),
                     scale, bq, bk)
    return (out, lse) if return_lse else out
