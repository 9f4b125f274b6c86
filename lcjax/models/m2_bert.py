"""M2-BERT: a BERT encoder whose attention is the Monarch Mixer sequence mixer and whose MLP is a block-diagonal GLU.

"Monarch Mixer", Fu et al. 2023, https://arxiv.org/abs/2310.12109; retrieval models: "Benchmarking and Building
Long-Context Retrieval Models with LoCo and M2-BERT", Saad-Falcon et al. 2024, https://arxiv.org/abs/2402.07440.
Checked against HazyResearch/m2 ``bert/src/bert_layers.py`` (``BertEmbeddings``, ``BertLayer``, ``BertPooler``,
``BertPredictionHeadTransform``) and the pretraining yamls in ``bert/yamls/pretrain/``.

``h = LN(word + token_type + position)`` (eps 1e-12), then per layer ``h ← GLU_LN(Mixer(h))`` (no residual around
the mixer), with ``lcjax.layers.monarch_mixer``. Heads: the MLM head ``decoder(LN(GELU(dense(h))))`` with the decoder
tied to the word embeddings (``attend``), and ``pooled = tanh(dense(masked_mean(h)))`` (upstream ``pool_all``, the
retrieval models' sentence embedding); ``mean_pool`` is the raw mask-aware mean. ``mask_padding=True`` (default)
fixes upstream's padding bug (the attention mask never reaches the mixer there); ``False`` reproduces it.
Parameter counts (``param_count``; encoder + embeddings, no heads) match the published sizes: 79.6M, 114.6M,
256.7M, 337.8M, and 86.8M / 108.6M for the 8k / 32k retrieval models (the 2k one comes to 81.35M).
Dropout (0.1 on embeddings and the GLU in pretraining) is not implemented. Dimension key: B batch, L length,
D model, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers import monarch_mixer as mm
from lcjax.layers.m2_filter import random_parts
from lcjax.typing import Array, Bool, Float, Int

ACT_BLD = ("act_batch", "act_seq", "act_embed")

PRESETS = {
    "80m": dict(d_model=768, d_ff=3072),
    "110m": dict(d_model=960, d_ff=3840),
    "260m": dict(d_model=1536, d_ff=6144),
    "341m": dict(d_model=1792, d_ff=7168),
    "80m-2k-retrieval": dict(d_model=768, d_ff=3072, max_position_embeddings=2048),
    "80m-8k-retrieval": dict(d_model=768, d_ff=3072, max_position_embeddings=8192),
    "80m-32k-retrieval": dict(d_model=768, d_ff=3072, max_position_embeddings=32768),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class M2BertConfig:
    d_model: int = 768
    d_ff: int = 3072
    n_layers: int = 12
    vocab_size: int = 30528  # bert-base-uncased's 30522, padded
    max_position_embeddings: int = 128
    type_vocab_size: int = 2
    l_max: int | None = None  # the long filter's length (upstream long_conv_l_max); default max_position_embeddings
    layer_norm_eps: float = 1e-12
    nblocks: int = 4
    filter_order: int = 128
    emb_dim: int = 5
    hyena_w: float = 10.0
    bidirectional: bool = True
    residual_long_conv: bool = True
    training_additions: bool = False
    dim_linear: str = "blockdiag"
    conv_impl: str = "jnp_fft"
    mask_padding: bool = True
    pooler: bool = True
    mlm_head: bool = True
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("d_model", "d_ff", "n_layers", "vocab_size", "max_position_embeddings", "type_vocab_size",
                     "nblocks", "filter_order", "emb_dim"):  # fmt: skip
            checks.require_int(f"M2BertConfig.{name}", getattr(self, name), min=1)
        checks.require_optional_int("M2BertConfig.l_max", self.l_max, min=self.max_position_embeddings)  # a tap each
        checks.require_float("M2BertConfig.layer_norm_eps", self.layer_norm_eps, min=0.0, min_open=True)
        checks.require_float("M2BertConfig.hyena_w", self.hyena_w)
        for name in ("bidirectional", "residual_long_conv", "training_additions", "mask_padding", "pooler", "mlm_head"):
            checks.require_bool(f"M2BertConfig.{name}", getattr(self, name))
        checks.require_int("M2BertConfig.pad_token_id", self.pad_token_id, min=0, max=self.vocab_size - 1)
        self.sequence_mixer_config()
        self.dimension_mixer_config()

    @classmethod
    def preset(cls, name: str, **overrides) -> M2BertConfig:
        """``"80m" | "110m" | "260m" | "341m" | "80m-{2k,8k,32k}-retrieval"``."""
        checks.require_choice("M2BertConfig.preset: name", name, sorted(PRESETS))
        return cls(**(PRESETS[name] | overrides))

    @classmethod
    def tiny(cls, **overrides) -> M2BertConfig:
        """For tests: d=32, I=64, 2 layers, L=16, order 8, emb 5, vocab 64."""
        base = dict(d_model=32, d_ff=64, n_layers=2, vocab_size=64, max_position_embeddings=16, filter_order=8)
        return cls(**(base | overrides))

    def sequence_mixer_config(self) -> mm.M2SequenceMixerConfig:
        return mm.M2SequenceMixerConfig(
            d_model=self.d_model, l_max=self.l_max or self.max_position_embeddings, bidirectional=self.bidirectional,
            residual_long_conv=self.residual_long_conv, emb_dim=self.emb_dim, filter_order=self.filter_order,
            hyena_w=self.hyena_w, training_additions=self.training_additions, conv_impl=self.conv_impl,
            linear_init="bert",
        )  # fmt: skip

    def dimension_mixer_config(self) -> mm.M2DimensionMixerConfig:
        return mm.M2DimensionMixerConfig(d_model=self.d_model, d_ff=self.d_ff, nblocks=self.nblocks,
                                         linear=self.dim_linear, layer_norm_eps=self.layer_norm_eps,
                                         linear_init="bert")  # fmt: skip

    def param_count(self) -> int:
        """Encoder + embeddings (no pooler or MLM head), blockdiag MLP, from the module structure."""
        checks.require(self.dim_linear == "blockdiag",
                       "M2BertConfig.param_count: the closed form covers dim_linear='blockdiag' only")
        d, f, o, e = self.d_model, self.d_ff, self.filter_order, self.emb_dim
        lm = self.l_max or self.max_position_embeddings
        mlp_rev = 2 if self.bidirectional else 1
        filt = d + e * lm + mlp_rev * (e * o + o + 2 * (o * o + o) + o * d) + o
        layer = (3 * d * d + 3 * d) + (d * d + d) + 12 * d + filt * (2 if self.residual_long_conv else 1)
        layer += 3 * f * d // self.nblocks + d + 2 * d + (2 * d if self.training_additions else 0)
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
        return self.n_layers * layer + emb


class M2BertEmbeddings(nnx.Module):
    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.d_model
        shapes = [(cfg.vocab_size, D), (cfg.max_position_embeddings, D), (cfg.type_vocab_size, D)]
        word, pos, tok = random_parts(rngs.params(), [(s, "normal", 0.02) for s in shapes])  # HF post_init
        self.word_embeddings = sharding.param(word.at[cfg.pad_token_id].set(0), "vocab", "embed")  # padding_idx row
        self.position_embeddings = sharding.param(pos, None, "embed")
        self.token_type_embeddings = sharding.param(tok, None, "embed")
        self.layernorm = sharding.param(jnp.ones((D,)), "embed")
        self.layernorm_bias = sharding.param(jnp.zeros((D,)), "embed")

    def __call__(self, input_ids_BL, token_type_ids_BL) -> jax.Array:
        L = input_ids_BL.shape[1]
        out = sharding.pspec(*ACT_BLD) if sharding.mesh_active() else None
        h_BLD = self.word_embeddings[...].at[input_ids_BL].get(out_sharding=out)
        h_BLD = h_BLD + self.token_type_embeddings[...].at[token_type_ids_BL].get(out_sharding=out)
        h_BLD = h_BLD + mm.act_param(self.position_embeddings[...][:L], 3, "act_embed")
        return mm.layer_norm(h_BLD, self.layernorm[...], self.layernorm_bias[...], self.cfg.layer_norm_eps)


class M2BertLayer(nnx.Module):
    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.mixer = mm.M2SequenceMixer(cfg.sequence_mixer_config(), rngs=rngs)
        self.mlp = mm.M2DimensionMixer(cfg.dimension_mixer_config(), rngs=rngs)

    def __call__(self, h_BLD, mask_BL):
        return self.mlp(self.mixer(h_BLD, mask_BL=mask_BL))


def mean_pool(h_BLD: Float[Array, "B L D"], attention_mask_BL: Bool[Array, "B L"] | Int[Array, "B L"]
              ) -> Float[Array, "B D"]:  # fmt: skip
    """Mean of ``h`` over real tokens only (``attention_mask`` 1 = real)."""
    w_BL = attention_mask_BL.astype(h_BLD.dtype)
    return jnp.einsum("bld,bl->bd", h_BLD, w_BL) / jnp.sum(w_BL, axis=1, keepdims=True)


class M2Bert(nnx.Module):
    """``__call__(input_ids_BL, *, attention_mask_BL=None, token_type_ids_BL=None) -> h_BLD``; heads below."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.d_model
        self.embeddings = M2BertEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([M2BertLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        pool_w, head_w = random_parts(rngs.params(), [((D, D), "normal", 0.02)] * 2)  # HF post_init, zero biases
        self.pooler = sharding.param(pool_w, "embed", None) if cfg.pooler else None
        self.pooler_bias = sharding.param(jnp.zeros((D,)), None) if cfg.pooler else None
        if cfg.mlm_head:
            self.transform = sharding.param(head_w, "embed", None)
            self.transform_bias = sharding.param(jnp.zeros((D,)), None)
            self.transform_layernorm = sharding.param(jnp.ones((D,)), "embed")
            self.transform_layernorm_bias = sharding.param(jnp.zeros((D,)), "embed")
            self.decoder_bias = sharding.param(jnp.zeros((cfg.vocab_size,)), "vocab")

    def __call__(
        self, input_ids_BL: Int[Array, "B L"], *,
        attention_mask_BL: Bool[Array, "B L"] | Int[Array, "B L"] | None = None,
        token_type_ids_BL: Int[Array, "B L"] | None = None,
    ) -> Float[Array, "B L D"]:  # fmt: skip
        cfg = self.cfg
        L = input_ids_BL.shape[1]
        checks.require(1 <= L <= cfg.max_position_embeddings, f"M2Bert: input length {L} must be in "
                       f"[1, max_position_embeddings={cfg.max_position_embeddings}]")  # fmt: skip
        checks.check_token_ids("M2Bert: input_ids_BL", input_ids_BL, cfg.vocab_size)
        if token_type_ids_BL is not None:
            checks.check_token_ids("M2Bert: token_type_ids_BL", token_type_ids_BL, cfg.type_vocab_size)
        if token_type_ids_BL is None:
            token_type_ids_BL = jnp.zeros_like(input_ids_BL)
        mask_BL = None
        if attention_mask_BL is not None and cfg.mask_padding:
            mask_BL = attention_mask_BL.astype(bool)
        h_BLD = sharding.shard(self.embeddings(input_ids_BL, token_type_ids_BL), *ACT_BLD)
        for layer in self.layers:
            h_BLD = layer(h_BLD, mask_BL)
        return h_BLD

    def mlm_logits(self, h_BLD: Float[Array, "B L D"]) -> Float[Array, "B L V"]:
        """``BertLMPredictionHead``: ``LN(GELU(dense(h))) @ word_embeddingsᵀ + bias`` (LN eps 1e-12)."""
        checks.require(self.cfg.mlm_head, "M2Bert.mlm_logits: the model was built with mlm_head=False")
        t_BLD = mm._einsum("BLD,DE->BLE", h_BLD, self.transform[...], out=ACT_BLD)
        t_BLD = t_BLD + mm.act_param(self.transform_bias[...], 3, "act_embed")
        t_BLD = mm.layer_norm(jax.nn.gelu(t_BLD, approximate=False), self.transform_layernorm[...],
                              self.transform_layernorm_bias[...], 1e-12)  # fmt: skip
        logits = mm._einsum("BLD,VD->BLV", t_BLD, self.embeddings.word_embeddings[...],
                            out=("act_batch", "act_seq", "act_vocab"))  # fmt: skip
        return logits + mm.act_param(self.decoder_bias[...], 3, "act_vocab")

    def pooled(self, h_BLD: Float[Array, "B L D"], attention_mask_BL: Bool[Array, "B L"] | Int[Array, "B L"]
               ) -> Float[Array, "B D"]:  # fmt: skip
        """``BertPooler`` with ``pool_all``: ``tanh(dense(mean_pool(h, mask)))`` (the retrieval sentence embedding)."""
        checks.require(self.cfg.pooler, "M2Bert.pooled: the model was built with pooler=False")
        m_BD = mean_pool(h_BLD, attention_mask_BL)
        p_BD = mm._einsum("BD,DE->BE", m_BD, self.pooler[...], out=("act_batch", None))
        return jnp.tanh(p_BD + mm.act_param(self.pooler_bias[...], 2, None))

    def embed(self, input_ids_BL: Int[Array, "B L"], attention_mask_BL: Bool[Array, "B L"] | Int[Array, "B L"],
              token_type_ids_BL: Int[Array, "B L"] | None = None) -> Float[Array, "B D"]:  # fmt: skip
        """Sentence embedding for retrieval: ``pooled(self(ids, mask), mask)``; padding never changes it."""
        h_BLD = self(input_ids_BL, attention_mask_BL=attention_mask_BL, token_type_ids_BL=token_type_ids_BL)
        return self.pooled(h_BLD, attention_mask_BL)
