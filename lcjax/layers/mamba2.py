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

Under a mesh the SSD runs in ``sharding.shard_map`` over batch and heads. Context parallelism (rules preset
``context_parallel``: the mesh shards ``act_seq``) switches the mixer to sequence-parallel SSD by itself
(``lcjax/ops/ssd_context_parallel.py``): every device keeps its contiguous slice of the sequence from in_proj to
out_proj; the causal conv gets the previous shard's last W-1 inputs (one ``ppermute``) and the SSD passes
per-shard (final state, total decay) pairs (one ``all_gather`` of O(B·H·P·N), independent of L). It composes with
batch (data/fsdp) and heads (tensor) sharding. The sequence is gathered instead (the result is the same, the
memory is not) when the sequence is not contiguous-sharded evenly: L not divisible by the context size, a shard
shorter than d_conv - 1 (decoding ``step`` included), or calibrated state clipping (``state_norm``, not affine in
the entering state). This matches the attention layer, which also falls back to gathering keys/values there.

Long-context options (``LongContextConfig``, all off by default; off == bit-identical to the plain mixer):
"Stuffed Mamba" (Chen et al., arXiv 2410.07145, thunlp/stuffed-mamba): A, Δ, dt_bias, decay and B multipliers and
per-head state-norm clipping with calibrated τ; "LongMamba" (Ye et al., ICLR 2025, arXiv 2504.16053,
GATECH-EIC/LongMamba, method ``dt_thre``): global-head detection and Δ-threshold token filtering in prefill. The
calibrated statistics live in ``LongContextStat`` variables (not parameters) set by ``calibrate_long_context``.

Dimension key (lcjax/typing.py): B batch, L length, D model, H heads, P head dim, G groups, N state, W conv width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import sharding
from lcjax.ops import conv as conv_ops
from lcjax.ops import ssd as ssd_ops
from lcjax.ops import ssd_context_parallel as ssd_cp
from lcjax.ops.ssd import Impl, _validated_by
from lcjax.typing import Array, Float, Int

LONGMAMBA_LENGTHS = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000, 20000, 24000,
                     30000, 36000, 44000, 54000, 64000, 80000, 96000, 120000, 144000, 168000, 192000)  # fmt: skip


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive int")


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
        for name in ("a_mult", "dt_mult", "b_mult", "longmamba_b"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LongContextConfig.{name}={getattr(self, name)!r} must be > 0")
        if not 0.0 < self.decay_mult <= 1.0:
            raise ValueError(f"LongContextConfig.decay_mult={self.decay_mult!r} must be in (0, 1]")
        if not self.longmamba_c >= 0.0:
            raise ValueError(f"LongContextConfig.longmamba_c={self.longmamba_c!r} must be >= 0")
        if self.state_norm_chunk is not None:
            _positive_int("LongContextConfig", "state_norm_chunk", self.state_norm_chunk)
        _positive_int("LongContextConfig", "longmamba_min_len", self.longmamba_min_len)
        lengths = tuple(self.longmamba_lengths)
        if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"LongContextConfig.longmamba_lengths={self.longmamba_lengths!r}: positive ints needed")
        object.__setattr__(self, "longmamba_lengths", lengths)
        if self.longmamba_clamp_top is not None and not 0.0 < self.longmamba_clamp_top <= 1.0:
            raise ValueError(f"LongContextConfig.longmamba_clamp_top={self.longmamba_clamp_top!r} must be in (0, 1]")


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
        for name in ("d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            _positive_int("Mamba2Config", name, getattr(self, name))
        if self.d_inner % self.head_dim:
            raise ValueError(f"Mamba2Config.head_dim={self.head_dim} must divide d_inner = expand·d_model = "
                             f"{self.d_inner}")  # fmt: skip
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2Config.n_groups={self.n_groups} must divide num_heads = {self.num_heads}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Mamba2Config.dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < dt_min <= dt_max")
        if not self.dt_init_floor >= 0.0:
            raise ValueError(f"Mamba2Config.dt_init_floor={self.dt_init_floor} must be >= 0")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"Mamba2Config.dt_limit={self.dt_limit} must satisfy 0 <= low < high")
        a_lo, a_hi = self.A_init_range
        if not 0.0 < a_lo <= a_hi:
            raise ValueError(f"Mamba2Config.A_init_range={self.A_init_range} must satisfy 0 < low <= high")
        if self.conv_init is not None and not self.conv_init > 0:
            raise ValueError(f"Mamba2Config.conv_init={self.conv_init} must be > 0 or None")
        if not self.norm_eps > 0:
            raise ValueError(f"Mamba2Config.norm_eps={self.norm_eps} must be > 0")
        try:
            object.__setattr__(self, "impl", Impl(self.impl))
        except ValueError:
            raise ValueError(f"Mamba2Config.impl={self.impl!r}; allowed: 'naive', 'chunked'") from None
        if self.impl is Impl.CONTEXT_PARALLEL:
            raise ValueError("Mamba2Config.impl='context_parallel': the mixer switches to context-parallel SSD by "
                             "itself when the mesh shards act_seq; allowed: 'naive', 'chunked'")  # fmt: skip
        if not isinstance(self.long_context, LongContextConfig):
            raise ValueError(f"Mamba2Config.long_context must be a LongContextConfig, got {self.long_context!r}")
        object.__setattr__(self, "dt_limit", (float(lo), float(hi)))
        object.__setattr__(self, "A_init_range", (float(a_lo), float(a_hi)))

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
        if name not in widths:
            raise ValueError(f"Mamba2Config.preset: unknown name {name!r}; allowed: {sorted(widths)}")
        return cls(d_model=widths[name], **overrides)


class Mamba2State(NamedTuple):
    """Decoding state: the last W-1 raw (pre-conv) x/B/C inputs and the SSM state (float32)."""

    conv_x: Float[Array, "B W H P"]
    conv_B: Float[Array, "B W G N"]
    conv_C: Float[Array, "B W G N"]
    ssm: Float[Array, "B H P N"]


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

    def _seq_axis(self, L: int, clipping: bool) -> str | None:
        """``"act_seq"`` when the mixer runs sequence-parallel (see the module docstring), else None (gathered)."""
        n = sharding.axis_size("act_seq")
        if n == 1 or L % n or L // n < self.cfg.d_conv - 1 or clipping:
            return None
        return "act_seq"

    def _project(self, x_BLD, state: Mamba2State, seq_idx_BL, seq: str | None = None):
        """in_proj, causal conv + silu, Δ: (z, x, B, C, Δ, conv histories), Δ in float32.

        ``seq``: the sequence axis name of the activations (``_seq_axis``); "act_seq" runs the context-parallel conv.
        """
        cfg, lc, dt = self.cfg, self.cfg.long_context, x_BLD.dtype
        act = lambda *names: ("act_batch", seq, *names)
        read = lambda var: sharding.read(var, dt)
        heads, groups = act("act_heads", None), act(None, None)
        if sharding.axis_size("act_heads") == 1:
            # Heads not split over devices: one matmul against the pieces side by side (HF's single in_proj),
            # which XLA runs ~10% faster than five thin ones; under tensor parallelism the pieces stay apart.
            Bsz, L, D = x_BLD.shape
            H, P, G, N = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
            W_DF = jnp.concatenate([read(self.in_proj[k]).reshape(D, -1) for k in ("z", "x", "B", "C", "dt")], axis=1)
            out_BLF = sharding.einsum("BLD,DF->BLF", x_BLD, W_DF, out=act(None))
            z, xx, Bp, Cp, dt_BLH = jnp.split(out_BLF, np.cumsum([H * P, H * P, G * N, G * N]), axis=-1)
            z_BLHP, x_BLHP = z.reshape(Bsz, L, H, P), xx.reshape(Bsz, L, H, P)
            B_BLGN, C_BLGN = Bp.reshape(Bsz, L, G, N), Cp.reshape(Bsz, L, G, N)
        else:
            z_BLHP = sharding.einsum("BLD,DHP->BLHP", x_BLD, read(self.in_proj["z"]), out=heads)
            x_BLHP = sharding.einsum("BLD,DHP->BLHP", x_BLD, read(self.in_proj["x"]), out=heads)
            B_BLGN = sharding.einsum("BLD,DGN->BLGN", x_BLD, read(self.in_proj["B"]), out=groups)
            C_BLGN = sharding.einsum("BLD,DGN->BLGN", x_BLD, read(self.in_proj["C"]), out=groups)
            dt_BLH = sharding.einsum("BLD,DH->BLH", x_BLD, read(self.in_proj["dt"]), out=act("act_heads"))
        if cfg.bias:
            b = self.in_proj_bias
            z_BLHP, x_BLHP = z_BLHP + read(b["z"])[None, None], x_BLHP + read(b["x"])[None, None]
            B_BLGN, C_BLGN = B_BLGN + read(b["B"])[None, None], C_BLGN + read(b["C"])[None, None]
            dt_BLH = dt_BLH + read(b["dt"])[None, None]

        def conv(key, u, history):
            bias = read(self.conv1d_bias[key]) if cfg.conv_bias else None
            if seq is not None:  # each sequence shard also gets the previous shard's last W-1 inputs (its halo)
                y, new_history = ssd_cp.causal_conv1d_context_parallel(
                    u, read(self.conv1d[key]), bias, channel_names=("act_heads" if key == "x" else None, None),
                    history_BWE=history, seq_idx_BL=seq_idx_BL,
                )  # fmt: skip
                return jax.nn.silu(y), new_history
            y, new_history = conv_ops.causal_conv1d(u, read(self.conv1d[key]), bias, history_BWE=history,
                                                    seq_idx_BL=seq_idx_BL)  # fmt: skip
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
        cfg, dt = self.cfg, z_BLHP.dtype
        Bsz, L, H, P = y_BLHP.shape
        G = cfg.n_groups
        gate_BLHP = jax.nn.silu(z_BLHP.astype(jnp.float32))
        y_BLHP = y_BLHP.astype(jnp.float32)
        if cfg.rmsnorm:
            if not cfg.norm_before_gate:
                y_BLHP = y_BLHP * gate_BLHP
            # Mean square per group of H/G heads, written as a contraction with the (H, G) membership matrix so
            # that it holds for any split of the heads over devices (a reshape H -> (G, H/G) would not).
            member_HG = jnp.asarray(np.arange(H)[:, None] // (H // G) == np.arange(G)[None, :], jnp.float32)
            sq_BLH = jnp.sum(jnp.square(y_BLHP), axis=-1)
            ms_BLG = sharding.einsum("BLH,HG->BLG", sq_BLH, member_HG, out=("act_batch", seq, None)) / (H // G * P)
            rstd_BLH = sharding.einsum("BLG,HG->BLH", jax.lax.rsqrt(ms_BLG + cfg.norm_eps), member_HG,
                                       out=("act_batch", seq, "act_heads"))  # fmt: skip
            # Materialised once: the norm-weight gradient then reduces it instead of re-deriving it in the reduction.
            y_BLHP = jax.lax.optimization_barrier(y_BLHP * rstd_BLH[..., None])
            y_BLHP = sharding.read(self.norm, dt)[None, None] * y_BLHP.astype(dt)
            if cfg.norm_before_gate:
                y_BLHP = y_BLHP * gate_BLHP.astype(dt)
        else:
            y_BLHP = y_BLHP * gate_BLHP
        out = ("act_batch", "act_seq" if L % sharding.axis_size("act_seq") == 0 else None, "act_embed")
        y_BLD = sharding.einsum("BLHP,HPD->BLD", y_BLHP.astype(dt), sharding.read(self.out_proj, dt), out=out)
        return y_BLD + sharding.read(self.out_proj_bias, dt)[None, None] if cfg.bias else y_BLD

    def _ssd(self, x_BLHP, delta_BLH, A_H, B_BLGN, C_BLGN, ssm_BHPN, seq_idx_BL, max_norm_H, seq=None):
        """``ops.ssd.ssd`` per (batch, heads) shard; B/C groups follow the heads (see ``_groups_for_heads``).

        With ``seq="act_seq"`` also per sequence shard: ``impl="context_parallel"`` over the mesh axes of act_seq.
        """
        cfg = self.cfg
        lc = cfg.long_context
        chunk = lc.state_norm_chunk if (lc.state_norm and lc.state_norm_chunk) else cfg.chunk_size
        B_BLGN, C_BLGN, g_spec = _groups_for_heads(B_BLGN, C_BLGN, cfg.num_heads)
        decay_scale_H = self._decay_scale()

        h, bl = ("act_heads",), ("act_batch", seq)
        axes = sharding.mesh_axes("act_seq") if seq is not None else ()
        impl, axis_name = (cfg.impl, None) if not axes else ("context_parallel", axes[0] if len(axes) == 1 else axes)
        arrays = dict(x=x_BLHP, delta=delta_BLH, A=A_H, B=B_BLGN, C=C_BLGN, D=sharding.read(self.D, jnp.float32),
                      S0=ssm_BHPN, seq=seq_idx_BL, scale=decay_scale_H, max_norm=max_norm_H)  # fmt: skip
        specs = dict(x=bl + h + (None,), delta=bl + h, A=h, B=bl + g_spec, C=bl + g_spec, D=h,
                     S0=("act_batch",) + h + (None, None), seq=bl, scale=h, max_norm=h)  # fmt: skip
        names = [k for k, v in arrays.items() if v is not None]  # shard_map takes arrays only

        def local(*args):
            a = dict(zip(names, args))
            return ssd_ops.ssd(
                a["x"], a["delta"], a["A"], a["B"], a["C"], chunk_size=chunk, D_H=a["D"], initial_state_BHPN=a["S0"],
                seq_idx_BL=a.get("seq"), decay_scale_H=a.get("scale"), max_state_norm_H=a.get("max_norm"),
                impl=impl, axis_name=axis_name,
            )  # fmt: skip

        fn = sharding.shard_map(local, in_specs=tuple(specs[k] for k in names),
                                out_specs=(specs["x"], specs["S0"]))  # fmt: skip
        return fn(*(arrays[k] for k in names))

    def _longmamba(self, delta_BLH, L: int, calibrated: bool):
        lc = self.cfg.long_context
        if not (lc.longmamba and calibrated and L >= lc.longmamba_min_len):
            return delta_BLH
        global_H = sharding.read(self.longmamba_decay, jnp.float32) > lc.longmamba_c
        theta_H = sharding.read(self.longmamba_threshold, jnp.float32)[ssd_ops.nearest_length(lc.longmamba_lengths, L)]
        return ssd_ops.longmamba_filter(delta_BLH, global_H, lc.longmamba_b * theta_H)

    # ---- public API -----------------------------------------------------------------------------------------
    @_validated_by(lambda self, x_BLD, *, seq_idx_BL=None, state=None: self._check_input(x_BLD, seq_idx_BL, state))
    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, seq_idx_BL: Int[Array, "B L"] | None = None,
        state: Mamba2State | None = None,
    ) -> tuple[Float[Array, "B L D"], Mamba2State]:  # fmt: skip
        """Full-sequence forward (training, prefill). Returns the output and the state after the last token.

        ``state`` continues a previous call (prefill + more tokens == one call). ``seq_idx_BL``: packed documents,
        each as if run alone (conv taps and the SSM state never cross a boundary); ``state`` then feeds the
        first document and the returned state is the last document's.
        """
        return self._forward(x_BLD, seq_idx_BL, state, calibrated=True)

    def _forward(self, x_BLD, seq_idx_BL, state, *, calibrated):
        Bsz, L, _ = x_BLD.shape
        max_norm_H = self._max_state_norm(calibrated)
        seq = self._seq_axis(L, clipping=max_norm_H is not None)
        x_BLD = sharding.shard(x_BLD, "act_batch", seq, "act_embed")
        state = self.init_state(Bsz, x_BLD.dtype) if state is None else state
        state = Mamba2State(
            sharding.shard(state.conv_x, "act_batch", None, "act_heads", None),
            sharding.shard(state.conv_B, "act_batch", None, None, None),
            sharding.shard(state.conv_C, "act_batch", None, None, None),
            sharding.shard(state.ssm, "act_batch", "act_heads", None, None),
        )  # fmt: skip
        if seq_idx_BL is not None:
            seq_idx_BL = sharding.shard(seq_idx_BL, "act_batch", seq)
        z_BLHP, x_BLHP, B_BLGN, C_BLGN, delta_BLH, hist = self._project(x_BLD, state, seq_idx_BL, seq)
        delta_BLH = self._longmamba(delta_BLH, L, calibrated)
        y_BLHP, ssm_BHPN = self._ssd(x_BLHP, delta_BLH, self._A(), B_BLGN, C_BLGN, state.ssm, seq_idx_BL, max_norm_H,
                                     seq)  # fmt: skip
        return self._output(y_BLHP, z_BLHP, seq), Mamba2State(*hist, ssm_BHPN)

    @_validated_by(lambda self, x_BD, state: self._check_input(x_BD[:, None] if x_BD.ndim == 2 else x_BD, None, state))
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
        if not (lc.state_norm or lc.longmamba):
            raise ValueError("calibrate_long_context: enable long_context.state_norm or long_context.longmamba")
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
        if x_BLD.ndim != 3 or x_BLD.shape[-1] != self.cfg.d_model or not jnp.issubdtype(x_BLD.dtype, jnp.floating):
            raise ValueError(f"x: expected a float array of shape (B, L, d_model={self.cfg.d_model}) (x_BD: (B, "
                             f"d_model) in step), got {x_BLD.dtype} {tuple(x_BLD.shape)}")  # fmt: skip
        if seq_idx_BL is not None and (tuple(seq_idx_BL.shape) != tuple(x_BLD.shape[:2])
                                       or not jnp.issubdtype(seq_idx_BL.dtype, jnp.integer)):  # fmt: skip
            raise ValueError(f"seq_idx_BL: expected an integer array of shape (B, L) = {tuple(x_BLD.shape[:2])}, "
                             f"got {seq_idx_BL.dtype} {tuple(seq_idx_BL.shape)}")  # fmt: skip
        if state is not None:
            want = self.init_state(x_BLD.shape[0])
            if not isinstance(state, Mamba2State) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(state, want)):
                got = [tuple(a.shape) for a in state] if isinstance(state, tuple) else type(state).__name__
                want_shapes = [tuple(a.shape) for a in want]
                raise ValueError(f"state: expected a Mamba2State with shapes {want_shapes}, got {got}")


def _groups_for_heads(B_BLGN, C_BLGN, H: int):
    """Lay out the B/C groups so that every heads shard holds the groups of its heads.

    G divisible by the heads shards t: shard G along with the heads. t divisible by G (e.g. G = 1): repeat each
    group t/G times, so shard i gets the one group serving its heads. Returns (B, C, logical spec of (G, N)).
    """
    G = B_BLGN.shape[2]
    t = sharding.axis_size("act_heads")
    if t == 1:
        return B_BLGN, C_BLGN, (None, None)
    if H % t:
        raise ValueError(f"Mamba2: num_heads={H} is not divisible by the {t} shards of act_heads")
    if G % t == 0:
        return B_BLGN, C_BLGN, ("act_heads", None)
    if t % G == 0:
        rep = lambda a: jnp.repeat(a, t // G, axis=2)
        return rep(B_BLGN), rep(C_BLGN), ("act_heads", None)
    raise ValueError(f"Mamba2: n_groups={G} and the {t} shards of act_heads must divide one another")


__all__ = ["LongContextConfig", "LongContextStat", "Mamba2", "Mamba2Config", "Mamba2State"]
