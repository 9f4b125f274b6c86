"""Grouped-query self-attention with RoPE and a KV cache (the Llama attention block).

GQA: Ainslie et al. 2023, https://arxiv.org/abs/2305.13245. Checked against HF transformers 5.23.0
``models/llama/modeling_llama.py`` (``LlamaAttention``). The math lives in ``lcjax.ops.attention``; this module holds
the projections, RoPE and the cache bookkeeping. ``qk_norm`` (HF ``Qwen3Attention``): an RMSNorm over the head dim
on q and k after the projections, before RoPE.

With a sliding ``window`` the cache may be a ``RingKVCache`` of ``window`` slots (``init_cache`` picks it when the
requested length exceeds the window): a chunk attends to the ring as it was plus its own keys, then its last
``window`` entries overwrite the oldest slots (the t-th token consumed goes to slot t mod window). A query never
needs a key more than ``window - 1`` positions back, so this is exact and decoding memory is O(window) (Mistral,
Jiang et al. 2023, https://arxiv.org/abs/2310.06825, "rolling buffer cache").

Masks come from positions and segment ids only (``lcjax.ops.attention``): packed documents are expressed with
segment ids, and empty cache slots carry segment id ``EMPTY_SEGMENT`` so no query ever attends to them.
Under a mesh the op runs inside ``sharding.shard_map``: batch and heads stay sharded. With a context axis (rules
preset ``context_parallel``) the layer runs ring or all-gather attention over the sequence shards
(``AttentionConfig.context_impl``, ``lcjax.ops.context_parallel``); otherwise queries keep the ``act_seq`` sharding
and keys/values are gathered along the sequence (``act_kv_seq``).
Dimension key (lcjax/typing.py): B batch, L length, S cache length, D model, H heads, K kv heads, P head dim.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers.basic import normal_init, rms_norm
from lcjax.ops import attention as attention_ops
from lcjax.ops import context_parallel
from lcjax.ops import rope as rope_ops
from lcjax.ops import segments
from lcjax.typing import Array, Float, Int

EMPTY_SEGMENT = -1  # internal: the segment id of empty cache slots (no query has it; never user input)
_KV_NAMES = ("act_batch", "act_kv_seq", "act_kv_heads", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: rope_ops.RopeConfig = rope_ops.RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    norm_eps: float = 1e-6  # epsilon of the qk norms
    causal: bool = True
    window: int | None = None
    impl: str = "auto"
    context_impl: str = "ring"  # under context parallelism: "ring" (memory O(L/n)) or "allgather" (see ops.context_parallel)

    def __post_init__(self):
        name = "AttentionConfig."
        for field in ("d_model", "n_heads", "n_kv_heads", "head_dim"):
            checks.require_int(name + field, getattr(self, field), min=1)
        checks.require(self.n_heads % self.n_kv_heads == 0,
                       f"{name}n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")  # fmt: skip
        checks.require(self.head_dim % 2 == 0, f"{name}head_dim={self.head_dim} must be even (RoPE)")
        checks.require(isinstance(self.rope, rope_ops.RopeConfig),
                       f"{name}rope must be a RopeConfig, got {type(self.rope).__name__}")  # fmt: skip
        for field in ("qkv_bias", "o_bias", "qk_norm", "causal"):
            checks.require_bool(name + field, getattr(self, field))
        checks.require_float(name + "norm_eps", self.norm_eps, min=0.0, min_open=True)
        checks.require_optional_int(name + "window", self.window, min=1)
        checks.require_choice(name + "impl", self.impl, tuple(i.value for i in attention_ops.Impl))
        checks.require_choice(name + "context_impl", self.context_impl, ("ring", "allgather"))

    def check_mesh(self) -> None:
        """The heads divide the mesh axes that shard them (``ValueError`` naming the field and the axis size)."""
        for field, logical in (("n_heads", "heads"), ("n_kv_heads", "kv_heads"), ("n_heads", "act_heads"),
                               ("n_kv_heads", "act_kv_heads")):  # fmt: skip
            n, size = getattr(self, field), sharding.axis_size(logical)
            checks.require(n % size == 0, f"AttentionConfig.{field}={n} must be divisible by the size {size} of the "
                           f"mesh axes {sharding.mesh_axes(logical)} that shard {logical!r} (the tensor axis under "
                           "tensor parallelism); choose a tensor axis size that divides it")  # fmt: skip


class KVCache(NamedTuple):
    """Keys (after RoPE), values, and per-slot positions and segment ids; ``index`` = slots filled so far."""

    k_BSKP: jax.Array
    v_BSKP: jax.Array
    positions_BS: jax.Array
    segment_ids_BS: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, batch: int, length: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        """An empty cache; under a mesh it is sharded like the keys it will hold (batch and kv heads)."""
        zeros = sharding.shard(jnp.zeros((batch, length, n_kv_heads, head_dim), dtype), *_KV_NAMES)
        slots = lambda fill: sharding.shard(jnp.full((batch, length), fill, jnp.int32), *_KV_NAMES[:2])
        return cls(k_BSKP=zeros, v_BSKP=zeros, positions_BS=slots(0), segment_ids_BS=slots(EMPTY_SEGMENT),
                   index=jnp.zeros((), jnp.int32))  # fmt: skip

    def update(self, k_BLKP, v_BLKP, positions_BL, segment_ids_BL) -> KVCache:
        """Write ``L`` new entries at ``[index, index + L)``."""
        L, S = k_BLKP.shape[1], self.k_BSKP.shape[1]
        if L > S:
            raise ValueError(f"KVCache.update: {L} new tokens do not fit a cache of length {S}")
        try:
            index = int(self.index)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            index = None  # traced: the caller (e.g. ``generate``) checks the length statically
        if index is not None and index + L > S:
            raise ValueError(f"KVCache.update: index {int(self.index)} + {L} new tokens exceeds cache length {S}")
        def put(buf, new):
            new = sharding.shard(new.astype(buf.dtype), *_KV_NAMES[: buf.ndim])  # the buffer's sharding
            return jax.lax.dynamic_update_slice_in_dim(buf, new, self.index, axis=1)

        return KVCache(
            put(self.k_BSKP, k_BLKP), put(self.v_BSKP, v_BLKP), put(self.positions_BS, positions_BL),
            put(self.segment_ids_BS, segment_ids_BL), self.index + L,
        )  # fmt: skip


class RingKVCache(NamedTuple):
    """A sliding-window cache of ``W`` slots: the ``t``-th token consumed lives in slot ``t mod W`` (``index`` =
    tokens consumed so far; positions are stored per slot). Same fields as ``KVCache``; empty slots carry
    ``EMPTY_SEGMENT``."""

    k_BSKP: jax.Array
    v_BSKP: jax.Array
    positions_BS: jax.Array
    segment_ids_BS: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, batch: int, window: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> RingKVCache:
        return cls(*KVCache.init(batch, window, n_kv_heads, head_dim, dtype))

    def update(self, k_BLKP, v_BLKP, positions_BL, segment_ids_BL) -> RingKVCache:
        """Write the last ``min(L, W)`` of ``L`` new entries into slots ``(index + i) mod W`` (distinct slots)."""
        L, W = k_BLKP.shape[1], self.k_BSKP.shape[1]
        n = min(L, W)
        slots_N = (self.index + (L - n) + jnp.arange(n, dtype=jnp.int32)) % W

        def put(buf, new):
            new = sharding.shard(new[:, L - n:].astype(buf.dtype), *_KV_NAMES[: buf.ndim])
            return buf.at[:, slots_N].set(new)

        return RingKVCache(
            put(self.k_BSKP, k_BLKP), put(self.v_BSKP, v_BLKP), put(self.positions_BS, positions_BL),
            put(self.segment_ids_BS, segment_ids_BL), self.index + L,
        )  # fmt: skip


class HeadNorm(nnx.Module):
    """RMSNorm over the head dim of ``[..., P]`` (the q/k norms of HF ``Qwen3Attention``)."""

    def __init__(self, head_dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = sharding.param(jnp.ones((head_dim,), param_dtype), "head_dim")

    def __call__(self, x):
        return rms_norm(x, sharding.read(self.weight), self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.check_mesh()
        self.cfg = cfg
        D, H, K, P = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        shapes = {"q": (D, H, P), "k": (D, K, P), "v": (D, K, P), "o": (H, P, D)}
        w = normal_init(rngs.params(), shapes, std=0.02, dtype=param_dtype)  # HF Llama: N(0, initializer_range)
        self.q_proj = sharding.param(w["q"], "embed", "heads", "head_dim")
        self.k_proj = sharding.param(w["k"], "embed", "kv_heads", "head_dim")
        self.v_proj = sharding.param(w["v"], "embed", "kv_heads", "head_dim")
        self.o_proj = sharding.param(w["o"], "heads", "head_dim", "embed")
        if cfg.qkv_bias:
            self.q_bias = sharding.param(jnp.zeros((H, P), param_dtype), "heads", "head_dim")
            self.k_bias = sharding.param(jnp.zeros((K, P), param_dtype), "kv_heads", "head_dim")
            self.v_bias = sharding.param(jnp.zeros((K, P), param_dtype), "kv_heads", "head_dim")
        if cfg.o_bias:
            self.o_bias = sharding.param(jnp.zeros((D,), param_dtype), "embed")
        if cfg.qk_norm:
            self.q_norm = HeadNorm(P, eps=cfg.norm_eps, param_dtype=param_dtype)
            self.k_norm = HeadNorm(P, eps=cfg.norm_eps, param_dtype=param_dtype)

    def project_qkv(self, x_BLD, positions_BL):
        """q, k, v with RoPE applied to q and k."""
        dt = x_BLD.dtype
        act = lambda heads: ("act_batch", "act_seq", heads, "act_head_dim")
        q_BLHP = sharding.einsum("BLD,DHP->BLHP", x_BLD, sharding.read(self.q_proj, dt), out=act("act_heads"))
        k_BLKP = sharding.einsum("BLD,DKP->BLKP", x_BLD, sharding.read(self.k_proj, dt), out=act("act_kv_heads"))
        v_BLKP = sharding.einsum("BLD,DKP->BLKP", x_BLD, sharding.read(self.v_proj, dt), out=act("act_kv_heads"))
        if self.cfg.qkv_bias:
            q_BLHP = q_BLHP + sharding.read(self.q_bias, dt)[None, None]
            k_BLKP = k_BLKP + sharding.read(self.k_bias, dt)[None, None]
            v_BLKP = v_BLKP + sharding.read(self.v_bias, dt)[None, None]
        if self.cfg.qk_norm:
            q_BLHP, k_BLKP = self.q_norm(q_BLHP), self.k_norm(k_BLKP)
        q_BLHP = rope_ops.rope(q_BLHP, positions_BL, self.cfg.rope, head_dim=self.cfg.head_dim)
        k_BLKP = rope_ops.rope(k_BLKP, positions_BL, self.cfg.rope, head_dim=self.cfg.head_dim)
        return q_BLHP, k_BLKP, v_BLKP

    def attend(self, q_BLHP, k_BSKP, v_BSKP, q_pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS):
        """Attention over explicit keys/values (the op under ``shard_map`` when a mesh is active).

        When the mesh shards ``act_seq`` (context parallelism) and both lengths divide the context size, q and k/v
        stay sequence-sharded and ``cfg.context_impl`` runs: ring attention (K/V passed around the ring, memory
        O(L/n)) or all-gather attention (``lcjax.ops.context_parallel``). Otherwise k/v are gathered on
        ``act_kv_seq`` and ``cfg.impl`` runs on each device's queries.
        """
        cfg = self.cfg
        n = sharding.axis_size("act_seq")
        if n > 1 and q_BLHP.shape[1] % n == 0 and k_BSKP.shape[1] % n == 0:
            return context_parallel.context_parallel_attention(
                q_BLHP, k_BSKP, v_BSKP, q_positions=q_pos_BL, kv_positions=kv_pos_BS, q_segment_ids=q_seg_BL,
                kv_segment_ids=kv_seg_BS, causal=cfg.causal, window=cfg.window, strategy=cfg.context_impl,
            )  # fmt: skip

        def local(q, k, v, qp, kp, qs, ks):
            return attention_ops.dot_product_attention(
                q, k, v, causal=cfg.causal, q_positions=qp, kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks,
                window=cfg.window, impl=cfg.impl,
            )  # fmt: skip

        q_spec = ("act_batch", "act_seq", "act_heads", None)
        kv_spec = ("act_batch", "act_kv_seq", "act_kv_heads", None)
        fn = sharding.shard_map(
            local,
            in_specs=(q_spec, kv_spec, kv_spec, ("act_batch", "act_seq"), ("act_batch", "act_kv_seq"),
                      ("act_batch", "act_seq"), ("act_batch", "act_kv_seq")),
            out_specs=q_spec,
        )  # fmt: skip
        return fn(q_BLHP, k_BSKP, v_BSKP, q_pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, positions_BL: Int[Array, "B L"] | None = None,
        segment_ids_BL: Int[Array, "B L"] | None = None, cache: KVCache | RingKVCache | None = None,
    ) -> tuple[Float[Array, "B L D"], KVCache | RingKVCache | None]:  # fmt: skip
        """``(y, cache)``. Positions default to ``0..L-1`` (after ``cache.index`` when decoding), segments to one.

        ``segment_ids_BL`` (``lcjax.ops.segments``; negative ids are refused when concrete) may come in any order:
        context-parallel layouts permute rows, so the no-reuse rule is checked upstream, before the permutation.
        """
        checks.require(x_BLD.ndim == 3 and x_BLD.shape[-1] == self.cfg.d_model,
                       f"Attention: x_BLD must be [batch, length, AttentionConfig.d_model={self.cfg.d_model}], got "
                       f"shape {tuple(x_BLD.shape)}")  # fmt: skip
        self.cfg.check_mesh()
        B, L, _ = x_BLD.shape
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)  # one document, as at the LM
        segment_ids_BL = segments.check_segment_ids("Attention: segment_ids_BL", segment_ids_BL, shape=(B, L),
                                                    ordered=False)  # fmt: skip
        if positions_BL is None:
            start = 0 if cache is None else cache.index
            positions_BL = start + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        q_BLHP, k_BLKP, v_BLKP = self.project_qkv(x_BLD, positions_BL)
        if cache is None:
            out_BLHP = self.attend(q_BLHP, k_BLKP, v_BLKP, positions_BL, positions_BL, segment_ids_BL, segment_ids_BL)
        elif isinstance(cache, RingKVCache):  # the ring as it was + this chunk; the window mask does the rest
            cat = lambda old, new: jnp.concatenate([old.astype(new.dtype), new], axis=1)
            out_BLHP = self.attend(
                q_BLHP, cat(cache.k_BSKP, k_BLKP), cat(cache.v_BSKP, v_BLKP), positions_BL,
                cat(cache.positions_BS, positions_BL), segment_ids_BL, cat(cache.segment_ids_BS, segment_ids_BL),
            )  # fmt: skip
            cache = cache.update(k_BLKP, v_BLKP, positions_BL, segment_ids_BL)
        else:
            cache = cache.update(k_BLKP, v_BLKP, positions_BL, segment_ids_BL)
            out_BLHP = self.attend(
                q_BLHP, cache.k_BSKP.astype(q_BLHP.dtype), cache.v_BSKP.astype(q_BLHP.dtype), positions_BL,
                cache.positions_BS, segment_ids_BL, cache.segment_ids_BS,
            )  # fmt: skip
        dt = x_BLD.dtype
        y_BLD = sharding.einsum(
            "BLHP,HPD->BLD", out_BLHP, sharding.read(self.o_proj, dt), out=("act_batch", "act_seq", "act_embed")
        )
        if self.cfg.o_bias:
            y_BLD = y_BLD + sharding.read(self.o_bias, dt)[None, None]
        return y_BLD, cache

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> KVCache | RingKVCache:
        """A ``KVCache`` of ``length`` slots, or with a causal ``window < length`` a ``RingKVCache`` of ``window``."""
        cfg = self.cfg
        if cfg.window is not None and cfg.causal and cfg.window < length:
            return RingKVCache.init(batch, cfg.window, cfg.n_kv_heads, cfg.head_dim, dtype)
        return KVCache.init(batch, length, cfg.n_kv_heads, cfg.head_dim, dtype)
