"""Mamba-2 mixer (SSD). "Transformers are SSMs", Dao & Gu 2024, https://arxiv.org/abs/2405.21060.

Semantics of state-spaces/mamba ``mamba_ssm/modules/mamba2.py`` (``Mamba2``: forward, ``step``, initialisation)
and of HF transformers 5.23.0 ``models/mamba2/modeling_mamba2.py`` (``Mamba2Mixer``, ``MambaRMSNormGated``), which
the torch tests compare against to 1e-5:

    [z, x, B, C, dt] = in_proj(u)          x, B, C <- silu(causal depthwise conv(x, B, C))
    Δ = clamp(softplus(dt + dt_bias), dt_limit),   A = -exp(A_log)
    y = SSD(x, Δ, A, B, C) + D·x           y <- RMSNorm_per_group(y · silu(z)) · norm     out = out_proj(y)

Parameter layout. HF concatenates [z | x | B | C | dt] in one ``in_proj`` row block and [x | B | C] in one
``conv1d``; a tensor-parallel shard of such a concatenation would cut across the pieces. lcjax keeps one array
per piece, in its natural shape, under the HF names: ``in_proj.{z,x,B,C,dt}`` (D,H,P)/(D,G,N)/(D,H),
``conv1d.{x,B,C}`` (W,H,P)/(W,G,N), ``norm`` (H,P), ``out_proj`` (H,P,D), ``dt_bias``/``A_log``/``D`` (H,). Heads
shard over ``heads`` (tensor parallel); the B/C groups are replicated (they are small). ``lcjax/convert/mamba2.py``
splits and joins HF's arrays.

Sharding: the conv and the SSD are global-array ops in ``lcjax/ops/ssd_context_parallel.py`` (as attention's are
in ``lcjax/ops/context_parallel.py``). Under context parallelism (rules preset ``context_parallel``: the mesh
shards ``act_seq``) every device keeps its slice of the sequence from in_proj to out_proj (conv halo: one
``ppermute``; SSD state passing: one ``all_gather`` of O(B·H·P·N)); it composes with batch and heads (tensor)
sharding. ``ssd_context_parallel.sequence_axis`` says when the sequence is gathered instead (L not divisible, a
shard shorter than d_conv - 1, decoding ``step``, state clipping): the result is the same, the memory is not.

Packed documents: ``seq_idx_BL`` takes lcjax segment ids (``lcjax.ops.segments``: a document is a run of one
positive id, 0 = padding). Mamba-2 starts a document wherever the id changes, so a padding run is a run of its own
and neither conv taps nor the SSM state cross it.

Long-context options (``LongContextConfig``, off by default; off == bit-identical to the plain mixer): "Stuffed
Mamba" (Chen et al., arXiv 2410.07145, thunlp/stuffed-mamba) and "LongMamba" (Ye et al., ICLR 2025, arXiv
2504.16053, GATECH-EIC/LongMamba, method ``dt_thre``); their calibrated statistics are ``LongContextStat`` variables
(not parameters) set by ``calibrate_long_context``.

Dimension key (lcjax/typing.py): B batch, L length, D model, H heads, P head dim, G groups, N state, W conv width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import sharding
from lcjax.checks import (
    require, require_bool, require_choice, require_float, require_int, require_optional_int, validated_by,
)  # fmt: skip
from lcjax.ops import segments
from lcjax.ops import ssd as ssd_ops
from lcjax.ops import ssd_context_parallel as ssd_cp
from lcjax.ops.ssd import Impl
from lcjax.typing import Array, Float, Int

LONGMAMBA_LENGTHS = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000, 20000, 24000,
                     30000, 36000, 44000, 54000, 64000, 80000, 96000, 120000, 144000, 168000, 192000)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongContextConfig:
    """Training-free length-extrapolation options; the defaults change nothing.

    Stuffed Mamba knobs (pre-scan edits): ``a_mult`` A <- a·A; ``dt_mult`` Δ <- d·Δ; ``dt_bias_mult`` dt_bias <-
    v·dt_bias (``set_dt_offset``); ``decay_mult`` λ in (0, 1]: α_t <- λ·α_t (``da_mult``, e.g. 0.99999);
    ``b_mult`` B <- β·B (e.g. 0.7). ``state_norm``: after every ``state_norm_chunk`` tokens (default the mixer's
    chunk_size; the paper uses 128) rescale each head's state to ||S_h||_F <= τ_h (τ = the calibration state norm;
    we implement the paper's min(1, τ/||S||), not the released code's inverted ratio). In ``step`` it clips every
    token.
    LongMamba: heads with calibrated decay exp(A·ΣΔ) > ``longmamba_c`` are global; in prefills of length >=
    ``longmamba_min_len`` their Δ is zeroed where Δ <= ``longmamba_b``·θ(L*) (L* = the nearest of
    ``longmamba_lengths``). Decoding steps are never filtered.
    """

    a_mult: float = 1.0
    dt_mult: float = 1.0
    dt_bias_mult: float = 1.0
    decay_mult: float = 1.0
    b_mult: float = 1.0
    state_norm: bool = False
    state_norm_chunk: int | None = None
    longmamba: bool = False
    longmamba_lengths: tuple[int, ...] = LONGMAMBA_LENGTHS
    longmamba_b: float = 1.0
    longmamba_c: float = 0.05
    longmamba_min_len: int = 3000
    longmamba_clamp_top: float | None = None

    def __post_init__(self):
        name = lambda field: f"LongContextConfig.{field}"  # noqa: E731
        for field in ("a_mult", "dt_mult", "b_mult", "longmamba_b"):
            require_float(name(field), getattr(self, field), min=0.0, min_open=True)
        require_float(name("dt_bias_mult"), self.dt_bias_mult)
        require_float(name("decay_mult"), self.decay_mult, min=0.0, min_open=True, max=1.0)
        require_float(name("longmamba_c"), self.longmamba_c, min=0.0)
        require_bool(name("state_norm"), self.state_norm)
        require_bool(name("longmamba"), self.longmamba)
        object.__setattr__(self, "state_norm_chunk", require_optional_int(name("state_norm_chunk"),
                                                                          self.state_norm_chunk, min=1))
        object.__setattr__(self, "longmamba_min_len", require_int(name("longmamba_min_len"), self.longmamba_min_len,
                                                                  min=1))
        lengths = tuple(self.longmamba_lengths)
        require(len(lengths) > 0, f"{name('longmamba_lengths')}={self.longmamba_lengths!r}: positive ints needed")
        lengths = tuple(require_int(f"{name('longmamba_lengths')}[{i}]", n, min=1) for i, n in enumerate(lengths))
        object.__setattr__(self, "longmamba_lengths", lengths)
        if self.longmamba_clamp_top is not None:
            require_float(name("longmamba_clamp_top"), self.longmamba_clamp_top, min=0.0, min_open=True, max=1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Mamba-2 mixer hyper-parameters; defaults are ``mamba_ssm.modules.mamba2.Mamba2``'s.

    ``rmsnorm``/``norm_before_gate``: gated RMSNorm over groups of d_inner/n_groups channels, as HF's
    ``MambaRMSNormGated`` (gate first: norm(y·silu(z))·w) or, with ``norm_before_gate``, norm(y)·w·silu(z);
    without ``rmsnorm`` the output is y·silu(z). ``norm_eps`` is HF's ``layer_norm_epsilon``.
    """

    d_model: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_init: float | None = None
    conv_bias: bool = True
    bias: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    norm_eps: float = 1e-5
    impl: Impl | str = Impl.CHUNKED
    long_context: LongContextConfig = LongContextConfig()

    def __post_init__(self):
        name = lambda field: f"Mamba2Config.{field}"  # noqa: E731
        for field in ("d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            object.__setattr__(self, field, require_int(name(field), getattr(self, field), min=1))
        for field in ("conv_bias", "bias", "rmsnorm", "norm_before_gate"):
            require_bool(name(field), getattr(self, field))
        require(self.d_inner % self.head_dim == 0, f"{name('head_dim')}={self.head_dim} must divide d_inner = "
                                                   f"expand·d_model = {self.d_inner}")  # fmt: skip
        require(self.num_heads % self.n_groups == 0,
                f"{name('n_groups')}={self.n_groups} must divide num_heads = {self.num_heads}")  # fmt: skip
        dt_min = require_float(name("dt_min"), self.dt_min, min=0.0, min_open=True)
        require_float(name("dt_max"), self.dt_max, min=dt_min)
        require_float(name("dt_init_floor"), self.dt_init_floor, min=0.0)
        lo, hi = _pair(name("dt_limit"), self.dt_limit)
        lo = require_float(f"{name('dt_limit')}[0]", lo, min=0.0)
        if hi != math.inf:  # the default upper limit: no clamp
            hi = require_float(f"{name('dt_limit')}[1]", hi, min=lo, min_open=True)
        a_lo, a_hi = _pair(name("A_init_range"), self.A_init_range)
        a_lo = require_float(f"{name('A_init_range')}[0]", a_lo, min=0.0, min_open=True)
        a_hi = require_float(f"{name('A_init_range')}[1]", a_hi, min=a_lo)
        if self.conv_init is not None:
            require_float(name("conv_init"), self.conv_init, min=0.0, min_open=True)
        require_float(name("norm_eps"), self.norm_eps, min=0.0, min_open=True)
        require(self.impl != Impl.CONTEXT_PARALLEL, "Mamba2Config.impl='context_parallel': the mixer switches to "
                "context-parallel SSD by itself when the mesh shards act_seq; allowed: 'naive', 'chunked'")
        object.__setattr__(self, "impl", Impl(require_choice(name("impl"), self.impl, ("naive", "chunked"))))
        if not isinstance(self.long_context, LongContextConfig):
            raise TypeError(f"{name('long_context')} must be a LongContextConfig, got {self.long_context!r}")
        object.__setattr__(self, "dt_limit", (float(lo), float(hi)))
        object.__setattr__(self, "A_init_range", (a_lo, a_hi))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    @classmethod
    def preset(cls, name: str, **overrides) -> Mamba2Config:
        """The mixers of state-spaces/mamba2-{130m,370m,780m,1.3b,2.7b} (d_state 128, head_dim 64, expand 2)."""
        widths = {"130m": 768, "370m": 1024, "780m": 1536, "1.3b": 2048, "2.7b": 2560}
        return cls(d_model=widths[require_choice("Mamba2Config.preset: name", name, sorted(widths))], **overrides)


def _pair(name: str, value) -> tuple:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair, got {value!r}")
    return tuple(value)


class Mamba2State(NamedTuple):
    """Decoding state: the last W-1 raw (pre-conv) x/B/C inputs and the SSM state (float32)."""

    conv_x: Float[Array, "B W H P"]
    conv_B: Float[Array, "B W G N"]
    conv_C: Float[Array, "B W G N"]
    ssm: Float[Array, "B H P N"]


# Logical names of the state's axes after the batch: conv_x, conv_B, conv_C (W, then channels) and ssm (H, P, N).
_STATE_AXES = ((None, "act_heads", None), (None, None, None), (None, None, None), ("act_heads", None, None))


class LongContextStat(nnx.Variable):
    """A calibrated long-context statistic: part of the state, not a trainable parameter."""


def _uniform_draws(key, draws, dtype) -> dict[str, jax.Array]:
    """``{name: U(-bound, bound) of shape}`` (float32 U(0, 1) for bound None) from one random draw.

    One RNG kernel per module instead of one per parameter shape: threefry compiles slowly on CPU.
    """
    sizes = [math.prod(shape) for _, shape, _ in draws]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    out, start = {}, 0
    for (name, shape, bound), size in zip(draws, sizes):
        u = flat[start : start + size].reshape(shape)
        out[name] = u if bound is None else ((2.0 * u - 1.0) * bound).astype(dtype)
        start += size
    return out


class Mamba2(nnx.Module):
    """The Mamba-2 mixer: ``(y_BLD, state) = mixer(x_BLD, seq_idx_BL=..., state=...)``, ``mixer.step(x_BD, state)``."""

    def __init__(self, cfg: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, P, G, N, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv
        k_in, k_conv, k_out = 1.0 / math.sqrt(D), cfg.conv_init or 1.0 / math.sqrt(W), 1.0 / math.sqrt(cfg.d_inner)
        proj = {"z": (D, H, P), "x": (D, H, P), "B": (D, G, N), "C": (D, G, N), "dt": (D, H)}
        bias = {"z": (H, P), "x": (H, P), "B": (G, N), "C": (G, N), "dt": (H,)}
        conv = {"x": (W, H, P), "B": (W, G, N), "C": (W, G, N)}
        # U(-bound, bound) for every weight and bias (torch's nn.Linear / nn.Conv1d default init); None: U(0, 1).
        draws = [(f"in_proj.{k}", shape, k_in) for k, shape in proj.items()]
        draws += [(f"in_proj_bias.{k}", shape, k_in) for k, shape in bias.items()] if cfg.bias else []
        draws += [(f"conv1d.{k}", shape, k_conv) for k, shape in conv.items()]
        draws += [(f"conv1d_bias.{k}", bias[k], 1.0 / math.sqrt(W)) for k in conv] if cfg.conv_bias else []
        draws += [("out_proj", (H, P, D), k_out)] + ([("out_proj_bias", (D,), k_out)] if cfg.bias else [])
        draws += [("dt", (H,), None), ("A", (H,), None)]
        w = _uniform_draws(rngs.params(), draws, param_dtype)

        names = {"z": ("heads", "head_dim"), "x": ("heads", "head_dim"), "B": (None, "ssm_state"),
                 "C": (None, "ssm_state"), "dt": ("heads",)}  # fmt: skip
        self.in_proj = nnx.Dict({k: sharding.param(w[f"in_proj.{k}"], "embed", *names[k]) for k in proj})
        if cfg.bias:
            self.in_proj_bias = nnx.Dict({k: sharding.param(w[f"in_proj_bias.{k}"], *names[k]) for k in bias})
        self.conv1d = nnx.Dict({k: sharding.param(w[f"conv1d.{k}"], "conv", *names[k]) for k in conv})
        if cfg.conv_bias:
            self.conv1d_bias = nnx.Dict({k: sharding.param(w[f"conv1d_bias.{k}"], *names[k]) for k in conv})
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (floored); A = U(A_init_range); D = 1.
        log_dt = math.log(cfg.dt_min) + w["dt"] * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
        dt_H = jnp.maximum(jnp.exp(log_dt), cfg.dt_init_floor)
        self.dt_bias = sharding.param((dt_H + jnp.log(-jnp.expm1(-dt_H))).astype(param_dtype), "heads")
        A_lo, A_hi = cfg.A_init_range
        self.A_log = sharding.param(jnp.log(A_lo + w["A"] * (A_hi - A_lo)), "heads")  # float32 always (upstream)
        self.D = sharding.param(jnp.ones((H,), param_dtype), "heads")
        if cfg.rmsnorm:
            self.norm = sharding.param(jnp.ones((H, P), param_dtype), "heads", "head_dim")
        self.out_proj = sharding.param(w["out_proj"], "heads", "head_dim", "embed")
        if cfg.bias:
            self.out_proj_bias = sharding.param(w["out_proj_bias"], "embed")
        if cfg.long_context.state_norm or cfg.long_context.longmamba:
            self.reset_long_context()

    def reset_long_context(self) -> None:
        """(Re)set the long-context statistics to "uncalibrated", which changes nothing: τ = inf, no global heads."""
        lc, H = self.cfg.long_context, self.cfg.num_heads
        stat = lambda value, *names: LongContextStat(value, out_sharding=names, eager_sharding=sharding.mesh_active())
        if lc.state_norm:
            self.state_norm_max = stat(jnp.full((H,), jnp.inf, jnp.float32), "heads")
        if lc.longmamba:
            self.longmamba_decay = stat(jnp.zeros((H,), jnp.float32), "heads")
            self.longmamba_threshold = stat(jnp.zeros((len(lc.longmamba_lengths), H), jnp.float32), None, "heads")

    # ---- pieces ---------------------------------------------------------------------------------------------
    def init_state(self, batch: int, dtype=jnp.float32) -> Mamba2State:
        """Zero state: conv histories in the activation ``dtype``, the SSM state in float32."""
        cfg = self.cfg
        W, H, P, G, N = cfg.d_conv - 1, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        return Mamba2State(
            conv_x=jnp.zeros((batch, W, H, P), dtype), conv_B=jnp.zeros((batch, W, G, N), dtype),
            conv_C=jnp.zeros((batch, W, G, N), dtype), ssm=jnp.zeros((batch, H, P, N), jnp.float32),
        )  # fmt: skip

    def _project(self, x_BLD, state: Mamba2State, seq_idx_BL, seq: str | None = None):
        """in_proj, causal conv + silu, Δ: (z, x, B, C, Δ, conv histories), Δ in float32.

        ``seq``: the logical name of the sequence axis (``ssd_context_parallel.sequence_axis``; None: gathered).
        """
        cfg, lc, dt = self.cfg, self.cfg.long_context, x_BLD.dtype
        read = lambda var: sharding.read(var, dt)  # noqa: E731
        names = {"z": ("act_heads", None), "x": ("act_heads", None), "B": (None, None), "C": (None, None),
                 "dt": ("act_heads",)}  # fmt: skip
        p = ssd_cp.in_projection(x_BLD, {k: read(self.in_proj[k]) for k in names}, names, seq=seq)
        if cfg.bias:
            p = {k: v + read(self.in_proj_bias[k])[None, None] for k, v in p.items()}
        z_BLHP, x_BLHP, B_BLGN, C_BLGN, dt_BLH = (p[k] for k in names)

        def conv(key, u, history):  # sequence-parallel: each shard also gets the previous shard's last W-1 inputs
            y, new_history = ssd_cp.causal_conv1d_context_parallel(
                u, read(self.conv1d[key]), read(self.conv1d_bias[key]) if cfg.conv_bias else None, seq=seq,
                channel_names=("act_heads" if key == "x" else None, None), history_BWE=history, seq_idx_BL=seq_idx_BL,
            )  # fmt: skip
            return jax.nn.silu(y), new_history

        x_BLHP, hist_x = conv("x", x_BLHP, state.conv_x)
        B_BLGN, hist_B = conv("B", B_BLGN, state.conv_B)
        C_BLGN, hist_C = conv("C", C_BLGN, state.conv_C)

        dt_bias_H = sharding.read(self.dt_bias, jnp.float32)
        if lc.dt_bias_mult != 1.0:
            dt_bias_H = dt_bias_H * lc.dt_bias_mult
        delta_BLH = jax.nn.softplus(dt_BLH.astype(jnp.float32) + dt_bias_H[None, None])
        if cfg.dt_limit != (0.0, math.inf):
            delta_BLH = jnp.clip(delta_BLH, *cfg.dt_limit)
        if lc.dt_mult != 1.0:
            delta_BLH = delta_BLH * lc.dt_mult
        if lc.b_mult != 1.0:
            B_BLGN = B_BLGN * jnp.asarray(lc.b_mult, B_BLGN.dtype)
        return z_BLHP, x_BLHP, B_BLGN, C_BLGN, delta_BLH, (hist_x, hist_B, hist_C)

    def _A(self) -> Float[Array, " H"]:
        A_H = -jnp.exp(sharding.read(self.A_log, jnp.float32))
        return A_H * self.cfg.long_context.a_mult if self.cfg.long_context.a_mult != 1.0 else A_H

    def _decay_scale(self) -> Float[Array, " H"] | None:
        lc = self.cfg.long_context
        return None if lc.decay_mult == 1.0 else jnp.full((self.cfg.num_heads,), lc.decay_mult, jnp.float32)

    def _max_state_norm(self, calibrated: bool) -> Float[Array, " H"] | None:
        if not (self.cfg.long_context.state_norm and calibrated):
            return None
        return sharding.read(self.state_norm_max, jnp.float32)

    def _output(self, y_BLHP, z_BLHP, seq: str | None = None) -> Float[Array, "B L D"]:
        """Gated RMSNorm per group (float32), then out_proj (the result sequence-sharded whenever L allows)."""
        cfg, dt, L = self.cfg, z_BLHP.dtype, y_BLHP.shape[1]
        y_BLHP = ssd_cp.gated_rmsnorm(y_BLHP, z_BLHP, sharding.read(self.norm, dt) if cfg.rmsnorm else None,
                                      n_groups=cfg.n_groups, eps=cfg.norm_eps, norm_before_gate=cfg.norm_before_gate,
                                      seq=seq)  # fmt: skip
        out = ("act_batch", "act_seq" if L % sharding.axis_size("act_seq") == 0 else None, "act_embed")
        y_BLD = sharding.einsum("BLHP,HPD->BLD", y_BLHP.astype(dt), sharding.read(self.out_proj, dt), out=out)
        return y_BLD + sharding.read(self.out_proj_bias, dt)[None, None] if cfg.bias else y_BLD

    def _longmamba(self, delta_BLH, L: int, calibrated: bool):
        lc = self.cfg.long_context
        if not (lc.longmamba and calibrated and L >= lc.longmamba_min_len):
            return delta_BLH
        global_H = sharding.read(self.longmamba_decay, jnp.float32) > lc.longmamba_c
        theta_H = sharding.read(self.longmamba_threshold, jnp.float32)[ssd_ops.nearest_length(lc.longmamba_lengths, L)]
        return ssd_ops.longmamba_filter(delta_BLH, global_H, lc.longmamba_b * theta_H)

    # ---- public API -----------------------------------------------------------------------------------------
    @validated_by(lambda self, x_BLD, *, seq_idx_BL=None, state=None: self._check_input(x_BLD, seq_idx_BL, state))
    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, seq_idx_BL: Int[Array, "B L"] | None = None,
        state: Mamba2State | None = None,
    ) -> tuple[Float[Array, "B L D"], Mamba2State]:  # fmt: skip
        """Full-sequence forward (training, prefill). Returns the output and the state after the last token.

        ``state`` continues a previous call (prefill + more tokens == one call). ``seq_idx_BL``: segment ids of
        packed documents, each run as if alone (conv taps and the SSM state never cross a change of id, so a
        padding run is its own run); ``state`` then feeds the first run and the returned state is the last run's.
        """
        return self._forward(x_BLD, seq_idx_BL, state, calibrated=True)

    def _forward(self, x_BLD, seq_idx_BL, state, *, calibrated):
        cfg, (Bsz, L, _) = self.cfg, x_BLD.shape
        max_norm_H = self._max_state_norm(calibrated)
        seq = ssd_cp.sequence_axis(L, conv_width=cfg.d_conv, state_clipping=max_norm_H is not None)
        x_BLD = sharding.shard(x_BLD, "act_batch", seq, "act_embed")
        state = self.init_state(Bsz, x_BLD.dtype) if state is None else state
        state = Mamba2State(*(sharding.shard(a, "act_batch", *names) for a, names in zip(state, _STATE_AXES)))
        if seq_idx_BL is not None:
            seq_idx_BL = sharding.shard(seq_idx_BL, "act_batch", seq)
        z_BLHP, x_BLHP, B_BLGN, C_BLGN, delta_BLH, hist = self._project(x_BLD, state, seq_idx_BL, seq)
        lc = cfg.long_context
        inputs = ssd_ops.SSDInputs(
            x_BLHP, self._longmamba(delta_BLH, L, calibrated), self._A(), B_BLGN, C_BLGN,
            chunk_size=lc.state_norm_chunk if (lc.state_norm and lc.state_norm_chunk) else cfg.chunk_size,
            D_H=sharding.read(self.D, jnp.float32), initial_state_BHPN=state.ssm, seq_idx_BL=seq_idx_BL,
            decay_scale_H=self._decay_scale(), max_state_norm_H=max_norm_H,
        )  # fmt: skip
        y_BLHP, ssm_BHPN = ssd_cp.ssd_sharded(inputs, impl=cfg.impl, seq=seq)
        return self._output(y_BLHP, z_BLHP, seq), Mamba2State(*hist, ssm_BHPN)

    @validated_by(lambda self, x_BD, state: self._check_input(x_BD[:, None] if x_BD.ndim == 2 else x_BD, None, state))
    def step(self, x_BD: Float[Array, "B D"], state: Mamba2State) -> tuple[Float[Array, "B D"], Mamba2State]:
        """One decoding token in O(1): conv history roll + one recurrence step (``ops.ssd.ssd_step``)."""
        z_BLHP, x_BLHP, B_BLGN, C_BLGN, delta_BLH, hist = self._project(x_BD[:, None], state, None)
        y_BHP, ssm_BHPN = ssd_ops.ssd_step(
            state.ssm, x_BLHP[:, 0], delta_BLH[:, 0], self._A(), B_BLGN[:, 0], C_BLGN[:, 0],
            D_H=sharding.read(self.D, jnp.float32), decay_scale_H=self._decay_scale(),
            max_state_norm_H=self._max_state_norm(True),
        )  # fmt: skip
        return self._output(y_BHP[:, None], z_BLHP)[:, 0], Mamba2State(*hist, ssm_BHPN)

    def calibrate_long_context(self, x_BLD: Float[Array, "B L D"]) -> None:
        """Set the calibrated statistics from calibration inputs (B samples of the training length L).

        Runs the mixer with the static knobs but without clipping or filtering. LongMamba: Δ of every sample ->
        ``ops.ssd.longmamba_calibrate``; Stuffed Mamba: τ_h = mean over samples of ||S_final,h||_F. Call it outside
        ``jax.jit`` (it writes the module's ``LongContextStat`` variables); the statistics are computed under jit.
        """
        lc = self.cfg.long_context
        require(lc.state_norm or lc.longmamba, "calibrate_long_context: enable long_context.state_norm or "
                                               "long_context.longmamba")  # fmt: skip
        self._check_input(x_BLD, None, None)
        for name, value in jax.jit(type(self)._calibration_stats)(self, x_BLD).items():
            getattr(self, name).set_value(value)

    def _calibration_stats(self, x_BLD) -> dict[str, jax.Array]:
        lc, stats = self.cfg.long_context, {}
        if lc.longmamba:
            delta_BLH = self._project(x_BLD, self.init_state(x_BLD.shape[0], x_BLD.dtype), None)[4]
            stats["longmamba_decay"], stats["longmamba_threshold"] = ssd_ops.longmamba_calibrate(
                delta_BLH, self._A(), target_lengths=lc.longmamba_lengths, clamp_top=lc.longmamba_clamp_top
            )
        if lc.state_norm:
            ssm_BHPN = self._forward(x_BLD, None, None, calibrated=False)[1].ssm
            stats["state_norm_max"] = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(ssm_BHPN), axis=(2, 3))), axis=0)
        return stats

    def _check_input(self, x_BLD, seq_idx_BL, state) -> None:
        d = self.cfg.d_model
        require(x_BLD.ndim == 3 and x_BLD.shape[-1] == d and jnp.issubdtype(x_BLD.dtype, jnp.floating),
                f"x: expected a float array of shape (B, L, d_model={d}) (x_BD: (B, d_model) in step), got "
                f"{x_BLD.dtype} {tuple(x_BLD.shape)}")  # fmt: skip
        if seq_idx_BL is not None:
            # ordered=False: any change of id starts a run, so a permuted or reused id is still well defined here
            segments.check_segment_ids("Mamba2: seq_idx_BL", seq_idx_BL, shape=tuple(x_BLD.shape[:2]), ordered=False)
        if state is not None:
            want = [tuple(a.shape) for a in self.init_state(x_BLD.shape[0])]
            got = [tuple(a.shape) for a in state] if isinstance(state, tuple) else type(state).__name__
            require(isinstance(state, Mamba2State) and got == want,
                    f"state: expected a Mamba2State with shapes {want}, got {got}")  # fmt: skip


__all__ = ["LongContextConfig", "LongContextStat", "Mamba2", "Mamba2Config", "Mamba2State"]
