"""Rotary position embeddings (RoPE). "RoFormer", Su et al. 2021, https://arxiv.org/abs/2104.09864.

Layout is HF's "rotate_half" (GPT-NeoX): the head dim splits into halves ``[x1, x2]`` that rotate as pairs
``(x1_i, x2_i)`` by angle ``pos · inv_freq_i``. HF Llama checkpoints are stored in this layout, so weights copy
unchanged. Angles are computed in float32 from integer positions (HF ``position_ids.float() @ inv_freq``), then
cos/sin are cast to the input dtype, exactly as HF does.

Frequency schedules (``rope_type``) mirror ``transformers.modeling_rope_utils``: ``default``, ``linear``
(position interpolation, Chen et al. 2023) and ``llama3`` (Llama 3.1's wavelength-dependent smoothing). Further
long-context variants plug in by adding a branch to ``rope_frequencies``.
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

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """RoPE frequency schedule. ``factor`` etc. are used only by the scaled types."""

    theta: float = 10_000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self):
        checks.require_choice("RopeConfig.rope_type", self.rope_type, ROPE_TYPES)
        checks.require_float("RopeConfig.theta", self.theta, min=0, min_open=True)
        checks.require_float("RopeConfig.factor", self.factor, min=None if self.rope_type == "default" else 1.0)
        checks.require_float("RopeConfig.low_freq_factor", self.low_freq_factor, min=0, min_open=True)
        checks.require_float("RopeConfig.high_freq_factor", self.high_freq_factor, min=0, min_open=True)
        checks.require_int("RopeConfig.original_max_position_embeddings", self.original_max_position_embeddings, min=1)
        checks.require(
            self.rope_type != "llama3" or self.high_freq_factor > self.low_freq_factor,
            f"RopeConfig.high_freq_factor={self.high_freq_factor} must be > low_freq_factor={self.low_freq_factor} "
            "for rope_type='llama3'",
        )


def rope_frequencies(head_dim: int, cfg: RopeConfig) -> tuple[np.ndarray, float]:
    """``(inv_freq[head_dim // 2], attention_scaling)`` as float32 numpy (static, computed once)."""
    checks.require_int("rope_frequencies: head_dim", head_dim, min=2)
    checks.require(head_dim % 2 == 0, f"rope_frequencies: head_dim={head_dim} must be even")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (cfg.theta**exponent)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.factor)
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.original_max_position_embeddings / cfg.low_freq_factor
        high_wavelen = cfg.original_max_position_embeddings / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
        smooth = (cfg.original_max_position_embeddings / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq, 1.0


def apply_rope(
    x_BLHP: Float[Array, "B L H P"], positions_BL: Int[Array, "B L"], inv_freq: np.ndarray, scaling: float = 1.0
) -> Float[Array, "B L H P"]:
    """Rotate ``x`` by its tokens' positions (rotate_half layout)."""
    if x_BLHP.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"apply_rope: head dim {x_BLHP.shape[-1]} != 2 * len(inv_freq) = {2 * inv_freq.shape[0]}")
    angle_BLF = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    cos_BL1F = (jnp.cos(angle_BLF) * scaling).astype(x_BLHP.dtype)[:, :, None, :]
    sin_BL1F = (jnp.sin(angle_BLF) * scaling).astype(x_BLHP.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHP, 2, axis=-1)
    return jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)


def rope_config_from_hf(rope_parameters: dict | None, default_theta: float = 10_000.0) -> RopeConfig:
    """RopeConfig from an HF v5 ``rope_parameters`` dict (``rope_type``, ``rope_theta``, scaling fields)."""
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}")
    kwargs = dict(theta=float(params.get("rope_theta", default_theta)), rope_type=rope_type)
    if rope_type != "default":
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kwargs.update(
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return RopeConfig(**kwargs)


def positions_from_segments(segment_ids_BL: Int[Array, "B L"]) -> Int[Array, "B L"]:
    """Positions that restart at 0 at every change of segment id (packed documents; ``lcjax.ops.segments``)."""
    return segments.run_offsets(segment_ids_BL)
