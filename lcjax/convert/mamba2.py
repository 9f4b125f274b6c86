"""HF transformers ``Mamba2Mixer`` <-> lcjax ``Mamba2`` weight maps (in-memory tensors; never unpickles).

HF keeps ``in_proj.weight`` as one (2E + 2GN + H, D) block with rows [z | x | B | C | dt] and ``conv1d.weight`` as
(E + 2GN, 1, W) with channels [x | B | C]; lcjax keeps one array per piece (see ``lcjax/layers/mamba2.py``), so
import splits and export concatenates. Head-major flattening (channel = h·P + p, g·N + n) as HF's ``view``s.

    HF key                 lcjax variable                          transform
    in_proj.weight         in_proj.{z,x: (D,H,P); B,C: (D,G,N); dt: (D,H)}   row split, transpose, reshape
    in_proj.bias           in_proj_bias.{z,x,B,C,dt}               split, reshape
    conv1d.weight          conv1d.{x: (W,H,P); B,C: (W,G,N)}       [:, 0, :].T, channel split, reshape
    conv1d.bias            conv1d_bias.{x,B,C}                     channel split, reshape
    dt_bias, A_log, D      same names (H,)                         as is
    norm.weight            norm (H,P)                              reshape
    out_proj.weight        out_proj (H,P,D)                        transpose, reshape
    out_proj.bias          out_proj_bias (D,)                      as is
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.layers.mamba2 import Mamba2, Mamba2Config


def mixer_config_from_hf(hf_config: Any, **overrides) -> Mamba2Config:
    """``Mamba2Config`` of a ``transformers.Mamba2Config`` (or anything with its attribute names)."""
    expand, rem = divmod(int(hf_config.expand * hf_config.hidden_size), hf_config.hidden_size)
    if rem:
        raise ValueError(f"hf_config.expand={hf_config.expand}: expand·hidden_size must be a multiple of hidden_size")
    fields = dict(
        d_model=hf_config.hidden_size, d_state=hf_config.state_size, d_conv=hf_config.conv_kernel, expand=expand,
        head_dim=hf_config.head_dim, n_groups=hf_config.n_groups, chunk_size=hf_config.chunk_size,
        dt_min=hf_config.time_step_min, dt_max=hf_config.time_step_max, dt_init_floor=hf_config.time_step_floor,
        dt_limit=tuple(hf_config.time_step_limit), conv_bias=hf_config.use_conv_bias, bias=hf_config.use_bias,
        norm_eps=hf_config.layer_norm_epsilon,
    )  # fmt: skip
    fields.update(overrides)
    cfg = Mamba2Config(**fields)
    if cfg.num_heads != hf_config.num_heads:
        raise ValueError(f"hf_config.num_heads={hf_config.num_heads} != expand·hidden_size/head_dim = {cfg.num_heads}")
    return cfg


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _pieces(cfg: Mamba2Config) -> list[tuple[str, int, tuple[int, ...]]]:
    E, H, P, G, N = cfg.d_inner, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
    return [("z", E, (H, P)), ("x", E, (H, P)), ("B", G * N, (G, N)), ("C", G * N, (G, N)), ("dt", H, (H,))]


def _split(a: np.ndarray, pieces, axis: int) -> dict[str, np.ndarray]:
    sizes = [n for _, n, _ in pieces]
    if a.shape[axis] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} rows ({'+'.join(map(str, sizes))}) on axis {axis}, got {a.shape}")
    parts = np.split(a, np.cumsum(sizes)[:-1], axis=axis)
    return {name: part for (name, _, _), part in zip(pieces, parts)}


def mixer_params_from_hf(tensors: Mapping[str, Any], cfg: Mamba2Config, prefix: str = "") -> dict[str, Any]:
    """lcjax mixer arrays (nested dict keyed like ``nnx.state(mixer)``) from HF mixer tensors under ``prefix``."""
    get = lambda key: _np(tensors[prefix + key]).astype(np.float32)
    D, H, P, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_conv
    pieces = _pieces(cfg)
    out: dict[str, Any] = {}
    w_in = _split(get("in_proj.weight"), pieces, axis=0)
    out["in_proj"] = {name: w_in[name].T.reshape(D, *shape) for name, _, shape in pieces}
    if cfg.bias:
        b_in = _split(get("in_proj.bias"), pieces, axis=0)
        out["in_proj_bias"] = {name: b_in[name].reshape(shape) for name, _, shape in pieces}
    conv_pieces = pieces[1:4]
    w_conv = get("conv1d.weight")
    if w_conv.shape[1:] != (1, W):
        raise ValueError(f"{prefix}conv1d.weight: expected shape (conv_dim, 1, {W}), got {w_conv.shape}")
    w_conv = _split(w_conv[:, 0, :].T, conv_pieces, axis=1)
    out["conv1d"] = {name: w_conv[name].reshape(W, *shape) for name, _, shape in conv_pieces}
    if cfg.conv_bias:
        b_conv = _split(get("conv1d.bias"), conv_pieces, axis=0)
        out["conv1d_bias"] = {name: b_conv[name].reshape(shape) for name, _, shape in conv_pieces}
    for name in ("dt_bias", "A_log", "D"):
        out[name] = get(name).reshape(H)
    if cfg.rmsnorm:
        out["norm"] = get("norm.weight").reshape(H, P)
    out["out_proj"] = get("out_proj.weight").T.reshape(H, P, D)
    if cfg.bias:
        out["out_proj_bias"] = get("out_proj.bias").reshape(D)
    return out


def load_mixer_params(mixer: Mamba2, params: Mapping[str, Any]) -> Mamba2:
    """Write ``params`` (from ``mixer_params_from_hf``) into ``mixer``'s variables, checking every shape."""

    def assign(node, values, path):
        for key, value in values.items():
            target = node[key] if isinstance(node, nnx.Dict) else getattr(node, key)
            if isinstance(value, Mapping):
                assign(target, value, f"{path}{key}.")
                continue
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{path}{key}: lcjax shape {tuple(target.shape)} != converted {tuple(value.shape)}")
            target.set_value(jnp.asarray(value, target.dtype))  # also fills an abstract (eval_shape) variable

    assign(mixer, params, "")
    return mixer


def mixer_from_hf(hf_mixer: Any, **overrides) -> Mamba2:
    """A ``Mamba2`` holding the weights of an HF ``Mamba2Mixer`` (its config read from the module's attributes)."""
    m = hf_mixer
    lo, hi = m.time_step_limit
    fields = dict(
        d_model=m.hidden_size, d_state=m.ssm_state_size, d_conv=m.conv_kernel_size,
        expand=m.intermediate_size // m.hidden_size, head_dim=m.head_dim, n_groups=m.n_groups,
        chunk_size=m.chunk_size, dt_min=m.time_step_min, dt_max=m.time_step_max, dt_init_floor=m.time_step_floor,
        dt_limit=(float(lo), float(hi)), conv_bias=m.use_conv_bias, bias=m.use_bias, norm_eps=m.layer_norm_epsilon,
    )  # fmt: skip
    fields.update(overrides)
    cfg = Mamba2Config(**fields)
    if cfg.d_inner != m.intermediate_size or cfg.num_heads != m.num_heads:
        raise ValueError(f"hf_mixer: intermediate_size={m.intermediate_size}, num_heads={m.num_heads} do not match "
                         f"d_inner={cfg.d_inner}, num_heads={cfg.num_heads}")  # fmt: skip
    # Every parameter is overwritten, so build the module abstractly (no random init to run or compile).
    mixer = nnx.eval_shape(lambda: Mamba2(cfg, rngs=nnx.Rngs(0)))
    load_mixer_params(mixer, mixer_params_from_hf(m.state_dict(), cfg))
    if cfg.long_context.state_norm or cfg.long_context.longmamba:
        mixer.reset_long_context()
    missing = [k for k, v in nnx.to_flat_state(nnx.state(mixer)) if not isinstance(v.get_value(), jax.Array)]
    if missing:
        raise ValueError(f"hf_mixer: no HF tensor for {missing}")
    return mixer


def mixer_to_hf(mixer: Mamba2, prefix: str = "") -> dict[str, np.ndarray]:
    """HF ``Mamba2Mixer`` state-dict arrays (float32 numpy) of an lcjax mixer: the inverse of the import."""
    cfg = mixer.cfg
    get = lambda var: np.asarray(var[...], np.float32)
    D, W = cfg.d_model, cfg.d_conv
    pieces = _pieces(cfg)
    out = {
        "in_proj.weight": np.concatenate([get(mixer.in_proj[n]).reshape(D, -1).T for n, _, _ in pieces], axis=0),
        "conv1d.weight": np.concatenate([get(mixer.conv1d[n]).reshape(W, -1) for n, _, _ in pieces[1:4]],
                                        axis=1).T[:, None, :],
        "dt_bias": get(mixer.dt_bias), "A_log": get(mixer.A_log), "D": get(mixer.D),
        "out_proj.weight": get(mixer.out_proj).reshape(-1, D).T,
    }  # fmt: skip
    if cfg.bias:
        out["in_proj.bias"] = np.concatenate([get(mixer.in_proj_bias[n]).reshape(-1) for n, _, _ in pieces])
        out["out_proj.bias"] = get(mixer.out_proj_bias)
    if cfg.conv_bias:
        out["conv1d.bias"] = np.concatenate([get(mixer.conv1d_bias[n]).reshape(-1) for n, _, _ in pieces[1:4]])
    if cfg.rmsnorm:
        out["norm.weight"] = get(mixer.norm).reshape(-1)
    return {prefix + k: v for k, v in out.items()}


__all__ = ["load_mixer_params", "mixer_config_from_hf", "mixer_from_hf", "mixer_params_from_hf", "mixer_to_hf"]
