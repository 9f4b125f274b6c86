"""Monarch Mixer (M2) layers: the sequence mixer of M2-BERT, its causal forms for decoder LMs, and the GLU MLP.

"Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", Fu et al. 2023, https://arxiv.org/abs/2310.12109.
Checked against HazyResearch/m2 ``bert/src/mm/monarch_mixer_sequence_mixer.py`` (``MonarchMixerSequenceMixing``),
``bert/src/bert_layers.py`` (``BertGatedLinearUnitMLP``) and ``bert/src/mm/blockdiag_linear.py``; the two-factor
``MonarchLinear`` follows HazyResearch/fly ``src/models/layers/monarch_linear.py``. The math lives in
``lcjax.ops.fftconv`` and ``lcjax.ops.monarch``; the filter in ``lcjax.layers.m2_filter``.

``M2SequenceMixer`` (u: ``(B, L, D)``), as released:

1. ``in_linear`` ``D → 3·E`` (E = D) with bias, split in this order into ``[x1 | x2 | v]``;
2. ``short_filter``: depthwise conv, width 3, *causal even in BERT*: ``y[t] = b + w0·x[t−2] + w1·x[t−1] + w2·x[t]``;
3. ``v ← v ⊙ x1``; ``y = longconv(v; k, k_rev) + D ⊙ v``; ``y ← y ⊙ x2``;
4. ``residual_long_conv``: ``y ← y + longconv(u; k2, k2_rev) + D2 ⊙ u`` (a second filter, on the mixer input);
5. ``out_linear`` ``E → D`` with bias. No nonlinearity, no residual or norm of its own (M2-BERT's layer is
   ``LN(GLU(Mixer(h)) + Mixer(h))``; the GLU's residual and post-LN live in ``M2DimensionMixer``).

**Padding (fixed here).** Upstream never applies ``attention_mask`` inside the mixer, so padding changes the outputs
of real tokens (HazyResearch/m2 #19, #42, #43). With ``mask_BL`` the mixer zeroes padded positions of ``u`` (before
``in_linear`` and the residual conv), of the projections (before the short conv, whose bias would otherwise leak)
and of ``v`` (before the long conv). Every filter is a function of the offset ``t − s`` only, so real tokens then get
exactly the outputs of the unpadded sequence. ``mask_BL=None`` is the upstream behaviour.

**Causal M2** (``CausalM2Mixer``, for decoder LMs): the same mixer with ``bidirectional=False``, where
``long_conv="fft"`` is (a) the zero-padded causal FFT conv (upstream's ``bidirectional=False`` path) and
``long_conv="causal_monarch"`` is (b) our implementation of the paper's causal Monarch parameterization
(``lcjax.ops.fftconv`` docstring: ``y = A⁻¹·causal_conv(A·v, A·k)`` with ``M = F_{2L}·A`` evaluating an
order-graded polynomial basis; learned unit lower-triangular ``A`` factors, one basis per mixer shared by all
channels and both long convs, zero-initialised so that (b) starts as exactly (a)). (b) matches the paper's theory
(Monarch evaluation/interpolation, Kronecker substitution, 2N padding, causality) — not any released code or
weights: M2-GPT was never released (m2 #7), its exact factor parameterisation, block sizes and which factors are
learned are unknown, and we fix the evaluation points to roots of unity (general points give ill-conditioned
Vandermonde blocks). (b) is not shift-invariant, so for ``L < l_max`` inputs are zero-padded on the right to
``l_max`` (causality makes that exact). Packed documents: ``segment_ids_BL`` follow ``lcjax.ops.segments`` (runs of
one positive id are documents, 0 is padding); ``segments_per_pass`` documents of every row are unpacked per pass into
rows of their own, as many passes as the batch needs, so every document of any count is computed exactly as if alone
and padding outputs 0. Positions are not needed: every filter depends on offsets only.

``M2DimensionMixer``: ``LN(wo(GELU(gated) ⊙ non_gated) + x)`` (post-LN, eps 1e-12) with ``gated_layers`` ``D → 2F``;
``linear="blockdiag"`` is the released ``BlockdiagLinear`` (*one* block-diagonal factor, 4 blocks, no permutation:
``gated`` reads only input dims ``[0, D/2)``), ``"monarch"`` the paper's two-factor Monarch (``P L P R``; mixes all
channels once the block size ``D/nb ≥ nb``; a documented deviation, no checkpoint uses it), ``"dense"`` Linears.
Dimension key (lcjax/typing.py): B batch, L length, D model, E inner (= D), F MLP hidden, W conv width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers.m2_filter import LINEAR_INITS, HyenaFilter, HyenaFilterConfig, linear_specs, random_parts
from lcjax.ops import fftconv as fftconv_ops
from lcjax.ops import monarch as monarch_ops
from lcjax.ops import segments
from lcjax.typing import Array, Bool, Float, Int

LONG_CONVS = ("fft", "causal_monarch")
DIM_LINEARS = ("blockdiag", "monarch", "dense")
ACT_BLD = ("act_batch", "act_seq", "act_embed")


def _einsum(spec: str, *operands, out) -> jax.Array:
    """``jnp.einsum`` at HIGHEST precision with the output sharding of the logical names ``out`` (if a mesh is set)."""
    kwargs = {"out_sharding": sharding.pspec(*out)} if sharding.mesh_active() else {}
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST, **kwargs)


def _reshape(x: jax.Array, shape: tuple[int, ...], out: tuple) -> jax.Array:
    """``x.reshape(shape)`` with the output sharding of the logical names ``out`` (if a mesh is set)."""
    kwargs = {"out_sharding": sharding.pspec(*out)} if sharding.mesh_active() else {}
    return jnp.reshape(x, shape, **kwargs)


def lead(x: jax.Array, ndim: int) -> jax.Array:
    """``x`` with leading unit axes up to rank ``ndim`` (explicit broadcasting: the tests raise on rank promotion)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def act_param(p: jax.Array, ndim: int, name: str | None) -> jax.Array:
    """A parameter broadcast against an activation of rank ``ndim`` whose last axis has logical name ``name``.

    Under FSDP a 1-D ``embed`` parameter is sharded over ``fsdp`` while the activation's batch already is, so it is
    resharded to the activation's layout first (Explicit meshes refuse one mesh axis on two dimensions).
    """
    return sharding.shard(lead(p, ndim), *([None] * (ndim - 1)), name)


def layer_norm(x: Float[Array, "*B D"], weight: Array, bias: Array, eps: float) -> Float[Array, "*B D"]:
    """``torch.nn.LayerNorm`` over the last axis (biased variance), computed in float32 (or float64)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * act_param(weight, y.ndim, "act_embed") + act_param(bias, y.ndim, "act_embed")).astype(x.dtype)


# ---- sequence mixer --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class M2SequenceMixerConfig:
    """Defaults are upstream ``MonarchMixerSequenceMixing``'s; ``m2_bert`` and ``causal`` are the presets."""

    d_model: int
    l_max: int = 128
    bidirectional: bool = False
    residual_long_conv: bool = False
    emb_dim: int = 3
    filter_order: int = 16
    hyena_w: float = 10.0
    hyena_w_mod: float = 1.0
    short_conv_width: int = 3
    training_additions: bool = False  # upstream `hyena_training_additions`: pre-LayerNorm on u (dropouts omitted)
    long_conv: str = "fft"  # "fft" | "causal_monarch" (causal only)
    conv_impl: str = "jnp_fft"  # fftconv impl: "naive" | "jnp_fft" | "monarch"
    monarch_b2: int | None = None  # causal_monarch: block size b2 (a divisor of l_max); default ≈ √l_max
    segments_per_pass: int = 1  # CausalM2Mixer with segment_ids_BL: documents of each row unpacked per pass
    linear_init: str = "torch"  # "torch" (nn.Linear default) or "bert" (HF post_init: N(0, 0.02), zero bias)

    def __post_init__(self):
        name = "M2SequenceMixerConfig."
        for field in ("d_model", "l_max", "filter_order", "short_conv_width", "segments_per_pass"):
            checks.require_int(name + field, getattr(self, field), min=1)
        for field in ("bidirectional", "residual_long_conv", "training_additions"):
            checks.require_bool(name + field, getattr(self, field))
        checks.require_float(name + "hyena_w", self.hyena_w)
        checks.require_float(name + "hyena_w_mod", self.hyena_w_mod)
        checks.require_choice(name + "long_conv", self.long_conv, LONG_CONVS)
        checks.require_choice(name + "conv_impl", self.conv_impl, tuple(i.value for i in fftconv_ops.Impl))
        checks.require_choice(name + "linear_init", self.linear_init, LINEAR_INITS)
        checks.require_optional_int(name + "monarch_b2", self.monarch_b2, min=1)
        checks.require(not (self.long_conv == "causal_monarch" and self.bidirectional),
                       f"{name}long_conv='causal_monarch' requires bidirectional=False")  # fmt: skip
        if self.long_conv == "causal_monarch":
            try:
                fftconv_ops.causal_monarch_shape(self.l_max, self.monarch_b2)
            except ValueError as e:
                raise ValueError(f"{name}monarch_b2={self.monarch_b2}: {e}") from None
        self.filter_config()  # validates emb_dim

    def filter_config(self) -> HyenaFilterConfig:
        return HyenaFilterConfig(
            d_model=self.d_model, l_max=self.l_max, emb_dim=self.emb_dim, order=self.filter_order, w=self.hyena_w,
            w_mod=self.hyena_w_mod, bidirectional=self.bidirectional, linear_init=self.linear_init,
        )  # fmt: skip

    @classmethod
    def m2_bert(cls, d_model: int, l_max: int = 128, **kw) -> M2SequenceMixerConfig:
        """M2-BERT yamls: emb 5, order 128, bidirectional, residual long conv, HF BERT init."""
        base = dict(bidirectional=True, residual_long_conv=True, emb_dim=5, filter_order=128, linear_init="bert")
        return cls(d_model=d_model, l_max=l_max, **(base | kw))

    @classmethod
    def causal(cls, d_model: int, l_max: int, long_conv: str = "fft", **kw) -> M2SequenceMixerConfig:
        """Causal M2 for decoder LMs: (a) ``long_conv="fft"`` or (b) ``"causal_monarch"``; module defaults else."""
        return cls(d_model=d_model, l_max=l_max, bidirectional=False, long_conv=long_conv, **kw)


class M2SequenceMixer(nnx.Module):
    """The released M2 sequence mixer (module docstring); ``__call__(x_BLD, *, mask_BL=None)``."""

    def __init__(self, cfg: M2SequenceMixerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = E = cfg.d_model
        W = cfg.short_conv_width  # nn.Conv1d default init, fan_in = 1 · W (depthwise); HF post_init skips convs
        w_in, b_in, w_sh, b_sh, w_out, b_out = random_parts(rngs.params(), [
            *linear_specs((D, 3, E), (3, E), D, cfg.linear_init), *linear_specs((W, 3, E), (3, E), W, "torch"),
            *linear_specs((E, D), (D,), E, cfg.linear_init)])  # fmt: skip
        self.in_linear = sharding.param(w_in, "embed", None, "mlp")
        self.in_linear_bias = sharding.param(b_in, None, "mlp")
        self.short_filter = sharding.param(w_sh, "conv", None, "mlp")
        self.short_filter_bias = sharding.param(b_sh, None, "mlp")
        self.out_linear = sharding.param(w_out, "mlp", "embed")
        self.out_linear_bias = sharding.param(b_out, "embed")
        self.filter_fn = HyenaFilter(cfg.filter_config(), rngs=rngs)
        self.filter_fn2 = HyenaFilter(cfg.filter_config(), rngs=rngs) if cfg.residual_long_conv else None
        if cfg.training_additions:
            self.layernorm = sharding.param(jnp.ones((D,)), "embed")
            self.layernorm_bias = sharding.param(jnp.zeros((D,)), "embed")
        if cfg.long_conv == "causal_monarch":
            h, b2 = fftconv_ops.causal_monarch_shape(cfg.l_max, cfg.monarch_b2)
            self.basis_l = sharding.param(jnp.zeros((b2, h, h)), None, None, None)
            self.basis_r = sharding.param(jnp.zeros((b2, b2)), None, None)

    def _long_conv(self, v_BLE, filt: HyenaFilter) -> jax.Array:
        """``longconv(v) + D ⊙ v`` with ``filt``'s kernels; the sequence axis is gathered (no sequence sharding)."""
        cfg = self.cfg
        L = v_BLE.shape[1]
        v_BLE = sharding.shard(v_BLE, "act_batch", None, "act_mlp")
        skip_BLE = act_param(filt.bias[...].astype(v_BLE.dtype), 3, "act_mlp") * v_BLE
        if cfg.long_conv == "fft":
            k_LE, k_rev_LE = filt.kernels(L)
            y_BLE = fftconv_ops.fftconv(v_BLE, k_LE, k_rev_LD=k_rev_LE, impl=cfg.conv_impl)
        else:  # causal Monarch: not shift-invariant, so always at l_max (right zero-padding is exact by causality)
            k_LE, _ = filt.kernels(cfg.l_max)
            v_pad = jnp.pad(v_BLE, ((0, 0), (0, cfg.l_max - L), (0, 0)))
            y_BLE = fftconv_ops.causal_monarch_conv(
                v_pad, k_LE, self.basis_l[...], self.basis_r[...], impl=cfg.conv_impl
            )[:, :L]
        return sharding.shard(y_BLE + skip_BLE, "act_batch", "act_seq", "act_mlp")

    def _short_conv(self, z_BLJE):
        W, L = self.cfg.short_conv_width, z_BLJE.shape[1]
        w_WJE = self.short_filter[...].astype(z_BLJE.dtype)
        zp = jnp.pad(z_BLJE, ((0, 0), (W - 1, 0), (0, 0), (0, 0)))
        out = act_param(self.short_filter_bias[...].astype(z_BLJE.dtype), 4, "act_mlp")
        for j in range(W):  # tap j multiplies x[t − (W − 1) + j]
            out = out + act_param(w_WJE[j], 4, "act_mlp") * zp[:, j : j + L]
        return out

    def __call__(self, x_BLD: Float[Array, "B L D"], *, mask_BL: Bool[Array, "B L"] | None = None
                 ) -> Float[Array, "B L D"]:  # fmt: skip
        cfg = self.cfg
        L, dt = x_BLD.shape[1], x_BLD.dtype
        checks.require(x_BLD.shape[-1] == cfg.d_model, f"M2SequenceMixer: x_BLD must be [batch, length, "
                       f"M2SequenceMixerConfig.d_model={cfg.d_model}], got shape {tuple(x_BLD.shape)}")  # fmt: skip
        checks.require(L <= cfg.l_max, f"M2SequenceMixer: sequence length {L} exceeds the filter's l_max={cfg.l_max}")
        x_BLD = sharding.shard(x_BLD, *ACT_BLD)
        if cfg.training_additions:
            x_BLD = layer_norm(x_BLD, self.layernorm[...], self.layernorm_bias[...], 1e-5)
        keep_BL1 = None if mask_BL is None else mask_BL.astype(dt)[..., None]
        u_BLD = x_BLD if keep_BL1 is None else x_BLD * keep_BL1
        z_BLJE = _einsum("BLD,DJE->BLJE", u_BLD, self.in_linear[...].astype(dt),
                         out=("act_batch", "act_seq", None, "act_mlp"))  # fmt: skip
        z_BLJE = z_BLJE + act_param(self.in_linear_bias[...].astype(dt), 4, "act_mlp")
        if keep_BL1 is not None:
            z_BLJE = z_BLJE * keep_BL1[..., None]
        z_BLJE = self._short_conv(z_BLJE)
        x1_BLE, x2_BLE, v_BLE = z_BLJE[:, :, 0], z_BLJE[:, :, 1], z_BLJE[:, :, 2]
        v_BLE = v_BLE * x1_BLE
        if keep_BL1 is not None:
            v_BLE = v_BLE * keep_BL1
        y_BLE = self._long_conv(v_BLE, self.filter_fn) * x2_BLE
        if self.filter_fn2 is not None:
            u_BLE = sharding.shard(u_BLD, "act_batch", "act_seq", "act_mlp")
            y_BLE = y_BLE + self._long_conv(u_BLE, self.filter_fn2)
        y_BLD = _einsum("BLE,ED->BLD", y_BLE, self.out_linear[...].astype(dt), out=ACT_BLD)
        return y_BLD + act_param(self.out_linear_bias[...].astype(dt), 3, "act_embed")


# ---- causal M2 for decoder LMs ----------------------------------------------------------------------------------
class SegmentLayout(NamedTuple):
    """Where the documents of each row are (``lcjax.ops.segments``): ``doc_BL`` each token's document number,
    ``offset_BL`` its position in that document, ``start_BN`` the documents' start positions (``L`` past the last),
    ``valid_BL`` the non-padding mask and ``n_passes`` how many passes of ``per_pass`` documents cover every row."""

    doc_BL: jax.Array
    offset_BL: jax.Array
    start_BN: jax.Array
    valid_BL: jax.Array
    n_passes: jax.Array


def segment_layout(segment_ids_BL: Int[Array, "B L"], per_pass: int) -> SegmentLayout:
    """The ``SegmentLayout`` of ``segment_ids_BL``; ``start_BN`` has room for ``ceil(L / per_pass)`` passes."""
    L = segment_ids_BL.shape[1]
    max_passes = -(-L // per_pass)  # a row holds at most L documents
    doc_BL = segments.document_index(segment_ids_BL)
    n_docs_B = jnp.sum(segments.document_starts(segment_ids_BL), axis=1)
    return SegmentLayout(
        doc_BL=doc_BL, offset_BL=segments.run_offsets(segment_ids_BL),
        start_BN=segments.document_start_positions(segment_ids_BL, max_passes * per_pass),
        valid_BL=segments.is_document(segment_ids_BL), n_passes=-(-jnp.max(n_docs_B) // per_pass),
    )  # fmt: skip


class CausalM2Mixer(M2SequenceMixer):
    """Causal M2 sequence mixer for decoder LMs: ``__call__(x_BLD, *, segment_ids_BL=None, positions_BL=None)``.

    Config: ``M2SequenceMixerConfig.causal(d_model, l_max, long_conv="fft" | "causal_monarch")``. Returns
    ``y_BLD``; output ``t`` depends on inputs ``≤ t`` of its own document only. ``positions_BL`` is accepted for a
    uniform block interface and unused (the filters depend on offsets, which the segment layout provides).

    Packed rows (``segment_ids_BL``, ``lcjax.ops.segments``): every document is computed exactly as if it were alone
    (from position 0; right zero-padding is exact by causality) and padding (id 0) gives 0. Each pass unpacks
    ``cfg.segments_per_pass`` documents of every row into rows of their own; a ``lax.scan`` over
    ``ceil(L / segments_per_pass)`` passes runs only the ``ceil(max documents per row / segments_per_pass)`` passes
    the batch needs (``lax.cond``; each pass is rematerialised, so the gradient's memory is that of one pass).
    """

    def __init__(self, cfg: M2SequenceMixerConfig, *, rngs: nnx.Rngs):
        if cfg.bidirectional:
            raise ValueError("CausalM2Mixer: cfg.bidirectional must be False (use M2SequenceMixerConfig.causal)")
        super().__init__(cfg, rngs=rngs)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, segment_ids_BL: Int[Array, "B L"] | None = None,
        positions_BL: Int[Array, "B L"] | None = None,
    ) -> Float[Array, "B L D"]:  # fmt: skip
        del positions_BL
        if segment_ids_BL is None:
            return super().__call__(x_BLD)
        segment_ids_BL = segments.check_segment_ids("CausalM2Mixer: segment_ids_BL", segment_ids_BL,
                                                    shape=x_BLD.shape[:2])  # fmt: skip
        S = self.cfg.segments_per_pass
        layout = segment_layout(segment_ids_BL, S)
        y_BLD = self._pass(x_BLD, layout, 0)  # most batches need one pass: no loop overhead for it
        max_passes = layout.start_BN.shape[1] // S
        if max_passes > 1:
            def later_pass(y_BLD, p):
                def run(x_BLD, layout, p):
                    zeros = lambda: sharding.shard(jnp.zeros_like(x_BLD), *ACT_BLD)
                    return jax.lax.cond(p < layout.n_passes, lambda: self._pass(x_BLD, layout, p), zeros)

                return y_BLD + jax.checkpoint(run)(x_BLD, layout, p), None

            y_BLD, _ = jax.lax.scan(later_pass, y_BLD, jnp.arange(1, max_passes))
        return y_BLD

    def _pass(self, x_BLD, layout: SegmentLayout, p) -> jax.Array:
        """Outputs of the documents ``[p·S, (p+1)·S)`` of every row (0 elsewhere), each computed alone."""
        B, L, D = x_BLD.shape
        S = self.cfg.segments_per_pass
        first = p * S
        # unpack: row (b, j) holds document first + j of row b, starting at position 0
        start_BS = jax.lax.dynamic_slice_in_dim(layout.start_BN, first, S, axis=1)
        idx_BSL = start_BS[:, :, None] + jnp.arange(L)[None, None, :]
        idx_c = jnp.clip(idx_BSL, 0, L - 1).reshape(B, S * L)
        take = lambda a: jnp.take_along_axis(a, idx_c, axis=1).reshape(B, S, L)
        doc_S = first + jnp.arange(S)
        keep_BSL = (idx_BSL < L) & (take(layout.doc_BL) == doc_S[None, :, None]) & take(layout.valid_BL)
        rows_BSLD = jnp.take_along_axis(x_BLD, idx_c[..., None], axis=1).reshape(B, S, L, D)
        rows_BSLD = rows_BSLD * keep_BSL[..., None].astype(x_BLD.dtype)
        out = super().__call__(rows_BSLD.reshape(B * S, L, D), mask_BL=keep_BSL.reshape(B * S, L))
        # repack: token t reads row (doc_t - first) at offset_t; tokens of other passes and padding get 0
        local_BL = layout.doc_BL - first
        mine_BL = layout.valid_BL & (local_BL >= 0) & (local_BL < S)
        flat = jnp.clip(local_BL, 0, S - 1) * L + jnp.clip(layout.offset_BL, 0, L - 1)
        out_BND = _reshape(out, (B, S * L, D), ("act_batch", None, "act_embed"))
        y_BLD = jnp.take_along_axis(out_BND, flat[..., None], axis=1)
        return sharding.shard(jnp.where(mine_BL[..., None], y_BLD, jnp.zeros((), y_BLD.dtype)), *ACT_BLD)


# ---- dimension mixer ------------------------------------------------------------------------------------------
class BlockdiagLinear(nnx.Module):
    """Released ``BlockdiagLinear``: one block-diagonal factor, weight ``(nb, in/nb, out/nb)`` (torch: ``(nb, out/nb,
    in/nb)``), init ``U(±1/√(in/nb))`` (dense kaiming-uniform × √nb); bias ``U(±1/√out)`` (upstream's quirk).
    """

    def __init__(self, in_features: int, out_features: int, *, nblocks: int = 4, bias: bool = True,
                 names=("embed", "mlp"), rngs: nnx.Rngs):  # fmt: skip
        checks.require(in_features % nblocks == 0 and out_features % nblocks == 0,
                       f"BlockdiagLinear: nblocks={nblocks} must divide in={in_features} and out={out_features}")
        self.nblocks, self.out_features = nblocks, out_features
        p, q = in_features // nblocks, out_features // nblocks
        bias_spec = ((out_features,), "uniform" if bias else "zeros", 1.0 / math.sqrt(out_features))
        w, b = random_parts(rngs.params(), [((nblocks, p, q), "uniform", 1.0 / math.sqrt(p)), bias_spec])
        self.weight = sharding.param(w, None, *names)
        self.bias = sharding.param(b, names[1]) if bias else None

    def __call__(self, x: Float[Array, "B L I"]) -> Float[Array, "B L O"]:
        B, L, n = x.shape
        nb = self.nblocks
        y = _einsum("BLkp,kpq->BLkq", x.reshape(B, L, nb, n // nb), self.weight[...].astype(x.dtype),
                    out=("act_batch", "act_seq", None, None)).reshape(B, L, self.out_features)  # fmt: skip
        return y if self.bias is None else y + act_param(self.bias[...].astype(x.dtype), y.ndim, None)


class MonarchLinear(nnx.Module):
    """Two-factor Monarch linear (fly ``MonarchLinear`` layout, factors ``(blocks, out, in)``); not in M2-BERT.

    ``in < out``: ``w1 (nb, in/nb, in/nb)``, ``w2 (nb, out/nb, in/nb)``; else ``w1 (nb, out/nb, in/nb)``,
    ``w2 (nb, out/nb, out/nb)``. Init ``U(±1/√(last dim))`` per factor; bias ``U(±1/√out)``.
    """

    def __init__(self, in_features: int, out_features: int, *, nblocks: int = 4, bias: bool = True,
                 rngs: nnx.Rngs):  # fmt: skip
        checks.require(in_features % nblocks == 0 and out_features % nblocks == 0,
                       f"MonarchLinear: nblocks={nblocks} must divide in={in_features} and out={out_features}")
        p, o = in_features // nblocks, out_features // nblocks
        grow = in_features < out_features
        s1, s2 = ((nblocks, p, p), (nblocks, o, p)) if grow else ((nblocks, o, p), (nblocks, o, o))
        bias_spec = ((out_features,), "uniform" if bias else "zeros", 1 / math.sqrt(out_features))
        w1, w2, b = random_parts(rngs.params(), [(s, "uniform", 1 / math.sqrt(s[-1])) for s in (s1, s2)] + [bias_spec])
        self.w1 = sharding.param(w1, None, None, None)
        self.w2 = sharding.param(w2, None, None, None)
        self.bias = sharding.param(b, None) if bias else None

    def __call__(self, x: Float[Array, "B L I"]) -> Float[Array, "B L O"]:
        y = monarch_ops.monarch_matmul(x, self.w1[...].astype(x.dtype), self.w2[...].astype(x.dtype))
        return y if self.bias is None else y + act_param(self.bias[...].astype(x.dtype), y.ndim, None)


class DenseLinear(nnx.Module):
    """``nn.Linear`` (weight stored ``(in, out)``), torch-default or HF BERT init."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init: str = "torch",
                 names=("embed", "mlp"), rngs: nnx.Rngs):  # fmt: skip
        specs = linear_specs((in_features, out_features), (out_features,), in_features, init)
        w, b = random_parts(rngs.params(), specs)
        self.weight = sharding.param(w, *names)
        self.bias = sharding.param(b, names[1]) if bias else None

    def __call__(self, x: Float[Array, "B L I"]) -> Float[Array, "B L O"]:
        y = _einsum("BLi,io->BLo", x, self.weight[...].astype(x.dtype), out=("act_batch", "act_seq", None))
        return y if self.bias is None else y + act_param(self.bias[...].astype(x.dtype), y.ndim, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class M2DimensionMixerConfig:
    d_model: int
    d_ff: int  # the GLU's intermediate size I (gated_layers: D -> 2I)
    nblocks: int = 4
    linear: str = "blockdiag"  # "blockdiag" (released) | "monarch" (paper, two factors) | "dense"
    layer_norm_eps: float = 1e-12
    linear_init: str = "torch"  # only for linear="dense"

    def __post_init__(self):
        name = "M2DimensionMixerConfig."
        for field in ("d_model", "d_ff", "nblocks"):
            checks.require_int(name + field, getattr(self, field), min=1)
        checks.require_choice(name + "linear", self.linear, DIM_LINEARS)
        checks.require_float(name + "layer_norm_eps", self.layer_norm_eps, min=0, min_open=True)
        checks.require_choice(name + "linear_init", self.linear_init, LINEAR_INITS)
        checks.require(self.linear == "dense" or (self.d_model % self.nblocks == 0 and self.d_ff % self.nblocks == 0),
                       f"{name}nblocks={self.nblocks} must divide d_model={self.d_model} and d_ff={self.d_ff}")


class M2DimensionMixer(nnx.Module):
    """GLU MLP with residual and post-LN: ``LN(wo(GELU(gated) ⊙ non_gated) + x)`` (``BertGatedLinearUnitMLP``)."""

    def __init__(self, cfg: M2DimensionMixerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.d_ff
        if cfg.linear == "blockdiag":
            self.gated_layers = BlockdiagLinear(D, 2 * F, nblocks=cfg.nblocks, bias=False, rngs=rngs)
            self.wo = BlockdiagLinear(F, D, nblocks=cfg.nblocks, names=("mlp", "embed"), rngs=rngs)
        elif cfg.linear == "monarch":
            self.gated_layers = MonarchLinear(D, 2 * F, nblocks=cfg.nblocks, bias=False, rngs=rngs)
            self.wo = MonarchLinear(F, D, nblocks=cfg.nblocks, rngs=rngs)
        else:
            self.gated_layers = DenseLinear(D, 2 * F, bias=False, init=cfg.linear_init, rngs=rngs)
            self.wo = DenseLinear(F, D, init=cfg.linear_init, names=("mlp", "embed"), rngs=rngs)
        self.layernorm = sharding.param(jnp.ones((D,)), "embed")
        self.layernorm_bias = sharding.param(jnp.zeros((D,)), "embed")

    def __call__(self, x_BLD: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        F = self.cfg.d_ff
        h_BLF = self.gated_layers(x_BLD)
        h_BLF = jax.nn.gelu(h_BLF[..., :F], approximate=False) * h_BLF[..., F:]
        y_BLD = self.wo(h_BLF) + x_BLD
        return sharding.shard(layer_norm(y_BLD, self.layernorm[...], self.layernorm_bias[...], self.cfg.layer_norm_eps),
                              *ACT_BLD)  # fmt: skip


__all__ = [
    "M2SequenceMixerConfig", "M2SequenceMixer", "CausalM2Mixer", "SegmentLayout", "segment_layout",
    "M2DimensionMixerConfig", "M2DimensionMixer", "BlockdiagLinear", "MonarchLinear", "DenseLinear", "layer_norm",
]  # fmt: skip
