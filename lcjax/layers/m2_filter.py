"""The implicit long filter of Monarch Mixer (the Hyena filter as used by M2-BERT).

"Hyena Hierarchy", Poli et al. 2023, https://arxiv.org/abs/2302.10866; "Monarch Mixer", Fu et al. 2023,
https://arxiv.org/abs/2310.12109. Checked against HazyResearch/m2 ``bert/src/mm/hyena_utils.py`` (``HyenaFilter``,
``PositionalEmbedding``, ``Sin``, ``ExponentialModulation``).

``kernels(L)`` returns ``k_fwd`` (and ``k_rev`` when bidirectional), each ``(L, D)``:

1. features ``z`` ``(l_max, e)`` = ``[t, Re e^{-i f w}, Im e^{-i f w}]`` with ``t = linspace(0, 1, l_max)``,
   ``w_j = 2πj/l_max``, ``f = linspace(1e-4, bands − 1, bands)``, ``bands = (e − 1)//2``. ``z`` is a *trainable*
   parameter (upstream trains it at lr 1e-5), so checkpoints are loaded, not recomputed. ``L < l_max`` uses the
   prefix ``z[:L]``: a short filter is a prefix of the long one.
2. MLP ``Linear(e,o) → Sin → Linear(o,o) → Sin → Linear(o,o) → Sin → Linear(o,D, no bias)`` with
   ``Sin(x) = sin(w_mod · freq ⊙ x)``; **one** ``freq`` (init ``w``) is shared by every Sin of both MLPs.
3. modulation ``h ⊙ exp(−t·|δ|)``, ``δ = linspace(log(1e-2)/1.5, log(1e-2)/0.3, D)``. ``t`` and ``δ`` are fixed
   buffers upstream; here they are ``Buffer`` variables (not ``nnx.Param``: no gradient, not optimised), so a
   checkpoint's exact float32 values are loaded (torch's ``linspace`` differs from numpy's in the last bit).

The reverse MLP (``rev``) has its own Linears but shares ``z``, ``t``, ``freq`` and ``δ``. ``bias`` is the skip
term ``D`` (``y = conv(v) + D ⊙ v``), not an additive bias; upstream inits it N(0, 1). Filter dropout is never
applied upstream and is not implemented. Dimension key: L length, D channels; e = emb_dim, o = order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import checks, sharding
from lcjax.typing import Array, Float

LINEAR_INITS = ("torch", "bert")


class Buffer(nnx.Variable):
    """A fixed, non-trainable array saved with the model (torch ``register_buffer``)."""


def buffer(value: jax.Array, *logical) -> Buffer:
    return Buffer(value, out_sharding=tuple(logical), eager_sharding=sharding.mesh_active())


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyenaFilterConfig:
    """One implicit filter; defaults are upstream ``MonarchMixerSequenceMixing``'s (M2-BERT uses emb 5, order 128)."""

    d_model: int
    l_max: int = 128
    emb_dim: int = 3
    order: int = 16
    w: float = 10.0
    w_mod: float = 1.0
    bidirectional: bool = False
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    target: float = 1e-2
    shift: float = 0.0
    linear_init: str = "torch"  # "torch": nn.Linear's U(±1/√fan_in); "bert": HF post_init N(0, 0.02), zero bias

    def __post_init__(self):
        name = "HyenaFilterConfig."
        for field in ("d_model", "l_max", "order"):
            checks.require_int(name + field, getattr(self, field), min=1)
        checks.require_int(name + "emb_dim", self.emb_dim)
        checks.require(self.emb_dim >= 3 and self.emb_dim % 2 == 1,
                       f"{name}emb_dim={self.emb_dim} must be odd and >= 3 (time, cos, sin)")  # fmt: skip
        for field in ("w", "w_mod", "shift"):
            checks.require_float(name + field, getattr(self, field))
        for field in ("fast_decay_pct", "slow_decay_pct", "target"):
            checks.require_float(name + field, getattr(self, field), min=0, min_open=True)
        checks.require_bool(name + "bidirectional", self.bidirectional)
        checks.require_choice(name + "linear_init", self.linear_init, LINEAR_INITS)


def positional_features(l_max: int, emb_dim: int) -> np.ndarray:
    """The initial ``z`` ``(l_max, emb_dim)`` (float32): ``[t, Re e^{-ifw}, Im e^{-ifw}]``."""
    t = np.linspace(0.0, 1.0, l_max)[:, None]
    bands = (emb_dim - 1) // 2
    w = 2 * math.pi * np.arange(l_max)[:, None] / l_max
    f = np.linspace(1e-4, bands - 1, bands)[None, :]
    z = np.exp(-1j * f * w)
    return np.concatenate([t, z.real, z.imag], axis=-1).astype(np.float32)


def time_grid(l_max: int) -> np.ndarray:
    """``t = linspace(0, 1, l_max)`` (the ``pos_emb.t`` buffer), float32."""
    return np.linspace(0.0, 1.0, l_max).astype(np.float32)


def decay_rates(cfg: HyenaFilterConfig) -> np.ndarray:
    """``δ`` ``(D,)`` of ``ExponentialModulation`` (the ``modulation.deltas`` buffer), float32."""
    max_decay = math.log(cfg.target) / cfg.fast_decay_pct
    min_decay = math.log(cfg.target) / cfg.slow_decay_pct
    return np.linspace(min_decay, max_decay, cfg.d_model).astype(np.float32)


def random_parts(key, specs: list[tuple[tuple[int, ...], str, float]], dtype=jnp.float32) -> list[jax.Array]:
    """Several arrays from ONE uniform draw: ``specs`` holds ``(shape, kind, scale)`` with kind ``"uniform"``
    (``U(±scale)``), ``"normal"`` (``N(0, scale²)``, via ``√2·erfinv`` of the uniform, as ``jax.random.normal``) or
    ``"zeros"``. Every threefry call site costs about a second of XLA CPU compile time, so a module draws once."""
    sizes = [math.prod(shape) for shape, kind, _ in specs if kind != "zeros"]
    lo = np.nextafter(np.float32(-1), np.float32(0))
    flat = jax.random.uniform(key, (sum(sizes),), dtype, minval=lo, maxval=1.0) if sizes else None
    out, start = [], 0
    for shape, kind, scale in specs:
        if kind == "zeros":
            out.append(jnp.zeros(shape, dtype))
            continue
        part = flat[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
        if kind == "normal":
            part = np.sqrt(2.0).astype(np.float32) * jax.lax.erf_inv(part)
        else:
            checks.require_choice("random_parts: kind", kind, ("uniform", "normal", "zeros"))
        out.append(scale * part)
    return out


def linear_specs(w_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in: int, init: str):
    """nn.Linear's ``U(±1/√fan_in)`` for weight and bias (``"torch"``) or HF BERT's ``N(0, 0.02)`` and zeros."""
    if init == "torch":
        return [(w_shape, "uniform", 1.0 / math.sqrt(fan_in)), (b_shape, "uniform", 1.0 / math.sqrt(fan_in))]
    return [(w_shape, "normal", 0.02), (b_shape, "zeros", 0.0)]


class SinMLP(nnx.Module):
    """``Linear → Sin → Linear → Sin → Linear → Sin → Linear(no bias)``; the (shared) Sin frequency is passed in."""

    def __init__(self, values: list[jax.Array]):
        """``values``: ``[w0, b0, w1, b1, w2, b2, w3]`` drawn by the owning ``HyenaFilter`` (``specs``)."""
        for i in range(3):
            setattr(self, f"w{i}", sharding.param(values[2 * i], None, None))
            setattr(self, f"b{i}", sharding.param(values[2 * i + 1], None))
        self.w3 = sharding.param(values[6], None, "mlp")

    @staticmethod
    def specs(cfg: HyenaFilterConfig):
        e, o, d, init = cfg.emb_dim, cfg.order, cfg.d_model, cfg.linear_init
        out = []
        for fan_in, fan_out in [(e, o), (o, o), (o, o)]:
            out += linear_specs((fan_in, fan_out), (fan_out,), fan_in, init)
        return out + linear_specs((o, d), (d,), o, init)[:1]

    def __call__(self, z_LE: Float[Array, "L E"], freq_O: Float[Array, " O"], w_mod: float) -> Float[Array, "L D"]:
        sin = lambda x: jnp.sin(w_mod * freq_O[None, :] * x)
        hp = jax.lax.Precision.HIGHEST
        h_LO = sin(jnp.einsum("le,eo->lo", z_LE, self.w0[...], precision=hp) + self.b0[...][None, :])
        h_LO = sin(jnp.einsum("lo,op->lp", h_LO, self.w1[...], precision=hp) + self.b1[...][None, :])
        h_LO = sin(jnp.einsum("lo,op->lp", h_LO, self.w2[...], precision=hp) + self.b2[...][None, :])
        return jnp.einsum("lo,od->ld", h_LO, self.w3[...], precision=hp)


class HyenaFilter(nnx.Module):
    """Implicit long filter: ``kernels(L) -> (k_LD, k_rev_LD | None)`` plus the skip term ``bias`` (``D``)."""

    def __init__(self, cfg: HyenaFilterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        mlp = SinMLP.specs(cfg)
        values = random_parts(rngs.params(), [((cfg.d_model,), "normal", 1.0)] + mlp * (2 if cfg.bidirectional else 1))
        self.bias = sharding.param(values[0], "mlp")  # the skip term D ~ N(0, 1)
        self.z = sharding.param(jnp.asarray(positional_features(cfg.l_max, cfg.emb_dim)), None, None)
        self.freq = sharding.param(jnp.full((cfg.order,), cfg.w, jnp.float32), None)
        self.t = buffer(jnp.asarray(time_grid(cfg.l_max)), None)
        self.deltas = buffer(jnp.asarray(decay_rates(cfg)), "mlp")
        self.implicit_filter = SinMLP(values[1 : 1 + len(mlp)])
        self.implicit_filter_rev = SinMLP(values[1 + len(mlp) :]) if cfg.bidirectional else None

    def kernels(self, length: int) -> tuple[Float[Array, "L D"], Float[Array, "L D"] | None]:
        cfg = self.cfg
        checks.require_int("HyenaFilter.kernels: length", length)
        checks.require(1 <= length <= cfg.l_max,
                       f"HyenaFilter: sequence length {length} must be in [1, l_max={cfg.l_max}]")  # fmt: skip
        z_LE = self.z[...][:length]
        t_L1 = jax.lax.stop_gradient(self.t[...][:length, None])  # buffers: no gradient, as upstream
        deltas_1D = jax.lax.stop_gradient(self.deltas[...][None])
        decay_LD = jnp.exp(-t_L1 * jnp.abs(deltas_1D)) + cfg.shift
        freq = self.freq[...]
        k_LD = self.implicit_filter(z_LE, freq, cfg.w_mod) * decay_LD
        if self.implicit_filter_rev is None:
            return k_LD, None
        return k_LD, self.implicit_filter_rev(z_LE, freq, cfg.w_mod) * decay_LD
