"""Decoder-only language model whose layers follow a per-layer block-type pattern.

``LMConfig.block_pattern`` is cycled over the layers: ``("attention",)`` is a Llama-style transformer,
``("mamba2",)`` a Mamba-2 LM, ``("m2",)`` a causal Monarch Mixer LM, ``("mamba2", "mamba2", "attention")`` a hybrid.
The block types are the registry ``lcjax.models.blocks.BLOCKS``; each block is built from ``BlockDims`` and its own
mixer config: ``LMConfig.mixers[kind]`` (e.g. ``mixers={"mamba2": Mamba2Config(...)}``), or for attention the flat
attention fields (``LMConfig.attention``). Blocks share one calling convention, ``block(x_BLD, *, positions_BL,
segment_ids_BL, cache) -> (x_BLD, cache)`` and ``block.init_cache(batch, length, dtype)``; the trainer never needs to
know which types are inside.

Parameter names follow HF ``LlamaForCausalLM`` (``embed_tokens``, ``layers[i].self_attn.q_proj``, ``norm``,
``lm_head``) so ``lcjax.convert`` maps are one-to-one. With ``scan_layers=True`` the pattern's period is stacked
(``lcjax.layers.stack``) and applied with ``lax.scan``, which keeps compile time flat in depth.
Dimension key (lcjax/typing.py): B batch, L length, D model, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers import stack as stack_lib
from lcjax.layers.attention import AttentionConfig
from lcjax.layers.basic import Embedding, RMSNorm, normal_init
from lcjax.layers.mamba2 import Mamba2Config
from lcjax.models.blocks import BLOCKS, BlockDims
from lcjax.models.blocks.common import DTYPES, mixer_config_from_mapping
from lcjax.ops import rope as rope_ops
from lcjax.typing import Array, ArrayLike, Float, Int

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
BLOCK_TYPES = tuple(BLOCKS)  # the built-in block types (lcjax.models.blocks.BLOCKS is the registry)


class MixerConfigs(Mapping):
    """``LMConfig.mixers``: block type -> mixer config, immutable and hashable (so ``LMConfig`` stays a static jit
    argument). Built from any mapping; compares equal to a dict with the same items."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, kind: str) -> Any:
        return self._items[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"MixerConfigs({self._items!r})"


def _mixer_configs(mixers: Any) -> MixerConfigs:
    """Validate ``LMConfig.mixers``; values may be configs or mappings of their fields (config files)."""
    if not isinstance(mixers, Mapping):
        raise TypeError(f"LMConfig.mixers must be a mapping of block type -> mixer config, got {mixers!r}")
    out = {}
    for kind, value in mixers.items():
        name = f"LMConfig.mixers[{kind!r}]"
        checks.require(kind != "attention", f"{name}: attention is configured by LMConfig's own fields "
                       "(n_heads, n_kv_heads, head_dim, rope, window, attn_impl, ...), not by mixers")
        checks.require_choice("LMConfig.mixers key", kind, [k for k in BLOCKS if k != "attention"])
        cls = BLOCKS[kind].mixer_config
        if isinstance(value, Mapping):
            value = mixer_config_from_mapping(cls, value, name)
        elif not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__} (or a dict of its fields), got {value!r}")
        out[kind] = value
    return MixerConfigs(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Decoder LM hyper-parameters. Attention is configured by the flat fields (``n_heads`` .. ``attention_bias``,
    every HF family has them; ``attention`` assembles its ``AttentionConfig``); every other block type used in
    ``block_pattern`` takes its mixer config from ``mixers`` (a dict is accepted and stored as an immutable
    ``MixerConfigs``; values may be configs or dicts of their fields). Each block type checks its own config against
    the model (``lcjax.models.blocks``: ``Block.check``)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int = 1
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention)
    head_dim: int | None = None  # None -> d_model // n_heads
    mlp_dim: int = 0  # SwiGLU hidden width of attention and m2 blocks (>= 1 there; unused by mamba2 blocks)
    block_pattern: tuple[str, ...] = ("attention",)
    mixers: Mapping[str, Any] = MixerConfigs()  # block type -> mixer config, for every non-attention type used
    max_seq_len: int = 2048
    rope: rope_ops.RopeConfig = rope_ops.RopeConfig()
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (HF Llama); qkv_bias / o_bias override it per projection
    qkv_bias: bool | None = None  # None -> attention_bias (Qwen2: True with o_bias=False)
    o_bias: bool | None = None  # None -> attention_bias
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    window: int | None = None
    attn_impl: str = "auto"
    context_impl: str = "ring"  # context-parallel attention: "ring" or "allgather" (AttentionConfig.context_impl)
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            checks.require_int(f"LMConfig.{name}", getattr(self, name), min=1)
        n_kv = checks.require_optional_int("LMConfig.n_kv_heads", self.n_kv_heads, min=1)
        object.__setattr__(self, "n_kv_heads", self.n_heads if n_kv is None else n_kv)
        head_dim = checks.require_optional_int("LMConfig.head_dim", self.head_dim, min=1)
        if head_dim is None:
            checks.require(self.d_model >= self.n_heads, f"LMConfig.n_heads={self.n_heads} must be <= d_model="
                                                         f"{self.d_model} when head_dim is None")  # fmt: skip
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        checks.require_int("LMConfig.mlp_dim", self.mlp_dim, min=0)
        pattern = self.block_pattern
        if not isinstance(pattern, tuple):
            raise TypeError(f"LMConfig.block_pattern must be a tuple of block types, got {pattern!r}")
        checks.require(len(pattern) > 0, f"LMConfig.block_pattern=() must name at least one block type; allowed: "
                                         f"{tuple(BLOCKS)}")  # fmt: skip
        for kind in pattern:
            checks.require(isinstance(kind, str) and kind in BLOCKS,
                           f"LMConfig.block_pattern: unknown block type {kind!r}; allowed: {tuple(BLOCKS)}")
        checks.require(self.n_layers % len(pattern) == 0, f"LMConfig.n_layers={self.n_layers} must be a multiple of "
                                                          f"len(block_pattern)={len(pattern)}")  # fmt: skip
        if not isinstance(self.rope, rope_ops.RopeConfig):
            raise TypeError(f"LMConfig.rope must be a RopeConfig, got {self.rope!r}")
        checks.require_float("LMConfig.norm_eps", self.norm_eps, min=0.0, min_open=True)
        for name in ("tie_embeddings", "attention_bias", "qk_norm", "mlp_bias", "scan_layers", "remat"):
            checks.require_bool(f"LMConfig.{name}", getattr(self, name))
        for name in ("qkv_bias", "o_bias"):  # kept None (not resolved) so dataclasses.replace(attention_bias=) works
            if getattr(self, name) is not None:
                checks.require_bool(f"LMConfig.{name}", getattr(self, name))
        checks.require_optional_int("LMConfig.window", self.window, min=1)
        checks.require_str("LMConfig.attn_impl", self.attn_impl)
        checks.require_choice("LMConfig.context_impl", self.context_impl, ("ring", "allgather"))
        for name in ("dtype", "param_dtype"):
            checks.require_choice(f"LMConfig.{name}", getattr(self, name), DTYPES)
        object.__setattr__(self, "mixers", _mixer_configs(self.mixers))
        for kind in dict.fromkeys(pattern):  # each block type validates its own mixer config against the model
            checks.require(kind == "attention" or kind in self.mixers, f"LMConfig.mixers[{kind!r}]: a "
                           f"{BLOCKS[kind].mixer_config.__name__} is required for {kind!r} blocks")  # fmt: skip
            name = "LMConfig" if kind == "attention" else f"LMConfig.mixers[{kind!r}]"
            BLOCKS[kind].check(self.block_dims, self.mixer_config(kind), max_seq_len=self.max_seq_len, name=name)

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            rope=self.rope, qkv_bias=self.attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_bias=self.attention_bias if self.o_bias is None else self.o_bias, qk_norm=self.qk_norm,
            norm_eps=self.norm_eps, window=self.window, impl=self.attn_impl, context_impl=self.context_impl,
        )  # fmt: skip

    @property
    def block_dims(self) -> BlockDims:
        """The model-wide sizes every block is built from."""
        return BlockDims(d_model=self.d_model, norm_eps=self.norm_eps, mlp_dim=self.mlp_dim, mlp_bias=self.mlp_bias,
                         dtype=self.dtype, param_dtype=self.param_dtype)  # fmt: skip

    def mixer_config(self, kind: str) -> Any:
        """The mixer config of ``kind`` blocks: ``attention`` for attention, else ``mixers[kind]``."""
        return self.attention if kind == "attention" else self.mixers[kind]

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
        checks.require_choice("LMConfig.mamba2_preset: name", name, sorted(layers))
        mixer = Mamba2Config.preset(name)
        kw = dict(
            vocab_size=50_288, d_model=mixer.d_model, n_layers=layers[name], block_pattern=("mamba2",),
            mixers={"mamba2": mixer}, tie_embeddings=True, max_seq_len=1 << 20,
        )  # fmt: skip
        return cls(**(kw | overrides))


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
        dims = cfg.block_dims
        make = lambda kind, r: BLOCKS[kind](dims, cfg.mixer_config(kind), rngs=r)  # noqa: E731
        if cfg.scan_layers:
            n_periods = cfg.n_layers // len(cfg.block_pattern)
            self.layers = nnx.List(
                [stack_lib.stack(functools.partial(make, kind), n_periods, rngs=rngs) for kind in cfg.block_pattern]
            )
        else:
            self.layers = nnx.List([make(kind, rngs) for kind in cfg.layer_types()])
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        if not cfg.tie_embeddings:
            w_DV = normal_init(rngs.params(), {"w": (cfg.d_model, cfg.vocab_size)}, std=0.02, dtype=pd)["w"]
            self.lm_head = sharding.param(w_DV, "embed", "vocab")

    def __call__(
        self, tokens_BL: Int[ArrayLike, "B L"], *, positions_BL: Int[ArrayLike, "B L"] | None = None,
        segment_ids_BL: Int[ArrayLike, "B L"] | None = None, cache: LMCache | None = None,
    ) -> Float[Array, "B L V"] | tuple[Float[Array, "B L V"], LMCache]:  # fmt: skip
        """Logits ``[B, L, V]`` (float32); with a ``cache``, ``(logits, new_cache)``.

        ``segment_ids_BL`` mark packed documents (one meaning everywhere: a document is a run of equal positive ids,
        0 is padding, negative ids are refused); ``None`` makes every row one document. Positions default to
        restarting at 0 in every segment, or to continuing from ``cache.index`` when decoding.

        Token ids must lie in ``[0, vocab_size)``. Concrete ids (an eager call) are checked here (``ValueError``);
        so are concrete negative segment ids. Under a plain ``jax.jit`` the ids are tracers and pass unchecked: an
        out-of-range id is clamped by the embedding gather (JAX gather semantics), a silent wrong answer. To check
        under jit, wrap the function with ``lcjax.checks.checkify``:
        ``err, logits = jax.jit(checks.checkify(lambda m, t: m(t)))(model, tokens); err.throw()``.
        """
        cfg = self.cfg
        tokens_BL = jnp.asarray(tokens_BL)
        positions_BL = None if positions_BL is None else jnp.asarray(positions_BL)
        segment_ids_BL = None if segment_ids_BL is None else jnp.asarray(segment_ids_BL)
        checks.require(tokens_BL.ndim == 2 and jnp.issubdtype(tokens_BL.dtype, jnp.integer),
                       f"LM: tokens_BL must be an integer [batch, length] array, got "
                       f"{tokens_BL.dtype}{tokens_BL.shape}")  # fmt: skip
        B, L = tokens_BL.shape
        checks.require(B >= 1 and L >= 1, f"LM: tokens_BL must hold at least one token per row, got shape {(B, L)}")
        checks.require(cache is not None or L <= cfg.max_seq_len,
                       f"LM: sequence length {L} exceeds LMConfig.max_seq_len={cfg.max_seq_len}")  # fmt: skip
        for name, arr in (("positions_BL", positions_BL), ("segment_ids_BL", segment_ids_BL)):
            checks.require(arr is None or (arr.shape == (B, L) and jnp.issubdtype(arr.dtype, jnp.integer)),
                           f"LM: {name} must be an integer array of shape {(B, L)}, got "
                           f"{None if arr is None else f'{arr.dtype}{arr.shape}'}")  # fmt: skip
        checks.check_token_ids("LM: tokens_BL", tokens_BL, cfg.vocab_size)
        if segment_ids_BL is not None and checks.is_concrete(segment_ids_BL) and segment_ids_BL.size:
            low = int(np.min(np.asarray(segment_ids_BL)))
            checks.require(low >= 0, f"LM: segment_ids_BL must be >= 0 (0 = padding, positive = document id), got "
                                     f"min {low}")  # fmt: skip
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
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
                call = lambda b, x, c: b(x, **kw, cache=c)  # noqa: E731
                if cfg.remat:
                    call = jax.checkpoint(call)
                x_BLD, c = call(block, x_BLD, None if layer_caches is None else layer_caches[i])
                new_caches.append(c)

        logits_BLV = self.head(x_BLD)
        if cache is None:
            return logits_BLV
        return logits_BLV, LMCache(index=cache.index + L, layers=tuple(new_caches))

    def head(self, x_BLD: Float[Array, "B L D"], *, seq: str | None = "act_seq") -> Float[Array, "B L V"]:
        """Final norm, then the tied (``embed_tokens.attend``) or untied (``lm_head``) projection; float32 logits.

        ``seq``: the logical name of the length axis (``None`` when it is not the model's sequence, as for the
        beacon chunks of ``lcjax/models/beacon.py``)."""
        x_BLD = self.norm(x_BLD)
        if self.cfg.tie_embeddings:
            logits_BLV = self.embed_tokens.attend(x_BLD, seq=seq)
        else:
            w_DV = sharding.read(self.lm_head, x_BLD.dtype)
            logits_BLV = sharding.einsum("BLD,DV->BLV", x_BLD, w_DV, out=("act_batch", seq, "act_vocab"))
        return logits_BLV.astype(jnp.float32)

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
    vocab_size = model.cfg.vocab_size
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, rng=rng,
                        vocab_size=vocab_size)  # fmt: skip
    prompt_BL = check_prompt(prompt_BL, vocab_size)
    L = prompt_BL.shape[1]
    checks.require(L + max_new_tokens <= model.cfg.max_seq_len, f"generate: prompt {L} + max_new_tokens "
                   f"{max_new_tokens} exceeds max_seq_len={model.cfg.max_seq_len}")  # fmt: skip
    rng = jax.random.key(0) if rng is None else rng
    rules = sharding.current_rules()
    if sharding.axis_size("act_seq") > 1:  # one-token steps cannot be split over the sequence
        rules = dataclasses.replace(rules, act_seq=())
    with sharding.use_rules(rules):  # sharding.jit keys its cache on the active rules
        return _generate(model, prompt_BL, rng, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)


def check_prompt(prompt_BL: Any, vocab_size: int) -> jax.Array:
    """``prompt_BL`` as an int array of shape [batch >= 1, length >= 1] with ids in ``[0, vocab_size)``."""
    prompt_BL = jnp.asarray(prompt_BL)
    checks.require(prompt_BL.ndim == 2 and jnp.issubdtype(prompt_BL.dtype, jnp.integer),
                   f"generate: prompt must be an int [batch, length] array, got "
                   f"{prompt_BL.dtype}{prompt_BL.shape}")  # fmt: skip
    checks.require(prompt_BL.size > 0, f"generate: prompt must hold at least one token per row, got shape "
                                       f"{prompt_BL.shape}")  # fmt: skip
    checks.check_token_ids("generate: prompt", prompt_BL, vocab_size)
    return prompt_BL


def check_sampling_args(*, max_new_tokens: int, temperature: float, top_k: int | None, rng, vocab_size: int) -> None:
    """The argument checks every ``generate`` shares (``TypeError``/``ValueError`` naming the argument)."""
    checks.require_int("generate: max_new_tokens", max_new_tokens, min=1)
    checks.require_float("generate: temperature", temperature, min=0.0)
    checks.require_optional_int("generate: top_k", top_k, min=1, max=vocab_size)
    checks.require(temperature == 0 or rng is not None, "generate: rng is required when temperature > 0")


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


@sharding.jit(static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate(model, prompt_BL, rng, *, max_new_tokens, temperature, top_k):
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
