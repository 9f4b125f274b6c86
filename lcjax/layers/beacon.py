"""Activation Beacon attention: beacon tokens that condense a window of raw activations into a few K/V entries.

Papers: "Soaring from 4K to 400K: Extending LLM's Context with Activation Beacon" (v1, Zhang et al. 2024) and "Long
Context Compression with Activation Beacon" (v3, ICLR 2025), https://arxiv.org/abs/2401.03462. Reference code
(read, not copied): FlagOpen/FlagEmbedding ``research/Long_LLM/activation_beacon/src/modeling_beacon.py`` (class
``Memory``, v2 "interleave" + "full-coverage") and the v1 tree ``Long_LLM/activation_beacon/old/src/
activation_beacon_llama/`` ("append" + "step-expansion").

This file holds the pieces that do not know about a whole model: the config, the parameter type that marks what a
beacon fine-tune trains, the pure functions that lay out one chunk of raw tokens and beacons (``chunk_layout``),
and ``BeaconAttention``, the beacon-specific projections of one attention layer plus the attention call over
``[sink; beacon memory; raw cache of the window; chunk]``. The streaming state and the model live in
``lcjax.models.beacon``.

Schemes (``BeaconConfig.scheme``):

- ``"interleave"`` (v2, default): a beacon follows every ``ratio``-th raw token of the window, counted from the window
  start; the chunk is plain causal in slot order and every cached entry is visible ("full-coverage").
- ``"step_expansion"`` (v1): the ``window / ratio`` beacons are appended when a window completes; raw tokens never
  see their own window's beacons; beacon ``i`` sees the window's raw tokens ``j < (i + 1) * ratio``, itself, and the
  memory; its RoPE position is overwritten to ``M + (i + 1) * ratio`` (M = sink + memory entries).

Keys are cached before RoPE; every step rotates the cached keys by ``arange`` over the valid entries of
``[sink; memory; raw cache; chunk]`` (positions relative to the compressed memory, as upstream).
Dimension key (lcjax/typing.py): B batch, T raw tokens of a chunk, U chunk slots (raw + beacons), S keys,
D model, H heads, K kv heads, P head dim.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers.attention import Attention
from lcjax.ops import attention as attention_ops
from lcjax.ops import rope as rope_ops
from lcjax.typing import Array, Bool, Float, Int

SCHEMES = ("interleave", "step_expansion")
RATIO_MIXES = ("step_random", "instance_random", "sequence")  # and "adapt-N", N >= 0 tokens
BEACON_PARAMS = ("q", "k", "v", "o")
_ADAPT = re.compile(r"adapt-(\d+)$")


class BeaconParam(nnx.Param):
    """A beacon parameter: the only variables a beacon fine-tune updates (``nnx.Optimizer(..., wrt=BeaconParam)``)."""


def beacon_param(value: jax.Array, *logical: str | None) -> BeaconParam:
    """``sharding.param`` with the ``BeaconParam`` type (same logical names, born sharded under a mesh)."""
    var = sharding.param(value, *logical)
    return BeaconParam(var[...], **var.get_metadata())


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def _check_ratio(field: str, r, window: int) -> None:
    checks.require_int(f"BeaconConfig.{field}", r, min=0)  # 0 = no compression
    checks.require(r == 0 or (r <= window and window % r == 0),
                   f"BeaconConfig.{field}: ratio {r} must divide window={window} (and be <= window), or be 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeaconConfig:
    """Activation Beacon settings (upstream names in brackets).

    window: raw tokens per window W [beacon_window]. stride: tokens between window starts [beacon_stride]; only
    ``stride == window`` is supported (v2's interleave asserts it; v1's overlapping windows are not implemented).
    ratio: compression ratio at inference, ``window / ratio`` beacons per window; 0 keeps every raw K/V (no
    compression) [eval_beacon_ratio]. train_ratios and ratio_mix: the ratio mix that ``lcjax.train.beacon``
    samples from [beacon_ratio, beacon_ratio_mix]: ``"step_random"`` (fresh ratio per window; repeats act as
    weights), ``"instance_random"`` (one per sequence), ``"sequence"`` (cycle), ``"adapt-N"`` (smallest ratio whose
    compressed length fits the base model's positions with N tokens to spare). scheme: ``"interleave"`` (v2) or
    ``"step_expansion"`` (v1) [beacon_pos + beacon_attn]. beacon_params: projections that get beacon-specific
    copies [beacon_param]. sink_size: the first raw tokens kept uncompressed forever [beacon_sink_size].
    embed_init: the token id whose embedding initialises the beacon embedding (upstream: eos), or ``"random"``
    (N(0, 0.02)) [beacon_embed_init].
    """

    window: int = 1024
    stride: int | None = None
    ratio: int = 8
    train_ratios: tuple[int, ...] = (2, 4, 8, 16, 32)
    ratio_mix: str = "step_random"
    scheme: str = "interleave"
    beacon_params: tuple[str, ...] = ("q", "k", "v")
    sink_size: int = 0
    embed_init: int | str = 2  # Llama-2's eos id

    def __post_init__(self):
        checks.require_int("BeaconConfig.window", self.window, min=1)
        if self.stride is None:
            object.__setattr__(self, "stride", self.window)
        checks.require_int("BeaconConfig.stride", self.stride, min=1, max=self.window)
        checks.require(self.stride == self.window,
                       f"BeaconConfig.stride={self.stride} < window={self.window} (overlapping v1 windows) is not "
                       "supported; use stride == window")  # fmt: skip
        _check_ratio("ratio", self.ratio, self.window)
        object.__setattr__(self, "train_ratios", tuple(self.train_ratios))
        checks.require(len(self.train_ratios) > 0, "BeaconConfig.train_ratios must hold at least one ratio")
        for r in self.train_ratios:
            _check_ratio("train_ratios entry", r, self.window)
        checks.require_str("BeaconConfig.ratio_mix", self.ratio_mix)
        checks.require(self.ratio_mix in RATIO_MIXES or bool(_ADAPT.match(self.ratio_mix)),
                       f"BeaconConfig.ratio_mix={self.ratio_mix!r}; allowed: {RATIO_MIXES} or 'adapt-N'")  # fmt: skip
        checks.require_choice("BeaconConfig.scheme", self.scheme, SCHEMES)
        object.__setattr__(self, "beacon_params", tuple(self.beacon_params))
        checks.require(all(p in BEACON_PARAMS for p in self.beacon_params)
                       and len(set(self.beacon_params)) == len(self.beacon_params),
                       f"BeaconConfig.beacon_params={self.beacon_params!r}: distinct entries of {BEACON_PARAMS}")
        checks.require_int("BeaconConfig.sink_size", self.sink_size, min=0, max=self.window)
        if self.embed_init != "random":
            checks.require_int("BeaconConfig.embed_init", self.embed_init, min=0)  # a token id (or "random")

    # ---- derived sizes ------------------------------------------------------------------------------------
    @property
    def ratios(self) -> tuple[int, ...]:
        """Every ratio the model may see (inference ratio and training mix), sorted."""
        return tuple(sorted(set(self.train_ratios) | {self.ratio}))

    def max_beacons(self, ratios: tuple[int, ...] | None = None) -> int:
        """Most beacons one window can hold with these ratios (default ``self.ratios``): ``window / smallest
        nonzero ratio``, 0 if only ratio 0."""
        return max((self.window // r for r in (self.ratios if ratios is None else ratios) if r > 0), default=0)

    def memory_growth(self, ratios: tuple[int, ...] | None = None) -> int:
        """Most memory entries one completed window adds (``window`` if ratio 0 is among ``ratios``)."""
        return self.window if 0 in (self.ratios if ratios is None else ratios) else self.max_beacons(ratios)

    def chunk_slots(self, n_raw: int, ratios: tuple[int, ...] | None = None) -> int:
        """Static slot count of a chunk of ``n_raw <= window`` raw tokens (raw + as many beacons as can occur)."""
        ratios = self.ratios if ratios is None else ratios
        if self.scheme == "step_expansion":
            return n_raw + self.max_beacons(ratios)
        return n_raw + max(((r - 1 + n_raw) // r for r in ratios if r > 0), default=0)

    def check_model(self, max_positions: int) -> None:
        """A window's chunk (sink, raw tokens and beacons) must fit the base model's positions."""
        need = self.sink_size + self.window + self.max_beacons()
        checks.require(need < max_positions,
                       f"BeaconConfig.window={self.window}: sink_size + window + window/ratio = {need} position slots "
                       f"must be < the base model's max positions (LMConfig.max_seq_len={max_positions})")  # fmt: skip

    def adapt_ratio(self, length: int, max_positions: int) -> int:
        """Upstream "adapt-N": the smallest training ratio r > 0 with ``(max_positions - W) * r + W >= length + N``;
        the largest ratio if none qualifies."""
        m = _ADAPT.match(str(self.ratio_mix))
        extra = int(m.group(1)) if m else 0
        candidates = sorted(r for r in self.train_ratios if r > 0)
        if not candidates:
            return max(self.train_ratios)
        for r in candidates:
            if (max_positions - self.window) * r + self.window >= length + extra:
                return r
        return candidates[-1]

    def memory_size(self, n_tokens: int, ratio: int | None = None) -> int:
        """Cached K/V entries per layer after ``n_tokens`` tokens with one fixed ratio (sink + beacons + raw).

        v2: ``floor(N/W)·W/r + (N mod W) + floor((N mod W)/r)``; v1: ``floor(N/W)·W/r + (N mod W)``; ratio 0 keeps
        every token; plus the sink once the first window has completed.
        """
        r = self.ratio if ratio is None else ratio
        W = self.window
        full, rest = divmod(n_tokens, W)
        if r == 0:
            return n_tokens
        beacons = full * (W // r)
        raw = rest + (rest // r if self.scheme == "interleave" else 0)
        return beacons + raw + (self.sink_size if full > 0 else 0)

    # ---- presets ------------------------------------------------------------------------------------------
    @classmethod
    def v1(cls, **overrides) -> BeaconConfig:
        """The January 2024 paper: appended beacons, step-expansion, beacon q/k/v/o, window 1024."""
        kw = dict(scheme="step_expansion", beacon_params=("q", "k", "v", "o"), ratio=8,
                  train_ratios=(2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 8, 8, 16, 16, 32, 32, 64, 128))  # fmt: skip
        return cls(**(kw | overrides))

    @classmethod
    def v2(cls, **overrides) -> BeaconConfig:
        """The ICLR 2025 version: interleaved beacons, full coverage, beacon q/k/v, pretraining mix 2..32."""
        return cls(**(dict(scheme="interleave", ratio=8) | overrides))

    @classmethod
    def llama3(cls, **overrides) -> BeaconConfig:
        """v2 as trained for Llama-3-8B: window 1024 with a one-token sink."""
        return cls.v2(**(dict(sink_size=1, embed_init=128_001) | overrides))


# ---------------------------------------------------------------------------------------------------------------
# Chunk layout: where the raw tokens and beacons of one chunk go (pure functions)
# ---------------------------------------------------------------------------------------------------------------
class ChunkLayout(NamedTuple):
    """Slots of one chunk of ``T`` raw-token places, per example. ``n`` raw tokens are real, appended to a window that
    already holds ``filled`` raw tokens (``filled + n <= W``).

    is_beacon, valid: [B, U]. token_index [B, U]: the chunk raw token (0..T-1) a raw slot holds. widx [B, U]: the
    window index (0..W-1) of a raw slot's token. reach [B, U]: for step-expansion masks, the last window raw index a
    slot may see (its own for raw slots, ``(i + 1) * r - 1`` for beacon ``i``); beacon [B, U]: the beacon's number
    in its window. raw_slot [B, T]: the slot of each raw token. completes [B]: the window is full after this chunk.
    """

    is_beacon: jax.Array
    valid: jax.Array
    token_index: jax.Array
    widx: jax.Array
    reach: jax.Array
    beacon: jax.Array
    raw_slot: jax.Array
    completes: jax.Array


def chunk_layout(
    cfg: BeaconConfig, n_tokens: int, n_B: Int[Array, " B"], filled_B: Int[Array, " B"], ratio_B: Int[Array, " B"],
    ratios: tuple[int, ...] | None = None,
) -> ChunkLayout:
    """Interleave (v2): with ``a = filled mod r`` raw tokens of the current group already seen, slot ``u`` is a
    beacon iff ``(u + a) mod (r + 1) == r`` (upstream's ``i mod (r+1) == r - rem``). Step-expansion (v1): ``T`` raw
    slots, then ``W / r_min`` beacon slots that are real only in the chunk that completes the window. ``ratios``:
    the ratios ``ratio_B`` can take (static; default ``cfg.ratios``), which fix the slot count."""
    T, W = n_tokens, cfg.window
    U = cfg.chunk_slots(T, ratios)
    u_1U = jnp.arange(U, dtype=jnp.int32)[None, :]
    t_1T = jnp.arange(T, dtype=jnp.int32)[None, :]
    n, filled, r = n_B[:, None], filled_B[:, None], ratio_B[:, None]
    completes_B = (n_B > 0) & (filled_B + n_B == W)
    r_safe = jnp.maximum(r, 1)
    if cfg.scheme == "interleave":
        a = jnp.where(r > 0, filled % r_safe, 0)
        j = u_1U + a
        grp = j // (r_safe + 1)
        is_beacon = (r > 0) & (j % (r_safe + 1) == r_safe)
        t = jnp.where(r > 0, j - grp - a, u_1U)  # raw: its chunk index; beacon: raw tokens before it in the chunk
        valid = jnp.where(is_beacon, t <= n, t < n)
        widx = filled + t - is_beacon.astype(jnp.int32)  # a beacon's widx: the raw token it follows
        beacon = jnp.where(is_beacon, (filled + t) // r_safe - 1, 0)
        reach = widx
        raw_slot = jnp.where(r > 0, t_1T + (a + t_1T) // r_safe, t_1T)
    else:
        is_beacon = u_1U >= T
        q = u_1U - T
        valid = jnp.where(is_beacon, completes_B[:, None] & (r > 0) & (q < W // r_safe), u_1U < n)
        t = jnp.where(is_beacon, 0, u_1U)
        widx = filled + t
        beacon = jnp.where(is_beacon, q, 0)
        reach = jnp.where(is_beacon, (q + 1) * r - 1, widx)
        raw_slot = jnp.broadcast_to(t_1T, (n_B.shape[0], T))
    B = n_B.shape[0]
    full = lambda x: jnp.broadcast_to(x, (B, U))
    return ChunkLayout(
        is_beacon=full(is_beacon), valid=full(valid), token_index=full(jnp.clip(t, 0, T - 1) * ~is_beacon),
        widx=full(widx), reach=full(reach), beacon=full(beacon), raw_slot=jnp.broadcast_to(raw_slot, (B, T)),
        completes=completes_B,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Beacon attention layer
# ---------------------------------------------------------------------------------------------------------------
class KeyMask(NamedTuple):
    """What the queries of a chunk may see among ``S`` keys ``[sink; memory; raw cache; chunk]``.

    Interleave: ``order`` masks (causal in slot order, invalid keys have segment -1); ``dense`` is None.
    Step-expansion: only ``dense`` [B, U, S], a boolean mask (not expressible as positions + segments).
    """

    q_order: jax.Array | None  # [B, U]
    kv_order: jax.Array | None  # [B, S]
    kv_segment: jax.Array | None  # [B, S]
    dense: jax.Array | None  # [B, U, S] bool


class BeaconAttention(nnx.Module):
    """The beacon-specific projections of one attention layer (copies of the base ones) and its attention call.

    Beacon rows use ``q_proj``/``k_proj``/``v_proj`` (and ``o_proj`` if listed in ``cfg.beacon_params``) of this
    module, raw rows the base ``Attention``'s, which is passed at call time (it is not stored here, so no variable is
    shared between modules). RoPE, the softmax and the remaining weights are the base model's.
    """

    def __init__(self, base: Attention, cfg: BeaconConfig):
        self.names = cfg.beacon_params
        copy = lambda var, *logical: beacon_param(jnp.copy(var[...]), *logical)
        for name in self.names:
            heads = "kv_heads" if name in ("k", "v") else "heads"
            logical = ("heads", "head_dim", "embed") if name == "o" else ("embed", heads, "head_dim")
            setattr(self, f"{name}_proj", copy(getattr(base, f"{name}_proj"), *logical))
            if name in ("q", "k", "v") and base.cfg.qkv_bias:
                setattr(self, f"{name}_bias", copy(getattr(base, f"{name}_bias"), heads, "head_dim"))
            if name == "o" and base.cfg.o_bias:
                self.o_bias = copy(base.o_bias, "embed")

    def _proj(self, base: Attention, name: str, x_BUD, is_beacon_BU):
        """Projection ``name`` (q, k, v) of every row: the beacon weights on beacon rows, the base ones elsewhere."""
        dt = x_BUD.dtype
        kv = name in ("k", "v")
        spec = "BUD,DKP->BUKP" if kv else "BUD,DHP->BUHP"
        out = ("act_batch", None, "act_kv_heads" if kv else "act_heads", "act_head_dim")

        def apply(owner):
            y = sharding.einsum(spec, x_BUD, sharding.read(getattr(owner, f"{name}_proj"), dt), out=out)
            if base.cfg.qkv_bias:
                y = y + sharding.read(getattr(owner, f"{name}_bias"), dt)[None, None]
            return y

        y_base = apply(base)
        if name not in self.names:
            return y_base
        return jnp.where(is_beacon_BU[:, :, None, None], apply(self), y_base)

    def __call__(
        self, base: Attention, x_BUD: Float[Array, "B U D"], is_beacon_BU: Bool[Array, "B U"],
        cache_k_BSKP: Float[Array, "B S K P"], cache_v_BSKP: Float[Array, "B S K P"],
        kv_pos_BS: Int[Array, "B _"], q_pos_BU: Int[Array, "B U"], mask: KeyMask,
    ) -> tuple[Float[Array, "B U D"], Float[Array, "B U K P"], Float[Array, "B U K P"]]:  # fmt: skip
        """``(y, k, v)``: the layer output and the chunk's new keys (before RoPE) and values, for the cache.

        ``cache_*`` hold the S cached entries (before RoPE); ``kv_pos`` are the RoPE positions of the S + U keys
        ``[cache; chunk]``, ``q_pos`` those of the queries.
        """
        q_BUHP = self._proj(base, "q", x_BUD, is_beacon_BU)
        k_BUKP = self._proj(base, "k", x_BUD, is_beacon_BU)
        v_BUKP = self._proj(base, "v", x_BUD, is_beacon_BU)
        inv_freq, scaling = rope_ops.rope_frequencies(base.cfg.head_dim, base.cfg.rope)
        k_all = jnp.concatenate([cache_k_BSKP.astype(k_BUKP.dtype), k_BUKP], axis=1)
        v_all = jnp.concatenate([cache_v_BSKP.astype(v_BUKP.dtype), v_BUKP], axis=1)
        k_all = rope_ops.apply_rope(k_all, kv_pos_BS, inv_freq, scaling)
        q_BUHP = rope_ops.apply_rope(q_BUHP, q_pos_BU, inv_freq, scaling)
        out_BUHP = _attend(q_BUHP, k_all, v_all, mask)
        dt = x_BUD.dtype
        out = ("act_batch", None, "act_embed")

        def project_out(owner):
            y = sharding.einsum("BUHP,HPD->BUD", out_BUHP, sharding.read(owner.o_proj, dt), out=out)
            return y + sharding.read(owner.o_bias, dt)[None, None] if base.cfg.o_bias else y

        y_BUD = project_out(base)
        if "o" in self.names:
            y_BUD = jnp.where(is_beacon_BU[:, :, None], project_out(self), y_BUD)
        return y_BUD, k_BUKP, v_BUKP


def _attend(q_BUHP, k_BSKP, v_BSKP, mask: KeyMask):
    """Softmax attention under ``mask``; batch and heads stay sharded (``sharding.shard_map``)."""
    q_spec = ("act_batch", None, "act_heads", None)
    kv_spec = ("act_batch", None, "act_kv_heads", None)
    if mask.dense is None:
        def local(q, k, v, q_order, kv_order, kv_seg):
            # Mask positions (slot order), not RoPE positions: causal in order, every valid cached key visible.
            return attention_ops.dot_product_attention(
                q, k, v, causal=True, q_positions=q_order, kv_positions=kv_order,
                q_segment_ids=jnp.zeros_like(q_order), kv_segment_ids=kv_seg,
            )  # fmt: skip

        fn = sharding.shard_map(
            local, in_specs=(q_spec, kv_spec, kv_spec, ("act_batch", None), ("act_batch", None), ("act_batch", None)),
            out_specs=q_spec,
        )  # fmt: skip
        return fn(q_BUHP, k_BSKP, v_BSKP, mask.q_order, mask.kv_order, mask.kv_segment)

    def local_dense(q, k, v, m):
        # Dense masked softmax in float32 (jax.nn's XLA path: f32 logits, GQA without repeating k/v).
        return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], implementation="xla")

    fn = sharding.shard_map(
        local_dense, in_specs=(q_spec, kv_spec, kv_spec, ("act_batch", None, None)), out_specs=q_spec
    )
    return fn(q_BUHP, k_BSKP, v_BSKP, mask.dense)
