"""Blockwise (flash-style) attention in pure JAX: online softmax forward, recomputing backward, lse merging.

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", Dao 2023,
https://arxiv.org/abs/2307.08691 (Algorithms 1 and 2), and "Blockwise Parallel Transformer for Large Context
Models", Liu & Abbeel 2023, https://arxiv.org/abs/2305.19370. Checked against the JAX blockwise code in
haoliuhl/ringattention ``ringattention/ringattention_jax.py`` and the lse merge of zhuzilin/ring-flash-attention
``ring_flash_attn/utils.py::update_out_and_lse``; written from the math, not copied.

Forward: for every (q tile, kv tile) pair keep float32 running max ``m``, denominator ``l`` and numerator ``o``;
tiles that no query can see (by min/max of positions and segment ids, ``masks.tile_may_attend``) are skipped with
``lax.cond``, so causal attention does about half the work. Backward (``jax.custom_vjp``): residuals are only
q, k, v, out and lse (plus the int32 positions/segment ids), and each tile's probabilities are recomputed as
``P = exp(scale·q·kᵀ - lse)``, so memory is O(L·block), never O(L·S). The lse output is differentiable: with
``delta = rowsum(dO ∘ O) - dlse`` the score gradient is ``dS = P ∘ (dO·vᵀ - delta)``.

The per-hop pieces of split-KV schemes (ring attention reuses the tile kernels below them):
  ``blockwise_fwd``  (out f32, lse f32) of q against one kv chunk, tiled, no custom_vjp;
  ``blockwise_bwd``  (dq, dk, dv) f32 of one chunk pair given the *global* lse and delta;
  ``merge_attention`` the float32 (out, lse) merge of two partial results, safe for lse = -inf.

Dimension key (lcjax/typing.py): B batch, L query length, S key length, H query heads, K kv heads,
R = H // K query heads per kv head, P head dim. Inside, q is viewed as ``[B, L, K, R, P]`` so GQA/MQA never
repeats k/v; tiles carry a leading tile index (``nq``/``nk``).
"""

import jax
import jax.numpy as jnp
from jax import lax

from lcjax import checks
from lcjax.ops import masks
from lcjax.typing import Array, Bool, Float, Int

__all__ = ["blockwise_attention", "blockwise_checked", "blockwise_fwd", "blockwise_bwd", "merge_attention",
           "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 512
_F32 = jnp.float32


def _check_blocks(block_q, block_kv) -> None:
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        checks.require_int(name, b)
        checks.require(b >= 1, f"{name} must be a positive int, got {b!r}")


def _tiles(x, block: int, *, pad_value=0, edge: bool = False):
    """``[B, n, ...]`` -> ``[n_tiles, B, block, ...]``, padding the length axis up to a multiple of ``block``."""
    n = x.shape[1]
    pad = -n % block
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, mode="edge") if edge else jnp.pad(x, widths, constant_values=pad_value)
    x = x.reshape(x.shape[0], (n + pad) // block, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _untile(x_tiles, n: int):
    """Inverse of ``_tiles``: ``[n_tiles, B, block, ...]`` -> ``[B, n, ...]``."""
    x = jnp.moveaxis(x_tiles, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _kv_valid_tiles(S: int, block_kv: int):
    """``[nk, block_kv]`` True for real keys, False for the padding that rounds S up; None when S fits exactly."""
    if S % block_kv == 0:
        return None
    n_tiles = -(-S // block_kv)
    return (jnp.arange(n_tiles * block_kv) < S).reshape(n_tiles, block_kv)


def _kv_xs(k, v, kv_positions, kv_segment_ids, bk: int):
    """The per-kv-tile scan inputs ``(k, v, positions, segment ids, valid)`` of the forward and backward loops."""
    return (
        _tiles(k, bk),
        _tiles(v, bk),
        _tiles(kv_positions, bk, edge=True),  # edge padding keeps each tile's min/max inside the real range
        _tiles(kv_segment_ids, bk, edge=True),
        _kv_valid_tiles(kv_positions.shape[1], bk),
    )


def _tile_mask(qp_t, kp_t, qs_t, ks_t, valid_t, causal, window):
    mask_BLS = masks.make_mask(qp_t, kp_t, qs_t, ks_t, causal=causal, window=window)
    if valid_t is not None:
        mask_BLS &= valid_t[None, None, :]
    return mask_BLS


def _tile_fwd(carry, q_BLKRP, k_BSKP, v_BSKP, mask_BLS, scale):
    """One online-softmax update of the float32 carry ``(m_BKRL, l_BKRL, o_BKRLP)`` with one kv tile."""
    m_BKRL, l_BKRL, o_BKRLP = carry
    s_BKRLS = jnp.einsum("BLKRP,BSKP->BKRLS", q_BLKRP, k_BSKP, preferred_element_type=_F32) * scale
    s_BKRLS = jnp.where(mask_BLS[:, None, None], s_BKRLS, -jnp.inf)
    m_new_BKRL = jnp.maximum(m_BKRL, jnp.max(s_BKRLS, axis=-1))
    m_safe_BKRL = jnp.where(m_new_BKRL == -jnp.inf, 0.0, m_new_BKRL)  # a row with nothing visible yet stays 0
    p_BKRLS = jnp.exp(s_BKRLS - m_safe_BKRL[..., None])
    alpha_BKRL = jnp.exp(m_BKRL - m_safe_BKRL)
    l_BKRL = alpha_BKRL * l_BKRL + jnp.sum(p_BKRLS, axis=-1)
    pv_BKRLP = jnp.einsum("BKRLS,BSKP->BKRLP", p_BKRLS.astype(v_BSKP.dtype), v_BSKP, preferred_element_type=_F32)
    o_BKRLP = alpha_BKRL[..., None] * o_BKRLP + pv_BKRLP
    return m_new_BKRL, l_BKRL, o_BKRLP


def _tile_bwd(q_BLKRP, k_BSKP, v_BSKP, do_BLKRP, lse_BKRL, delta_BKRL, mask_BLS, scale):
    """Gradient contributions (dq, dk, dv; float32) of one (q tile, kv tile) pair, recomputing P from lse."""
    s_BKRLS = jnp.einsum("BLKRP,BSKP->BKRLS", q_BLKRP, k_BSKP, preferred_element_type=_F32) * scale
    s_BKRLS = jnp.where(mask_BLS[:, None, None], s_BKRLS, -jnp.inf)
    lse_safe_BKRL = jnp.where(lse_BKRL == -jnp.inf, 0.0, lse_BKRL)  # fully masked rows: every s is -inf, P = 0
    p_BKRLS = jnp.exp(s_BKRLS - lse_safe_BKRL[..., None])
    dv_BSKP = jnp.einsum("BKRLS,BLKRP->BSKP", p_BKRLS.astype(do_BLKRP.dtype), do_BLKRP, preferred_element_type=_F32)
    dp_BKRLS = jnp.einsum("BLKRP,BSKP->BKRLS", do_BLKRP, v_BSKP, preferred_element_type=_F32)
    ds_BKRLS = p_BKRLS * (dp_BKRLS - delta_BKRL[..., None])
    dq_BLKRP = jnp.einsum("BKRLS,BSKP->BLKRP", ds_BKRLS.astype(k_BSKP.dtype), k_BSKP, preferred_element_type=_F32)
    dk_BSKP = jnp.einsum("BKRLS,BLKRP->BSKP", ds_BKRLS.astype(q_BLKRP.dtype), q_BLKRP, preferred_element_type=_F32)
    return dq_BLKRP * scale, dk_BSKP * scale, dv_BSKP


def blockwise_fwd(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    inputs: masks.AttentionInputs,
    *,
    causal: bool,
    window: int | None,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Tiled forward of q against one kv chunk: ``(out, lse)``, both float32, no custom_vjp.

    ``inputs`` (positions, segment ids and scale of this chunk pair, as ``masks.check_attention_inputs`` returns
    them) is required here: this is the per-hop kernel of split-KV / ring schemes; use ``blockwise_attention`` for
    the public, differentiable function. Rows with no visible key give out 0 and lse -inf. Any L, S: the last tile
    is padded internally and its padding is masked out.
    """
    _check_blocks(block_q, block_kv)
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale = inputs
    B, L, H, P = q.shape
    S, K = k.shape[1], k.shape[2]
    R = H // K
    bq, bk = min(block_q, L), min(block_kv, S)
    q_xs = (
        _tiles(q.reshape(B, L, K, R, P), bq),
        _tiles(q_positions, bq, edge=True),  # edge padding keeps each tile's min/max inside the real range
        _tiles(q_segment_ids, bq, edge=True),
    )
    kv_xs = _kv_xs(k, v, kv_positions, kv_segment_ids, bk)

    def one_q_tile(xs):
        q_BLKRP, qp_BL, qs_BL = xs
        init = (
            jnp.full((B, K, R, bq), -jnp.inf, _F32),
            jnp.zeros((B, K, R, bq), _F32),
            jnp.zeros((B, K, R, bq, P), _F32),
        )

        def kv_step(carry, ys):
            k_BSKP, v_BSKP, kp_BS, ks_BS, valid_S = ys

            def compute(c):
                mask_BLS = _tile_mask(qp_BL, kp_BS, qs_BL, ks_BS, valid_S, causal, window)
                return _tile_fwd(c, q_BLKRP, k_BSKP, v_BSKP, mask_BLS, scale)

            visible = masks.tile_may_attend(qp_BL, kp_BS, qs_BL, ks_BS, causal=causal, window=window)
            return lax.cond(visible, compute, lambda c: c, carry), None

        (m_BKRL, l_BKRL, o_BKRLP), _ = lax.scan(kv_step, init, kv_xs)
        seen_BKRL = l_BKRL > 0
        l_safe_BKRL = jnp.where(seen_BKRL, l_BKRL, 1.0)
        out_BKRLP = o_BKRLP / l_safe_BKRL[..., None]  # o == 0 where nothing was seen
        lse_BKRL = jnp.where(seen_BKRL, m_BKRL + jnp.log(l_safe_BKRL), -jnp.inf)
        return jnp.moveaxis(out_BKRLP, 3, 1), jnp.moveaxis(lse_BKRL, 3, 1)  # [B, bq, K, R, (P)]

    out_tiles, lse_tiles = lax.map(one_q_tile, q_xs)
    out_BLHP = _untile(out_tiles, L).reshape(B, L, H, P)
    lse_BLH = _untile(lse_tiles, L).reshape(B, L, H)
    return out_BLHP, lse_BLH


def blockwise_bwd(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    dout: Float[Array, "B L H P"],
    lse: Float[Array, "B L H"],
    delta: Float[Array, "B L H"],
    inputs: masks.AttentionInputs,
    *,
    causal: bool,
    window: int | None,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> tuple[Float[Array, "B L H P"], Float[Array, "B S K P"], Float[Array, "B S K P"]]:
    """Tiled backward of q against one kv chunk: ``(dq, dk, dv)`` in float32.

    ``lse`` is the log-sum-exp over *all* keys the queries attend (for ring attention: the merged, global lse) and
    ``delta = sum(dout * out, -1) - dlse`` with the final output and the lse cotangent (0 if lse is unused).
    Outer loop over kv tiles (dk, dv accumulate in the carry), inner loop over q tiles (dq accumulates in float32);
    invisible tiles are skipped exactly as in the forward pass.
    """
    _check_blocks(block_q, block_kv)
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale = inputs
    B, L, H, P = q.shape
    S, K = k.shape[1], k.shape[2]
    R = H // K
    bq, bk = min(block_q, L), min(block_kv, S)

    def rows(x_BLH, pad_value):  # [B, L, H] -> [nq, B, K, R, bq]
        return jnp.moveaxis(_tiles(x_BLH.astype(_F32).reshape(B, L, K, R), bq, pad_value=pad_value), 2, -1)

    q_xs = (
        _tiles(q.reshape(B, L, K, R, P), bq),
        _tiles(dout.reshape(B, L, K, R, P), bq),
        rows(lse, jnp.inf),  # padded query rows get lse = +inf, so their P is exactly 0
        rows(delta, 0.0),
        _tiles(q_positions, bq, edge=True),
        _tiles(q_segment_ids, bq, edge=True),
    )
    kv_xs = _kv_xs(k, v, kv_positions, kv_segment_ids, bk)
    n_q_tiles = q_xs[0].shape[0]

    def one_kv_tile(dq_tiles, xs):
        k_BSKP, v_BSKP, kp_BS, ks_BS, valid_S = xs

        def q_step(carry, ys):
            q_BLKRP, do_BLKRP, lse_BKRL, delta_BKRL, qp_BL, qs_BL = ys

            def compute(c):
                dk_BSKP, dv_BSKP = c
                mask_BLS = _tile_mask(qp_BL, kp_BS, qs_BL, ks_BS, valid_S, causal, window)
                dq_t, dk_t, dv_t = _tile_bwd(q_BLKRP, k_BSKP, v_BSKP, do_BLKRP, lse_BKRL, delta_BKRL, mask_BLS, scale)
                return (dk_BSKP + dk_t, dv_BSKP + dv_t), dq_t

            def skip(c):
                return c, jnp.zeros((B, bq, K, R, P), _F32)

            visible = masks.tile_may_attend(qp_BL, kp_BS, qs_BL, ks_BS, causal=causal, window=window)
            return lax.cond(visible, compute, skip, carry)

        init = (jnp.zeros((B, bk, K, P), _F32), jnp.zeros((B, bk, K, P), _F32))
        (dk_BSKP, dv_BSKP), dq_new = lax.scan(q_step, init, q_xs)
        return dq_tiles + dq_new, (dk_BSKP, dv_BSKP)

    dq0 = jnp.zeros((n_q_tiles, B, bq, K, R, P), _F32)
    dq_tiles, (dk_tiles, dv_tiles) = lax.scan(one_kv_tile, dq0, kv_xs)
    return _untile(dq_tiles, L).reshape(B, L, H, P), _untile(dk_tiles, S), _untile(dv_tiles, S)


def merge_attention(
    out_a: Float[Array, "B L H P"],
    lse_a: Float[Array, "B L H"],
    out_b: Float[Array, "B L H P"],
    lse_b: Float[Array, "B L H"],
) -> tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Merge two normalised partial attentions over disjoint key sets into one, in float32.

    ``lse = logaddexp(lse_a, lse_b)`` and ``out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b``. A side with
    lse = -inf (no visible key) gets weight 0; if both are -inf the result is out 0, lse -inf (never NaN, also in
    the gradient). Associative and commutative, so ring hops and split-KV decoding can merge in any order.
    """
    lse_a, lse_b = lse_a.astype(_F32), lse_b.astype(_F32)
    lse_max = jnp.maximum(lse_a, lse_b)
    lse_max_safe = lax.stop_gradient(jnp.where(lse_max == -jnp.inf, 0.0, lse_max))
    w_a, w_b = jnp.exp(lse_a - lse_max_safe), jnp.exp(lse_b - lse_max_safe)
    total = w_a + w_b
    seen = total > 0
    total_safe = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, lse_max_safe + jnp.log(total_safe), -jnp.inf)
    out = (w_a / total_safe)[..., None] * out_a.astype(_F32) + (w_b / total_safe)[..., None] * out_b.astype(_F32)
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# The differentiable primitive: (out, lse) with a custom VJP that accepts cotangents for both.
# ----------------------------------------------------------------------------------------------------------------


def _flash_primal(q, k, v, qp, kp, qs, ks, causal, window, scale, block_q, block_kv):
    inputs = masks.AttentionInputs(qp, kp, qs, ks, scale)
    out, lse = blockwise_fwd(q, k, v, inputs, causal=causal, window=window, block_q=block_q, block_kv=block_kv)
    return out.astype(q.dtype), lse


def _flash_fwd(q, k, v, qp, kp, qs, ks, causal, window, scale, block_q, block_kv):
    out, lse = _flash_primal(q, k, v, qp, kp, qs, ks, causal, window, scale, block_q, block_kv)
    return (out, lse), (q, k, v, qp, kp, qs, ks, out, lse)


def _flash_bwd(causal, window, scale, block_q, block_kv, residuals, cotangents):
    q, k, v, qp, kp, qs, ks, out, lse = residuals
    dout, dlse = cotangents
    delta_BLH = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1) - dlse.astype(_F32)
    inputs = masks.AttentionInputs(qp, kp, qs, ks, scale)
    dq, dk, dv = blockwise_bwd(q, k, v, dout.astype(q.dtype), lse, delta_BLH, inputs, causal=causal, window=window,
                               block_q=block_q, block_kv=block_kv)  # fmt: skip
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash = jax.custom_vjp(_flash_primal, nondiff_argnums=(7, 8, 9, 10, 11))
_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    *,
    causal: bool = True,
    q_segment_ids: Int[Array, "B L"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_positions: Int[Array, "B L"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Memory-efficient attention, equal to ``attention_reference`` (same arguments, masks in ``lcjax.ops.masks``).

    Logits and softmax in float32, output in ``q.dtype``; with ``return_lse`` also the float32 lse ``[B, L, H]``,
    which is differentiable (its cotangent enters the backward pass through ``delta``). Block sizes are upper
    bounds (clamped to L and S); lengths need not be multiples of them. Memory for the gradient is O(L·block).
    """
    inputs = masks.check_attention_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)  # fmt: skip
    return blockwise_checked(q, k, v, inputs, causal=causal, window=window, return_lse=return_lse, block_q=block_q,
                             block_kv=block_kv)  # fmt: skip


def blockwise_checked(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    inputs: masks.AttentionInputs,
    *,
    causal: bool,
    window: int | None,
    return_lse: bool = False,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """``blockwise_attention`` on inputs already checked by ``masks.check_attention_inputs`` (the dispatcher's path)."""
    _check_blocks(block_q, block_kv)
    qp, kp, qs, ks, scale = inputs
    out, lse = _flash(q, k, v, qp, kp, qs, ks, bool(causal), None if window is None else int(window), scale,
                      int(block_q), int(block_kv))
    return (out, lse) if return_lse else out
