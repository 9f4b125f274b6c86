"""Decoder-only language model whose layers follow a per-layer block-type pattern.

``LMConfig.block_pattern`` is cycled over the layers: ``("attention",)`` is a Llama-style transformer,
``("mamba2",)`` a Mamba-2 LM (``LMConfig.mamba2`` configures its mixer, ``lcjax/models/mamba2_block.py``),
``("m2",)`` a causal Monarch Mixer LM (``LMConfig.m2``, ``lcjax/models/m2_block.py``),
``("mamba2", "mamba2", "attention")`` a hybrid. Each block type is a residual block
class with one calling convention, ``block(x_BLD, *, positions_BL, segment_ids_BL, cache) -> (x_BLD, cache)``, and
``block.init_cache(batch, length, dtype)``; the trainer never needs to know which types are inside.

Parameter names follow HF ``LlamaForCausalLM`` (``embed_tokens``, ``layers[i].self_attn.q_proj``, ``norm``,
``lm_head``) so ``lcjax.convert`` maps are one-to-one. With ``scan_layers=True`` the pattern's period is stacked
(``lcjax.layers.stack``) and applied with ``lax.scan``, which keeps compile time flat in depth.
Dimension key (lcjax/typing.py): B batch, L length, D model, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import sharding
from lcjax.layers import stack as stack_lib
from lcjax.layers.attention import Attention, AttentionConfig
from lcjax.layers.basic import MLP, Embedding, RMSNorm, normal_init
from lcjax.layers.mamba2 import Mamba2Config
from lcjax.layers.monarch_mixer import M2SequenceMixerConfig
from lcjax.ops import rope as rope_ops
from lcjax.typing import Array, ArrayLike, Float, Int

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
BLOCK_TYPES = ("attention", "mamba2", "m2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int = 1
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_heads
    mlp_dim: int = 0  # SwiGLU hidden width; 0 -> no MLP in attention blocks is NOT allowed (validated)
    block_pattern: tuple[str, ...] = ("attention",)
    mamba2: Mamba2Config | None = None  # the mixer of "mamba2" blocks (required when the pattern has one)
    m2: M2SequenceMixerConfig | None = None  # the causal sequence mixer of "m2" blocks (ditto)
    max_seq_len: int = 2048
    rope: rope_ops.RopeConfig = rope_ops.RopeConfig()
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    window: int | None = None
    attn_impl: str = "auto"
    context_impl: str = "ring"  # context-parallel attention: "ring" or "allgather" (AttentionConfig.context_impl)
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads >= 1:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name}={value!r} must be a positive int")
        if not isinstance(self.block_pattern, tuple) or not self.block_pattern:
            raise ValueError(f"LMConfig.block_pattern={self.block_pattern!r} must be a non-empty tuple")
        for kind in self.block_pattern:
            if kind not in _block_classes():
                raise ValueError(f"LMConfig.block_pattern: unknown block type {kind!r}; allowed: {tuple(_block_classes())}")
        if self.n_layers % len(self.block_pattern):
            raise ValueError(
                f"LMConfig.n_layers={self.n_layers} must be a multiple of len(block_pattern)={len(self.block_pattern)}"
            )
        if "attention" in self.block_pattern:
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"LMConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
            if self.mlp_dim < 1:
                raise ValueError(f"LMConfig.mlp_dim={self.mlp_dim} must be >= 1 for attention blocks")
        if "mamba2" in self.block_pattern:
            if not isinstance(self.mamba2, Mamba2Config):
                raise ValueError(f"LMConfig.mamba2={self.mamba2!r}: a Mamba2Config is required for 'mamba2' blocks")
            if self.mamba2.d_model != self.d_model:
                raise ValueError(f"LMConfig.mamba2.d_model={self.mamba2.d_model} must equal d_model={self.d_model}")
        elif self.mamba2 is not None and not isinstance(self.mamba2, Mamba2Config):
            raise ValueError(f"LMConfig.mamba2={self.mamba2!r} must be a Mamba2Config or None")
        if "m2" in self.block_pattern:
            if not isinstance(self.m2, M2SequenceMixerConfig):
                raise ValueError(f"LMConfig.m2={self.m2!r}: an M2SequenceMixerConfig is required for 'm2' blocks")
            if self.m2.d_model != self.d_model or self.m2.bidirectional:
                raise ValueError(f"LMConfig.m2 must be causal (bidirectional=False) with d_model={self.d_model}")
            if self.m2.l_max < self.max_seq_len:
                raise ValueError(f"LMConfig.m2.l_max={self.m2.l_max} must be >= max_seq_len={self.max_seq_len}")
            if self.mlp_dim < 1:
                raise ValueError(f"LMConfig.mlp_dim={self.mlp_dim} must be >= 1 for m2 blocks")
        elif self.m2 is not None and not isinstance(self.m2, M2SequenceMixerConfig):
            raise ValueError(f"LMConfig.m2={self.m2!r} must be an M2SequenceMixerConfig or None")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"LMConfig.{name}={getattr(self, name)!r}; allowed: float32, bfloat16, float16, float64")
        if self.window is not None and self.window < 1:
            raise ValueError(f"LMConfig.window={self.window} must be >= 1 or None")
        if not self.norm_eps > 0:
            raise ValueError(f"LMConfig.norm_eps={self.norm_eps} must be > 0")

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            rope=self.rope, qkv_bias=self.attention_bias, o_bias=self.attention_bias, window=self.window,
            impl=self.attn_impl, context_impl=self.context_impl,
        )  # fmt: skip

    def layer_types(self) -> tuple[str, ...]:
        return tuple(self.block_pattern[i % len(self.block_pattern)] for i in range(self.n_layers))

    # ---- presets ----------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> LMConfig:
        """A few-thousand-parameter model for tests and CPU smoke runs."""
        kw = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=256)
        return cls(**(kw | overrides))

    @classmethod
    def llama3_8b(cls, **overrides) -> LMConfig:
        """Meta-Llama-3-8B shapes (8,030,261,248 parameters)."""
        kw = dict(
            vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14_336,
            max_seq_len=8192, rope=rope_ops.RopeConfig(theta=500_000.0), norm_eps=1e-5,
        )  # fmt: skip
        return cls(**(kw | overrides))

    @classmethod
    def llama32_1b(cls, **overrides) -> LMConfig:
        """Llama-3.2-1B shapes (1,235,814,400 parameters; tied embeddings, llama3 RoPE scaling)."""
        rope = rope_ops.RopeConfig(
            theta=500_000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )  # fmt: skip
        kw = dict(
            vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
            max_seq_len=131_072, rope=rope, tie_embeddings=True,
        )  # fmt: skip
        return cls(**(kw | overrides))

    @classmethod
    def mamba2_preset(cls, name: str, **overrides) -> LMConfig:
        """state-spaces/mamba2-{130m,370m,780m,1.3b,2.7b}: d_state 128, head_dim 64, expand 2, tied embeddings.

        Vocabulary 50277 padded to a multiple of 16 (50288 rows; override ``vocab_size`` for another padding).
        Parameter counts:
        130m 128,989,632; 370m 368,346,624; 780m 780,161,280; 1.3b 1,343,757,312; 2.7b 2,702,599,680.
        """
        layers = {"130m": 24, "370m": 48, "780m": 48, "1.3b": 48, "2.7b": 64}
        if name not in layers:
            raise ValueError(f"LMConfig.mamba2_preset: unknown name {name!r}; allowed: {sorted(layers)}")
        mixer = Mamba2Config.preset(name)
        kw = dict(
            vocab_size=50_288, d_model=mixer.d_model, n_layers=layers[name], block_pattern=("mamba2",), mamba2=mixer,
            tie_embeddings=True, max_seq_len=1 << 20,
        )  # fmt: skip
        return cls(**(kw | overrides))


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
class AttentionBlock(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (HF ``LlamaDecoderLayer``)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg.attention, param_dtype=pd, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg.d_model, cfg.mlp_dim, bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)

    def __call__(self, x_BLD, *, positions_BL, segment_ids_BL, cache=None):
        h_BLD, cache = self.self_attn(
            self.input_layernorm(x_BLD), positions_BL=positions_BL, segment_ids_BL=segment_ids_BL, cache=cache
        )
        x_BLD = x_BLD + h_BLD
        x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
        return sharding.shard(x_BLD, "act_batch", "act_seq", "act_embed"), cache

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        return self.self_attn.init_cache(batch, length, dtype)


@functools.cache
def _block_classes() -> dict[str, type[nnx.Module]]:
    """Block type name -> residual block class (constructor ``cls(cfg: LMConfig, *, rngs)``)."""
    from lcjax.models.m2_block import M2Block  # these import lcjax.layers only; late to keep lm.py importable first
    from lcjax.models.mamba2_block import Mamba2Block

    return {"attention": AttentionBlock, "mamba2": Mamba2Block, "m2": M2Block}


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class LMCache(NamedTuple):
    """``index``: tokens consumed so far; ``layers``: one cache per layer (or per stacked pattern position)."""

    index: jax.Array
    layers: tuple[Any, ...]


class LM(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, param_dtype=pd, rngs=rngs)
        classes = _block_classes()
        if cfg.scan_layers:
            n_periods = cfg.n_layers // len(cfg.block_pattern)
            self.layers = nnx.List(
                [stack_lib.stack(lambda r, k=kind: classes[k](cfg, rngs=r), n_periods, rngs=rngs)
                 for kind in cfg.block_pattern]
            )  # fmt: skip
        else:
            self.layers = nnx.List([classes[kind](cfg, rngs=rngs) for kind in cfg.layer_types()])
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        if not cfg.tie_embeddings:
            w_DV = normal_init(rngs.params(), {"w": (cfg.d_model, cfg.vocab_size)}, std=0.02, dtype=pd)["w"]
            self.lm_head = sharding.param(w_DV, "embed", "vocab")

    def __call__(
        self, tokens_BL: Int[ArrayLike, "B L"], *, positions_BL: Int[ArrayLike, "B L"] | None = None,
        segment_ids_BL: Int[ArrayLike, "B L"] | None = None, cache: LMCache | None = None,
    ) -> Float[Array, "B L V"] | tuple[Float[Array, "B L V"], LMCache]:  # fmt: skip
        """Logits ``[B, L, V]`` (float32); with a ``cache``, ``(logits, new_cache)``.

        ``segment_ids`` mark packed documents (tokens attend within their own id); positions default to restarting
        at 0 in every segment, or to continuing from ``cache.index`` when decoding.
        """
        cfg = self.cfg
        tokens_BL = jnp.asarray(tokens_BL)
        positions_BL = None if positions_BL is None else jnp.asarray(positions_BL)
        segment_ids_BL = None if segment_ids_BL is None else jnp.asarray(segment_ids_BL)
        if tokens_BL.ndim != 2 or not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
            raise ValueError(f"LM: tokens must be an integer [batch, length] array, got {tokens_BL.dtype}{tokens_BL.shape}")
        B, L = tokens_BL.shape
        if cache is None and L > cfg.max_seq_len:
            raise ValueError(f"LM: sequence length {L} exceeds LMConfig.max_seq_len={cfg.max_seq_len}")
        for name, arr in (("positions_BL", positions_BL), ("segment_ids_BL", segment_ids_BL)):
            if arr is not None and (arr.shape != (B, L) or not jnp.issubdtype(arr.dtype, jnp.integer)):
                raise ValueError(f"LM: {name} must be an integer array of shape {(B, L)}, got {arr.dtype}{arr.shape}")
        if segment_ids_BL is None:
            segment_ids_BL = jnp.zeros((B, L), jnp.int32)
        if positions_BL is None:
            if cache is not None:
                positions_BL = cache.index + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            else:
                positions_BL = rope_ops.positions_from_segments(segment_ids_BL)
        act = ("act_batch", "act_seq")
        segment_ids_BL = sharding.shard(segment_ids_BL.astype(jnp.int32), *act)
        positions_BL = sharding.shard(positions_BL.astype(jnp.int32), *act)
        x_BLD = self.embed_tokens(sharding.shard(tokens_BL, *act), dtype=jnp.dtype(cfg.dtype))
        x_BLD = sharding.shard(x_BLD, *act, "act_embed")
        kw = dict(positions_BL=positions_BL, segment_ids_BL=segment_ids_BL)

        layer_caches = None if cache is None else cache.layers
        if cfg.scan_layers:
            x_BLD, new_caches = self._scan_blocks(x_BLD, kw, layer_caches)
        else:
            new_caches = []
            for i, block in enumerate(self.layers):
                call = (lambda b, x, c: b(x, **kw, cache=c))
                if cfg.remat:
                    call = jax.checkpoint(call)
                x_BLD, c = call(block, x_BLD, None if layer_caches is None else layer_caches[i])
                new_caches.append(c)

        x_BLD = self.norm(x_BLD)
        if cfg.tie_embeddings:
            logits_BLV = self.embed_tokens.attend(x_BLD)
        else:
            logits_BLV = sharding.einsum(
                "BLD,DV->BLV", x_BLD, sharding.read(self.lm_head, x_BLD.dtype), out=(*act, "act_vocab")
            )
        logits_BLV = logits_BLV.astype(jnp.float32)
        if cache is None:
            return logits_BLV
        return logits_BLV, LMCache(index=cache.index + L, layers=tuple(new_caches))

    def _scan_blocks(self, x_BLD, kw, layer_caches):
        """One ``lax.scan`` over the stacked periods; each step applies every block of the pattern in order."""

        def body(period, x_BLD, caches):
            new = []
            for j, block in enumerate(period):
                x_BLD, c = block(x_BLD, **kw, cache=None if caches is None else caches[j])
                new.append(c)
            return x_BLD, None if caches is None else tuple(new)

        x_BLD, new_caches = stack_lib.scan(self.layers, body, x_BLD, layer_caches, remat=self.cfg.remat)
        return x_BLD, () if new_caches is None else new_caches

    def init_cache(self, batch: int, length: int, dtype=None) -> LMCache:
        """An empty cache for ``batch`` sequences of up to ``length`` tokens (prompt + generated)."""
        dtype = jnp.dtype(self.cfg.dtype) if dtype is None else dtype
        if self.cfg.scan_layers:
            n = self.cfg.n_layers // len(self.cfg.block_pattern)
            layers = tuple(
                jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), _first(blk).init_cache(batch, length, dtype))
                for blk in self.layers
            )
        else:
            layers = tuple(blk.init_cache(batch, length, dtype) for blk in self.layers)
        return LMCache(index=jnp.zeros((), jnp.int32), layers=layers)


def _first(stacked: nnx.Module) -> nnx.Module:
    """Layer 0 of a stacked module (for shapes of per-layer caches)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


# ---------------------------------------------------------------------------------------------------------------
# Generation and sizes
# ---------------------------------------------------------------------------------------------------------------
def generate(
    model: LM, prompt_BL: Int[ArrayLike, "B L"], *, max_new_tokens: int, temperature: float = 0.0,
    top_k: int | None = None, rng: jax.Array | None = None,
) -> Int[Array, "B N"]:  # fmt: skip
    """Greedy (``temperature=0``) or sampled continuation of equal-length prompts using the cache.

    Returns the ``max_new_tokens`` new tokens. Prefill runs the whole prompt at once; each new token is one cached
    decoding step, so the cost per token is independent of how many tokens came before for recurrent blocks and
    linear in the cache for attention blocks. Under context parallelism (a mesh sharding ``act_seq``) the whole
    generation runs with the sequence replicated; batch, FSDP and tensor sharding apply as configured.
    """
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, rng=rng,
                        vocab_size=model.cfg.vocab_size)  # fmt: skip
    prompt_BL = jnp.asarray(prompt_BL)
    B, L = prompt_BL.shape
    total = L + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"generate: prompt {L} + max_new_tokens {max_new_tokens} exceeds max_seq_len={model.cfg.max_seq_len}")
    rng = jax.random.key(0) if rng is None else rng
    rules = sharding.current_rules()
    if sharding.axis_size("act_seq") > 1:  # one-token steps cannot be split over the sequence
        rules = dataclasses.replace(rules, act_seq=())
    return _generate(model, prompt_BL, rng, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     rules=rules)  # fmt: skip


def check_sampling_args(*, max_new_tokens: int, temperature: float, top_k: int | None, rng, vocab_size: int) -> None:
    """The argument checks every ``generate`` shares (``ValueError`` naming the argument)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("generate: rng is required when temperature > 0")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"generate: top_k={top_k} must be in [1, vocab_size={vocab_size}]")


def sample_logits(
    logits_BV: Float[Array, "B V"], key: jax.Array, *, temperature: float, top_k: int | None = None
) -> Int[Array, "B"]:
    """Next tokens: argmax when ``temperature == 0``, else a draw from ``softmax(logits / T)`` (top-k truncated)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "rules"))
def _generate(model, prompt_BL, rng, *, max_new_tokens, temperature, top_k, rules):
    with sharding.use_rules(rules):  # static: the trace depends on the rules, so they key the jit cache
        return _generate_traced(model, prompt_BL, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k)  # fmt: skip


def _generate_traced(model, prompt_BL, rng, *, max_new_tokens, temperature, top_k):
    B, L = prompt_BL.shape
    pick = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

    cache = model.init_cache(B, L + max_new_tokens)
    logits_BLV, cache = model(prompt_BL, cache=cache)
    keys = jax.random.split(rng, max_new_tokens)
    first = pick(logits_BLV[:, -1], keys[0])

    def step(carry, key):
        token_B, cache = carry
        logits_B1V, cache = model(token_B[:, None], cache=cache)
        nxt = pick(logits_B1V[:, 0], key)
        return (nxt, cache), token_B

    (last, _), tokens_NB = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([tokens_NB.T, last[:, None]], axis=1)


def param_count(cfg: LMConfig) -> int:
    """Exact number of parameters, from shapes only (``jax.eval_shape``; no memory is allocated)."""
    abstract = jax.eval_shape(lambda: nnx.state(LM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(int(x.size) for x in jax.tree.leaves(abstract))
