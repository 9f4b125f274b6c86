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

Forward: per hop, the tiled online-softmax kernel ``blockwise_fwd`` gives a float32 (out, lse) of the local queries
against that block; hops are merged with ``merge_attention``. A hop whose block no local query can see (position /
segment ranges, ``masks.tile_may_attend``) is skipped with ``lax.cond``, and inside a hop invisible tiles are
skipped the same way. The next hop's ``ppermute`` is issued before the current hop's compute, and the K/V are not
rotated after the last hop (n - 1 transfers).

Backward (``jax.custom_vjp``): the residuals are only q, k, v, out, lse and the int32 positions / segment ids, all
O(L/n) per device. K/V travel the ring again; each block's dK/dV float32 accumulator travels with it and gains that
device's contribution (``blockwise_bwd`` with the global lse and ``delta = rowsum(dO ∘ O) - dlse``); after n
shifts every accumulator is back on its owner, so no final collective is needed. GQA/MQA never repeats K/V heads
(q is viewed as ``[B, T, K, R, P]`` inside the kernels), so ring traffic is at ``kv_heads``.

Per device and hop: 3 ``ppermute`` (k, v, kv_positions) forward, plus kv_segment_ids when segment ids are given;
backward the same plus dk and dv, and one last dk/dv shift home.

Dimension key (lcjax/typing.py): B batch, L local query length, S local key length, H query heads, K kv heads,
P head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.ops import masks
from lcjax.ops.attention_blockwise import DEFAULT_BLOCK, blockwise_bwd, blockwise_fwd, merge_attention
from lcjax.typing import Array, Float, Int

__all__ = ["ring_attention", "default_block", "check_axis_name", "check_cp_inputs", "validated"]

_F32 = jnp.float32
AxisName = str | tuple[str, ...] | None


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


def check_axis_name(axis_name) -> None:
    ok = axis_name is None or isinstance(axis_name, str) or (
        isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name))
    if not ok:
        raise ValueError(f"axis_name must be a mesh axis name, a non-empty tuple of names, or None; got {axis_name!r}")


def check_cp_inputs(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, window, scale,
                    block_q, block_kv):
    """Shared validation of ``ring_attention`` / ``allgather_attention`` (ValueError naming the argument).

    Returns ``(q_segment_ids, kv_segment_ids, scale, block_q, block_kv)`` with defaults filled (segment ids: zeros,
    or None when neither is given).
    """
    for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if x is None:
            raise ValueError(f"{name} is required (int32 [B, local length]): context-parallel masks come from "
                             "positions, never from the device index")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    _, _, qs, ks, scale = masks.check_attention_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {b!r}")
    bq = default_block(q.shape[1]) if block_q is None else min(block_q, q.shape[1])
    bk = default_block(k.shape[1]) if block_kv is None else min(block_kv, k.shape[1])
    if q_segment_ids is None:
        qs = ks = None
    return qs, ks, scale, bq, bk


def validated(f):
    """Run the argument checks (ValueError) before ``f`` and its runtime type check, for ``f(q, k, v, **kw)``."""

    @functools.wraps(f)
    def wrapper(q, k, v, **kw):
        check_axis_name(kw.get("axis_name"))
        check_cp_inputs(q, k, v, **{name: kw.get(name) for name in (
            "q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids", "window", "scale", "block_q",
            "block_kv")})  # fmt: skip
        return f(q, k, v, **kw)

    return wrapper


# ---- one hop ---------------------------------------------------------------------------------------------------
def _hop_fwd(q, k, v, qp, kp, qs, ks, *, causal, window, scale, bq, bk):
    """Float32 (out, lse) of the local queries against one K/V block; (0, -inf) if the block is invisible."""
    B, L, H, P = q.shape

    def compute(_):
        return blockwise_fwd(q, k, v, q_positions=qp, kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks,
                             causal=causal, window=window, scale=scale, block_q=bq, block_kv=bk)

    def skip(_):
        return jnp.zeros((B, L, H, P), _F32), jnp.full((B, L, H), -jnp.inf, _F32)

    return lax.cond(masks.tile_may_attend(qp, kp, qs, ks, causal=causal, window=window), compute, skip, None)


def _hop_bwd(q, k, v, do, lse, delta, qp, kp, qs, ks, *, causal, window, scale, bq, bk):
    """Float32 (dq, dk, dv) contributions of one K/V block; zeros if the block is invisible."""

    def compute(_):
        return blockwise_bwd(q, k, v, do, lse, delta, q_positions=qp, kv_positions=kp, q_segment_ids=qs,
                             kv_segment_ids=ks, causal=causal, window=window, scale=scale, block_q=bq, block_kv=bk)

    def skip(_):
        return jnp.zeros(q.shape, _F32), jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)

    return lax.cond(masks.tile_may_attend(qp, kp, qs, ks, causal=causal, window=window), compute, skip, None)


def _shift(tree, axis_name, n):
    """Every device sends its arrays to the next device on the ring (device r receives from r - 1)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _ring_size(axis_name) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


# ---- forward and backward over the ring ------------------------------------------------------------------------
def _ring_fwd_impl(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk):
    n = _ring_size(axis_name)
    ring_seg = qs is not None  # without segment ids every token is in segment 0: nothing to send
    qs_ = qs if ring_seg else jnp.zeros(qp.shape, jnp.int32)
    ks0 = jnp.zeros(kp.shape, jnp.int32)

    def hop(kv):
        return _hop_fwd(q, kv[0], kv[1], qp, kv[2], qs_, kv[3] if ring_seg else ks0,
                        causal=causal, window=window, scale=scale, bq=bq, bk=bk)

    kv = (k, v, kp, ks) if ring_seg else (k, v, kp)

    def body(carry, _):
        out, lse, kv = carry
        kv_next = _shift(kv, axis_name, n)  # issued first so the transfer can overlap this hop's compute
        out, lse = merge_attention(out, lse, *hop(kv))
        return (out, lse, kv_next), None

    B, L, H, P = q.shape
    init = (jnp.zeros((B, L, H, P), _F32), jnp.full((B, L, H), -jnp.inf, _F32), kv)
    if n > 1:
        init, _ = lax.scan(body, init, None, length=n - 1)
    out, lse, kv_last = init
    out, lse = merge_attention(out, lse, *hop(kv_last))
    return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk):
    out, lse = _ring_fwd_impl(q, k, v, qp, kp, qs, ks, axis_name, causal, window, scale, bq, bk)
    return (out, lse), (q, k, v, qp, kp, qs, ks, out, lse)


def _ring_bwd(axis_name, causal, window, scale, bq, bk, residuals, cotangents):
    q, k, v, qp, kp, qs, ks, out, lse = residuals
    dout, dlse = cotangents
    n = _ring_size(axis_name)
    ring_seg = qs is not None
    qs_ = qs if ring_seg else jnp.zeros(qp.shape, jnp.int32)
    ks0 = jnp.zeros(kp.shape, jnp.int32)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1) - dlse.astype(_F32)
    do = dout.astype(q.dtype)

    def hop(kv):
        return _hop_bwd(q, kv[0], kv[1], do, lse, delta, qp, kv[2], qs_, kv[3] if ring_seg else ks0,
                        causal=causal, window=window, scale=scale, bq=bq, bk=bk)

    def body(carry, _):
        dq, kv, dkv = carry
        kv_next = _shift(kv, axis_name, n)  # K/V for the next hop: independent of this hop's compute
        dq_h, dk_h, dv_h = hop(kv)
        dkv = _shift((dkv[0] + dk_h, dkv[1] + dv_h), axis_name, n)  # the accumulator follows its block
        return (dq + dq_h, kv_next, dkv), None

    kv = (k, v, kp, ks) if ring_seg else (k, v, kp)
    init = (jnp.zeros(q.shape, _F32), kv, (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)))
    if n > 1:
        init, _ = lax.scan(body, init, None, length=n - 1)
    dq, kv_last, (dk, dv) = init
    dq_h, dk_h, dv_h = hop(kv_last)
    dq, dk, dv = dq + dq_h, dk + dk_h, dv + dv_h
    if n > 1:  # the last block's accumulators go home: block j now sits on device j - 1
        dk, dv = _shift((dk, dv), axis_name, n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring = jax.custom_vjp(_ring_fwd_impl, nondiff_argnums=(7, 8, 9, 10, 11, 12))
_ring.defvjp(_ring_fwd, _ring_bwd)


@validated
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
    qs, ks, scale, bq, bk = check_cp_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale, block_q=block_q, block_kv=block_kv)
    qp, kp = q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32)
    out, lse = _ring(q, k, v, qp, kp, qs, ks, axis_name, bool(causal), None if window is None else int(window),
                     scale, bq, bk)
    return (out, lse) if return_lse else out
