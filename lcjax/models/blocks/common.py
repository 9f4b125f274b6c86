"""What every residual block of the decoder LM is built from: ``BlockDims`` and the SwiGLU MLP half-block.

A block type is a class ``Block(dims: BlockDims, mixer: <its mixer config>, *, rngs)`` with the LM block interface
``block(x_BLD, *, positions_BL, segment_ids_BL, cache) -> (x_BLD, cache)`` and ``block.init_cache(batch, length,
dtype)``, plus two class-level hooks the LM config uses: ``mixer_config`` (the type of its mixer config) and
``check(dims, mixer, *, max_seq_len, name)`` (raise ``ValueError`` naming ``name`` when the mixer config does not
fit the model). Blocks never see ``LMConfig``; ``lcjax/models/blocks/__init__.py`` registers them.
Dimension key (lcjax/typing.py): B batch, L length, D model.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from lcjax import checks
from lcjax.layers.basic import MLP, RMSNorm

DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockDims:
    """The model-wide sizes a block needs: width, norm epsilon, SwiGLU width and bias, compute/parameter dtypes."""

    d_model: int
    norm_eps: float = 1e-5
    mlp_dim: int = 0  # 0: no MLP (Mamba-2 blocks); attention and m2 blocks need >= 1 (their ``check``)
    mlp_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        checks.require_int("BlockDims.d_model", self.d_model, min=1)
        checks.require_float("BlockDims.norm_eps", self.norm_eps, min=0.0, min_open=True)
        checks.require_int("BlockDims.mlp_dim", self.mlp_dim, min=0)
        checks.require_bool("BlockDims.mlp_bias", self.mlp_bias)
        checks.require_choice("BlockDims.dtype", self.dtype, DTYPES)
        checks.require_choice("BlockDims.param_dtype", self.param_dtype, DTYPES)


def check_mixer_width(name: str, mixer: Any, dims: BlockDims) -> None:
    """The mixer config's ``d_model`` equals the model's (``ValueError`` naming ``name`` otherwise)."""
    checks.require(mixer.d_model == dims.d_model, f"{name}.d_model={mixer.d_model} must equal d_model={dims.d_model}")


def check_mlp(name: str, dims: BlockDims) -> None:
    """Blocks with a SwiGLU half-block need ``mlp_dim >= 1``."""
    checks.require(dims.mlp_dim >= 1, f"LMConfig.mlp_dim={dims.mlp_dim} must be >= 1 for {name} blocks")


def mixer_config_from_mapping(cls: type, fields: Mapping[str, Any], name: str) -> Any:
    """``cls(**fields)`` where nested dataclass fields may be given as mappings and tuples as lists (config files)."""
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    kw = {}
    for key, value in fields.items():
        checks.require(key in allowed, f"{name}: unknown field {key!r} of {cls.__name__}; allowed: {sorted(allowed)}")
        sub = next((t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)), None)
        if sub is not None and isinstance(value, Mapping):
            value = mixer_config_from_mapping(sub, value, f"{name}.{key}")
        kw[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kw)


def make_norm(dims: BlockDims) -> RMSNorm:
    """The block's pre-norm (RMSNorm over ``d_model``)."""
    return RMSNorm(dims.d_model, eps=dims.norm_eps, param_dtype=jnp.dtype(dims.param_dtype))


def make_mlp(dims: BlockDims, *, rngs: nnx.Rngs) -> MLP:
    """The block's SwiGLU MLP (``d_model -> mlp_dim -> d_model``)."""
    return MLP(dims.d_model, dims.mlp_dim, bias=dims.mlp_bias, param_dtype=jnp.dtype(dims.param_dtype), rngs=rngs)
