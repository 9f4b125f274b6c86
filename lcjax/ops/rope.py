"""Rotary position embeddings (RoPE) with every frequency schedule of transformers 5.23.

RoPE: "RoFormer", Su et al. 2021, https://arxiv.org/abs/2104.09864. Layout is HF's "rotate_half" (GPT-NeoX): the
rotated part of the head dim splits into halves ``[x1, x2]`` that rotate as pairs ``(x1_i, x2_i)`` by angle
``pos · inv_freq_i``; with ``partial_rotary_factor < 1`` only the first ``R = int(head_dim · partial_rotary_factor)``
dims rotate and the rest pass through (Phi-3 / GPT-NeoX). HF checkpoints are stored in this layout, so weights copy
unchanged. Angles are always float32 (``float(pos) · inv_freq``, as HF), whatever the input dtype; cos/sin are
multiplied by ``attention_scaling`` and then cast to the input dtype, exactly as HF's rotary embedding does.

Frequency schedules (``RopeConfig.rope_type``), written from the math of the papers and checked against
``transformers/modeling_rope_utils.py`` (5.23); ``d = R`` below, ``b = theta``, ``L0`` the original context:

- ``default``: ``inv_freq_i = b^(-2i/d)``. **Static NTK** (bloc97, 2023) is not a separate type: it is ``default``
  with ``theta = RopeConfig.static_ntk(theta, factor, rotary_dim)`` = ``b · s^(d/(d-2))``.
- ``linear``: position interpolation (Chen et al. 2023, arXiv 2306.15595), ``inv_freq / factor``.
- ``dynamic``: dynamic NTK (emozilla, 2023). With ``seq_len = max(positions) + 1`` and ``L0 =
  max_position_embeddings``: for ``seq_len > L0`` the base becomes ``b · (factor·seq_len/L0 - (factor-1))^(d/(d-2))``,
  otherwise the original frequencies. Computed inside the traced function (float32, as HF; XLA's float32 pow is a
  few ulps from torch's, ~5e-6 in q/k at position 50 in the parity test), ``attention_scaling=1``.
- ``yarn``: YaRN (Peng et al. 2023, arXiv 2309.00071), NTK-by-parts: a linear ramp over the dims between
  ``find_correction_dim(beta_fast)`` and ``(beta_slow)`` (floored/ceiled when ``truncate``) blends ``inv_freq/factor``
  and ``inv_freq``; ``attention_factor`` defaults to ``0.1·ln(factor) + 1``, or to DeepSeek's
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set. ``factor=None`` means
  ``max_position_embeddings / original_max_position_embeddings``.
- ``longrope``: LongRoPE (Ding et al. 2024, arXiv 2402.13753; Phi-3 "su"): ``inv_freq_i = 1/(f_i · b^(2i/d))``
  with per-dim ``long_factor`` when ``seq_len > original_max_position_embeddings``, else ``short_factor``;
  ``attention_factor`` defaults to ``sqrt(1 + ln(factor) / ln(L0))`` (1 if ``factor <= 1``) and applies at every length.
- ``llama3``: Llama 3.1's wavelength-dependent smoothing between ``inv_freq`` and ``inv_freq / factor``.

Generation with a KV cache, where HF differs: HF keeps dynamic NTK's ``inv_freq`` as module *state*: it is recomputed
only when ``seq_len`` grows past the largest length seen so far and reset only when ``seq_len < L0``, so a call at 40
tokens after one at 60 reuses the 60-token base. (LongRoPE picks short or long from each call's ``seq_len``.) Both
cache *post-RoPE* keys, so during generation the keys of earlier steps keep the frequencies of the step that produced
them: a prompt of 30 tokens is rotated with LongRoPE's short factors, the tokens generated past L0 with the long ones,
and dynamic NTK's base changes at every step past L0. lcjax is a pure function of the current call: every call uses
``seq_len = max(positions) + 1`` of that call (the whole batch, as HF's ``torch.max(position_ids)``), and its
``KVCache`` also stores post-RoPE keys. Prefill then decode therefore matches HF's prefill-then-decode step for step
(each decode step's ``seq_len`` is its position + 1, which only grows; tested in tests/parity/test_rope_torch.py);
lcjax differs only where HF's state leaks across independent calls (a long call followed by a shorter one).
Dimension key (lcjax/typing.py): B batch, L length, H heads, P head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lcjax import checks
from lcjax.ops import segments
from lcjax.typing import Array, Float, Int

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_SCALED = ("linear", "dynamic", "yarn", "longrope", "llama3")  # types that read ``factor``
_NEEDS_ORIGINAL = ("yarn", "longrope", "llama3")  # types that read ``original_max_position_embeddings``


def _optional_float(name, value, **kw):
    return None if value is None else checks.require_float(name, value, **kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """RoPE frequency schedule; the fields are HF's ``rope_parameters`` (each used only by the types that read it).

    ``original_max_position_embeddings=None`` falls back to ``max_position_embeddings`` (as transformers'
    standardisation does); ``factor=None`` (yarn, longrope) means ``max_position_embeddings /
    original_max_position_embeddings``. Both are resolved here, so equal schedules compare equal.
    """

    theta: float = 10_000.0
    rope_type: str = "default"
    factor: float | None = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None  # llama3, yarn, longrope
    max_position_embeddings: int | None = None  # dynamic (its L0); yarn/longrope when factor is None
    attention_factor: float | None = None  # yarn, longrope (None: the paper's default)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn (DeepSeek)
    mscale_all_dim: float | None = None  # yarn (DeepSeek)
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self):
        t = checks.require_choice("RopeConfig.rope_type", self.rope_type, ROPE_TYPES)
        checks.require_float("RopeConfig.theta", self.theta, min=0, min_open=True)
        checks.require_float("RopeConfig.partial_rotary_factor", self.partial_rotary_factor, min=0, max=1,
                             min_open=True)  # fmt: skip
        checks.require_optional_int("RopeConfig.max_position_embeddings", self.max_position_embeddings, min=1)
        checks.require_optional_int("RopeConfig.original_max_position_embeddings",
                                    self.original_max_position_embeddings, min=1)  # fmt: skip
        if t in _NEEDS_ORIGINAL and self.original_max_position_embeddings is None:
            checks.require(self.max_position_embeddings is not None,
                           f"RopeConfig.original_max_position_embeddings is required for rope_type={t!r} (or give "
                           "RopeConfig.max_position_embeddings, which it then defaults to)")  # fmt: skip
            object.__setattr__(self, "original_max_position_embeddings", self.max_position_embeddings)
        if t == "dynamic":
            checks.require(self.max_position_embeddings is not None,
                           "RopeConfig.max_position_embeddings is required for rope_type='dynamic' (the length past "
                           "which the NTK base grows)")  # fmt: skip
        if t in ("yarn", "longrope") and self.factor is None:
            checks.require(self.max_position_embeddings is not None,
                           f"RopeConfig.factor=None for rope_type={t!r} needs RopeConfig.max_position_embeddings "
                           "(factor = max_position_embeddings / original_max_position_embeddings)")  # fmt: skip
            object.__setattr__(self, "factor", self.max_position_embeddings / self.original_max_position_embeddings)
        checks.require(self.factor is not None, f"RopeConfig.factor=None is allowed for yarn/longrope only, got "
                                                f"rope_type={t!r}")  # fmt: skip
        checks.require_float("RopeConfig.factor", self.factor, min=1.0 if t in _SCALED else None)
        _optional_float("RopeConfig.attention_factor", self.attention_factor, min=0, min_open=True)
        checks.require_float("RopeConfig.beta_fast", self.beta_fast, min=0, min_open=True)
        checks.require_float("RopeConfig.beta_slow", self.beta_slow, min=0, min_open=True)
        checks.require(t != "yarn" or self.beta_fast >= self.beta_slow,
                       f"RopeConfig.beta_fast={self.beta_fast} must be >= beta_slow={self.beta_slow} for "
                       "rope_type='yarn'")  # fmt: skip
        _optional_float("RopeConfig.mscale", self.mscale)
        _optional_float("RopeConfig.mscale_all_dim", self.mscale_all_dim)
        checks.require_bool("RopeConfig.truncate", self.truncate)
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                checks.require(t != "longrope", f"RopeConfig.{name} is required for rope_type='longrope'")
                continue
            checks.require(isinstance(value, (tuple, list)), f"RopeConfig.{name} must be a tuple of floats, got "
                                                             f"{type(value).__name__}")  # fmt: skip
            value = tuple(checks.require_float(f"RopeConfig.{name}[{i}]", v, min=0, min_open=True)
                          for i, v in enumerate(value))  # fmt: skip
            object.__setattr__(self, name, value)
        checks.require_float("RopeConfig.low_freq_factor", self.low_freq_factor, min=0, min_open=True)
        checks.require_float("RopeConfig.high_freq_factor", self.high_freq_factor, min=0, min_open=True)
        checks.require(
            t != "llama3" or self.high_freq_factor > self.low_freq_factor,
            f"RopeConfig.high_freq_factor={self.high_freq_factor} must be > low_freq_factor={self.low_freq_factor} "
            "for rope_type='llama3'",
        )

    @staticmethod
    def static_ntk(theta: float, factor: float, head_dim: int) -> float:
        """Static NTK-aware scaling as a theta change: ``theta · factor^(d/(d-2))`` (use it with ``default``).

        ``head_dim`` is the rotated dim ``d`` (``int(head_dim · partial_rotary_factor)``)."""
        checks.require_float("RopeConfig.static_ntk: theta", theta, min=0, min_open=True)
        checks.require_float("RopeConfig.static_ntk: factor", factor, min=1.0)
        checks.require_int("RopeConfig.static_ntk: head_dim", head_dim, min=4)
        return float(theta * factor ** (head_dim / (head_dim - 2)))


def rotary_dim(head_dim: int, cfg: RopeConfig) -> int:
    """``R = int(head_dim · partial_rotary_factor)``, the rotated leading dims (even; checked against the factors)."""
    checks.require_int("rope: head_dim", head_dim, min=2)
    R = int(head_dim * cfg.partial_rotary_factor)
    checks.require(R >= 2 and R % 2 == 0, f"rope: head_dim={head_dim} * RopeConfig.partial_rotary_factor="
                                          f"{cfg.partial_rotary_factor} = {R} rotated dims; must be even and >= 2")
    if cfg.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            n = len(getattr(cfg, name))
            checks.require(n == R // 2, f"RopeConfig.{name} has {n} entries; rotary_dim/2 = {R // 2} needed "
                                        f"(head_dim={head_dim}, partial_rotary_factor={cfg.partial_rotary_factor})")
    return R


def _exponent(R: int) -> np.ndarray:
    return np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / R  # float32, as HF


def _theta_pow(theta: float, R: int) -> np.ndarray:
    """``theta ** exponent`` rounded once to float32: torch's float32 pow is (nearly) correctly rounded, numpy's
    float32 pow is not (it differs from HF in a few ulps of some entries, 1e-5 in the angle at position ~50)."""
    return (np.float64(theta) ** _exponent(R).astype(np.float64)).astype(np.float32)


def _rdiv(scalar: float | int, x: np.ndarray) -> np.ndarray:
    """``scalar / x`` in float32 rounded as torch rounds it (``Tensor.__rtruediv__`` is ``reciprocal() * scalar``)."""
    return (np.float32(1) / x) * np.float32(scalar)


def _yarn(R: int, cfg: RopeConfig) -> tuple[np.ndarray, float]:
    s = cfg.factor
    if cfg.attention_factor is not None:
        scaling = cfg.attention_factor
    else:
        mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        deepseek = cfg.mscale and cfg.mscale_all_dim  # HF: both set and nonzero
        scaling = mscale(s, cfg.mscale) / mscale(s, cfg.mscale_all_dim) if deepseek else mscale(s)
    L0 = cfg.original_max_position_embeddings
    dim_of = lambda n_rot: R * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.theta))
    low, high = dim_of(cfg.beta_fast), dim_of(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001  # the paper's guard against a zero-width ramp
    pos_freqs = _theta_pow(cfg.theta, R)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(s) * pos_freqs)
    ramp = np.clip((np.arange(R // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency: 1 at high frequencies
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(scaling)


def _longrope_scaling(cfg: RopeConfig) -> float:
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    L0 = cfg.original_max_position_embeddings
    return 1.0 if cfg.factor <= 1.0 else math.sqrt(1 + math.log(cfg.factor) / math.log(L0))


def rope_frequencies(head_dim: int, cfg: RopeConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """``(inv_freq[rotary_dim // 2], attention_scaling)`` as static float32 numpy.

    ``seq_len`` (a Python int) selects the length-dependent schedules (dynamic, longrope); ``None`` gives the
    short-context frequencies, as HF computes them at init. ``rope`` picks them inside the trace instead."""
    R = rotary_dim(head_dim, cfg)
    inv_freq = (1.0 / _theta_pow(cfg.theta, R)).astype(np.float32)
    t = cfg.rope_type
    if t == "linear":
        return (inv_freq / np.float32(cfg.factor)).astype(np.float32), 1.0
    if t == "dynamic":
        if seq_len is None or seq_len <= cfg.max_position_embeddings:
            return inv_freq, 1.0
        return np.asarray(_dynamic_inv_freq(R, cfg, jnp.asarray(seq_len, jnp.int32))), 1.0
    if t == "yarn":
        return _yarn(R, cfg)
    if t == "longrope":
        long = seq_len is not None and seq_len > cfg.original_max_position_embeddings
        ext = np.asarray(cfg.long_factor if long else cfg.short_factor, np.float32)
        return (1.0 / (ext * _theta_pow(cfg.theta, R))).astype(np.float32), _longrope_scaling(cfg)
    if t == "llama3":
        L0, lo, hi, s = (cfg.original_max_position_embeddings, cfg.low_freq_factor, cfg.high_freq_factor, cfg.factor)
        wavelen = _rdiv(2 * math.pi, inv_freq)
        scaled = np.where(wavelen > L0 / lo, inv_freq / s, inv_freq)
        smooth = (_rdiv(L0, wavelen) - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / s + smooth * scaled
        medium = (wavelen >= L0 / hi) & (wavelen <= L0 / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    return inv_freq, 1.0


def _dynamic_inv_freq(R: int, cfg: RopeConfig, seq_len) -> Float[Array, " F"]:
    """Dynamic-NTK inv_freq for a (traced) length, float32 throughout as HF (``seq_len`` clamped to ``L0``)."""
    L0, s = cfg.max_position_embeddings, cfg.factor
    n = jnp.maximum(seq_len, L0).astype(jnp.float32)
    base = cfg.theta * ((s * n / L0) - (s - 1)) ** (R / (R - 2))
    return 1.0 / (base ** jnp.asarray(_exponent(R)))


def inv_freq_for_length(head_dim: int, cfg: RopeConfig, seq_len) -> tuple[Float[Array, " F"], float]:
    """``(inv_freq, attention_scaling)`` for a traced or concrete ``seq_len`` (dynamic / longrope switch on it)."""
    inv_freq, scaling = rope_frequencies(head_dim, cfg)
    if cfg.rope_type == "dynamic":
        R = rotary_dim(head_dim, cfg)
        grown = _dynamic_inv_freq(R, cfg, seq_len)
        return jnp.where(seq_len > cfg.max_position_embeddings, grown, jnp.asarray(inv_freq)), scaling
    if cfg.rope_type == "longrope":
        long, _ = rope_frequencies(head_dim, cfg, seq_len=cfg.original_max_position_embeddings + 1)
        is_long = seq_len > cfg.original_max_position_embeddings
        return jnp.where(is_long, jnp.asarray(long), jnp.asarray(inv_freq)), scaling
    return jnp.asarray(inv_freq), scaling


def rope(
    x_BLHP: Float[Array, "B L H P"], positions_BL: Int[Array, "B L"], cfg: RopeConfig, *, head_dim: int | None = None
) -> Float[Array, "B L H P"]:
    """Rotate the first ``rotary_dim`` dims of ``x`` by its tokens' positions; the others pass through.

    The one entry the attention layer calls. ``seq_len = max(positions) + 1`` (over the whole batch, traceable)
    drives dynamic NTK and LongRoPE's short/long switch; see the module docstring for generation."""
    P = x_BLHP.shape[-1]
    head_dim = P if head_dim is None else head_dim
    checks.require(P == head_dim, f"rope: x_BLHP head dim {P} != head_dim={head_dim}")
    checks.require(positions_BL.shape == x_BLHP.shape[:2], f"rope: positions_BL shape {tuple(positions_BL.shape)} "
                                                           f"!= x_BLHP's [B, L] {tuple(x_BLHP.shape[:2])}")
    seq_len = jnp.max(positions_BL) + 1 if cfg.rope_type in ("dynamic", "longrope") else None
    inv_freq, scaling = inv_freq_for_length(head_dim, cfg, seq_len)
    R = 2 * inv_freq.shape[0]
    rotated = _rotate(x_BLHP[..., :R], positions_BL, inv_freq, scaling)
    return rotated if R == P else jnp.concatenate([rotated, x_BLHP[..., R:]], axis=-1)


def _rotate(x_BLHR, positions_BL, inv_freq_F, scaling):
    angle_BLF = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F, jnp.float32)[None, None, :]
    cos_BL1F = (jnp.cos(angle_BLF) * scaling).astype(x_BLHR.dtype)[:, :, None, :]
    sin_BL1F = (jnp.sin(angle_BLF) * scaling).astype(x_BLHR.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHR, 2, axis=-1)
    return jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)


def apply_rope(
    x_BLHP: Float[Array, "B L H P"], positions_BL: Int[Array, "B L"], inv_freq: np.ndarray, scaling: float = 1.0
) -> Float[Array, "B L H P"]:
    """Rotate all of ``x``'s head dim by given static frequencies (a helper; layers call ``rope``)."""
    if x_BLHP.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"apply_rope: head dim {x_BLHP.shape[-1]} != 2 * len(inv_freq) = {2 * inv_freq.shape[0]}")
    return _rotate(x_BLHP, positions_BL, inv_freq, scaling)


def positions_from_segments(segment_ids_BL: Int[Array, "B L"]) -> Int[Array, "B L"]:
    """Positions that restart at 0 at every change of segment id (packed documents; ``lcjax.ops.segments``)."""
    return segments.run_offsets(segment_ids_BL)
