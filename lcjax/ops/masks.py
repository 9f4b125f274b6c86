"""Attention mask semantics and input checks, shared by every attention path in lcjax.

Dense, blockwise, splash, decode and ring attention all use this one rule. Query ``i`` may attend key ``j`` iff

    q_segment_ids[i] == kv_segment_ids[j]
    and (not causal or q_positions[i] >= kv_positions[j])
    and (window is None or  q_positions[i] - kv_positions[j]  < window   if causal
                        or |q_positions[i] - kv_positions[j]| < window   if bidirectional)

so a causal window of ``w`` keeps the current token and the ``w - 1`` before it (Mistral / Longformer style).
Positions and segment ids are int32 ``[B, L]`` (queries) and ``[B, S]`` (keys). Defaults: positions ``arange``,
segment ids all 0 (one group). Segment ids mean what ``lcjax.ops.segments`` says: documents never see each other,
padding (id 0) sees only padding, real tokens never see padding. Empty KV-cache slots are keys whose segment id
matches no query (an internal sentinel such as ``-1``, below every real id). A query row with no visible key returns
output 0 and lse ``-inf``.

Because the kernels see only positions (never a layout), context-parallel layouts (contiguous, zigzag, striped) are
data-pipeline permutations: permute tokens, positions and segment ids together and the mask stays right.

Dimension key (lcjax/typing.py): B batch, L query length, S key length, H query heads, K kv heads, P head dim.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from lcjax import checks
from lcjax.typing import Array, Bool, Int

__all__ = ["AttentionInputs", "make_mask", "tile_may_attend", "check_attention_inputs"]


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


class AttentionInputs(NamedTuple):
    """The checked mask arguments of one attention call, defaults filled (``check_attention_inputs``)."""

    q_positions: Int[Array, "B L"]
    kv_positions: Int[Array, "B S"]
    q_segment_ids: Int[Array, "B L"]
    kv_segment_ids: Int[Array, "B S"]
    scale: float

    def mask(self, *, causal: bool, window: int | None) -> Bool[Array, "B L S"]:
        """The dense visibility mask (``make_mask``) of these positions and segment ids."""
        return make_mask(self.q_positions, self.kv_positions, self.q_segment_ids, self.kv_segment_ids, causal=causal,
                         window=window)  # fmt: skip


def _check_index_array(name: str, x, shape: tuple[int, ...]) -> None:
    if x is None:
        return
    checks.require(hasattr(x, "shape") and hasattr(x, "dtype"),
                   f"{name} must be an integer array of shape {shape}, got {type(x).__name__}")  # fmt: skip
    checks.require(tuple(x.shape) == shape, f"{name} must have shape {shape} ([B, length]), got {tuple(x.shape)}")
    checks.require(jnp.issubdtype(x.dtype, jnp.integer), f"{name} must have an integer dtype (int32), got {x.dtype}")


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
) -> AttentionInputs:
    """Validate the common attention arguments (ValueError naming the argument) and fill the defaults.

    The one checked-inputs path of every attention entry point. Returns ``AttentionInputs(q_positions,
    kv_positions, q_segment_ids, kv_segment_ids, scale)``: int32 arrays and a float.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.require(hasattr(x, "shape") and hasattr(x, "dtype"), f"{name} must be an array, got {type(x).__name__}")
        layout = "[B, L, H, P]" if name == "q" else "[B, S, K, P]"
        checks.require(x.ndim == 4, f"{name} must have rank 4 {layout}, got shape {tuple(x.shape)}")
        checks.require(jnp.issubdtype(x.dtype, jnp.floating), f"{name} must have a floating dtype, got {x.dtype}")
    B, L, H, P = q.shape
    _, S, K, _ = k.shape
    checks.require(k.shape[0] == B, f"k batch size {k.shape[0]} must equal q batch size {B}")
    checks.require(k.shape[3] == P, f"k head dim {k.shape[3]} must equal q head dim {P}")
    checks.require(tuple(v.shape) == tuple(k.shape),
                   f"v must have the shape of k {tuple(k.shape)} (same head dim), got {tuple(v.shape)}")  # fmt: skip
    checks.require(k.dtype == q.dtype and v.dtype == q.dtype,
                   f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")  # fmt: skip
    checks.require(min(L, S, H, K, P) >= 1,
                   f"q and k must have non-empty dimensions, got q {tuple(q.shape)}, k {tuple(k.shape)}")  # fmt: skip
    checks.require(H % K == 0, f"q heads H={H} must be a multiple of k/v heads K={K} (GQA/MQA)")
    _check_index_array("q_positions", q_positions, (B, L))
    _check_index_array("kv_positions", kv_positions, (B, S))
    _check_index_array("q_segment_ids", q_segment_ids, (B, L))
    _check_index_array("kv_segment_ids", kv_segment_ids, (B, S))
    if window is not None:
        checks.require_int("window", window)
        checks.require(window >= 1, f"window must be a positive int or None, got {window!r}")
    if scale is None:
        scale = 1.0 / float(np.sqrt(P))
    else:
        checks.require(not isinstance(scale, float) or math.isfinite(scale),
                       f"scale must be a finite Python float or None, got {scale!r}")  # fmt: skip
        scale = checks.require_float("scale", scale)

    def filled(x, length):
        if x is None:
            return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))
        return x.astype(jnp.int32)

    def zeros_if_none(x, length):
        return jnp.zeros((B, length), jnp.int32) if x is None else x.astype(jnp.int32)

    return AttentionInputs(
        filled(q_positions, L), filled(kv_positions, S), zeros_if_none(q_segment_ids, L),
        zeros_if_none(kv_segment_ids, S), scale,
    )  # fmt: skip
