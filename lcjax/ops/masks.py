"""Attention mask semantics and input checks, shared by every attention path in lcjax.

Dense, blockwise, splash, decode and ring attention all use this one rule. Query ``i`` may attend key ``j`` iff

    q_segment_ids[i] == kv_segment_ids[j]
    and (not causal or q_positions[i] >= kv_positions[j])
    and (window is None or  q_positions[i] - kv_positions[j]  < window   if causal
                        or |q_positions[i] - kv_positions[j]| < window   if bidirectional)

so a causal window of ``w`` keeps the current token and the ``w - 1`` before it (Mistral / Longformer style).
Positions and segment ids are int32 ``[B, L]`` (queries) and ``[B, S]`` (keys). Defaults: positions ``arange``,
segment ids all 0. Padding and empty KV-cache slots are keys whose segment id matches no query: use ``-1`` with
the default query segment id 0. A query row with no visible key returns output 0 and lse ``-inf``.

Because the kernels see only positions (never a layout), context-parallel layouts (contiguous, zigzag, striped) are
data-pipeline permutations: permute tokens, positions and segment ids together and the mask stays right.

Dimension key (lcjax/typing.py): B batch, L query length, S key length, H query heads, K kv heads, P head dim.
"""

import numbers

import jax.numpy as jnp
import numpy as np

from lcjax.typing import Array, Bool, Float, Int

__all__ = ["make_mask", "tile_may_attend", "check_attention_inputs"]


def make_mask(
    q_positions: Int[Array, "B L"],
    kv_positions: Int[Array, "B S"],
    q_segment_ids: Int[Array, "B L"],
    kv_segment_ids: Int[Array, "B S"],
    *,
    causal: bool,
    window: int | None = None,
) -> Bool[Array, "B L S"]:
    """The boolean visibility mask ``mask[b, i, j]`` (True = query i may attend key j); see the module docstring."""
    mask_BLS = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    diff_BLS = q_positions[:, :, None] - kv_positions[:, None, :]
    if causal:
        mask_BLS &= diff_BLS >= 0
    if window is not None:
        mask_BLS &= (diff_BLS if causal else jnp.abs(diff_BLS)) < window
    return mask_BLS


def tile_may_attend(
    q_positions: Int[Array, "B L"],
    kv_positions: Int[Array, "B S"],
    q_segment_ids: Int[Array, "B L"],
    kv_segment_ids: Int[Array, "B S"],
    *,
    causal: bool,
    window: int | None = None,
) -> Bool[Array, ""]:
    """Conservative tile test from min/max only: False means no (query, key) pair of the tile is visible.

    Used to skip whole (q tile, kv tile) pairs with ``lax.cond``: causal tiles strictly above the diagonal, tiles
    outside the sliding window, and tiles whose segment-id ranges are disjoint (always sound; it skips most
    cross-document tiles when packed segment ids increase along the sequence). O(L + S) work.
    """
    q_lo, q_hi = jnp.min(q_positions), jnp.max(q_positions)
    kv_lo, kv_hi = jnp.min(kv_positions), jnp.max(kv_positions)
    visible = (jnp.max(q_segment_ids) >= jnp.min(kv_segment_ids)) & (jnp.max(kv_segment_ids) >= jnp.min(q_segment_ids))
    if causal:
        visible &= q_hi >= kv_lo
    if window is not None:
        visible &= q_lo - kv_hi < window
        if not causal:
            visible &= kv_lo - q_hi < window
    return visible


def _check_index_array(name: str, x, shape: tuple[int, ...]) -> None:
    if x is None:
        return
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an integer array of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ([B, length]), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype (int32), got {x.dtype}")


def check_attention_inputs(
    q,
    k,
    v,
    *,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    window=None,
    scale=None,
) -> tuple[Int[Array, "B L"], Int[Array, "B S"], Int[Array, "B L"], Int[Array, "B S"], float]:
    """Validate the common attention arguments (ValueError naming the argument) and fill the defaults.

    Returns ``(q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)`` as int32 arrays and a float.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            layout = "[B, L, H, P]" if name == "q" else "[B, S, K, P]"
            raise ValueError(f"{name} must have rank 4 {layout}, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    B, L, H, P = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch size {k.shape[0]} must equal q batch size {B}")
    if k.shape[3] != P:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {P}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} (same head dim), got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if L < 1 or S < 1 or H < 1 or K < 1 or P < 1:
        raise ValueError(f"q and k must have non-empty dimensions, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % K:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads K={K} (GQA/MQA)")
    _check_index_array("q_positions", q_positions, (B, L))
    _check_index_array("kv_positions", kv_positions, (B, S))
    _check_index_array("q_segment_ids", q_segment_ids, (B, L))
    _check_index_array("kv_segment_ids", kv_segment_ids, (B, S))
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if scale is None:
        scale = 1.0 / float(np.sqrt(P))
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float or None, got {scale!r}")

    def filled(x, length):
        if x is None:
            return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))
        return x.astype(jnp.int32)

    def zeros_if_none(x, length):
        return jnp.zeros((B, length), jnp.int32) if x is None else x.astype(jnp.int32)

    return (
        filled(q_positions, L),
        filled(kv_positions, S),
        zeros_if_none(q_segment_ids, L),
        zeros_if_none(kv_segment_ids, S),
        float(scale),
    )
