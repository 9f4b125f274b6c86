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

Whole models (``Mamba2ForCausalLM`` <-> ``LM`` with ``block_pattern=("mamba2",)``, ``lcjax/models/blocks/mamba2.py``):

    backbone.embeddings.weight (V, D)    embed_tokens.weight         as is (``backbone.embedding.`` also read)
    backbone.layers.{i}.norm.weight      layers[i].norm.weight       as is
    backbone.layers.{i}.mixer.*          layers[i].mixer.*           the mixer map above
    backbone.norm_f.weight               norm.weight                 as is
    lm_head.weight (V, D)                lm_head (D, V)              transpose; absent from the LM when tied

With ``scan_layers=True`` the per-layer arrays are stacked on the leading ``layers`` axis (and unstacked on export).
Configs: ``HF_KEYS`` classifies every ``Mamba2Config`` field once (mapped, harmless, or restricted to what lcjax
implements); another ``model_type`` or any other key raises ``ValueError`` naming it (``lcjax/convert/__init__.py``).
Reference: transformers 5.23.0 ``models/mamba2/{configuration,modeling}_mamba2.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.checks import require_bool
from lcjax.convert import HFKeys, check_hf_config, hf_config_dict, read_hf_dir
from lcjax.layers.mamba2 import Mamba2, Mamba2Config
from lcjax.models.lm import LM, LMConfig


def _fields(hf_config: Any, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    """The checked fields of an HF ``Mamba2Config`` (object or ``config.json`` dict), HF defaults filled in."""
    c = hf_config_dict(hf_config)
    missing = [k for k in ("model_type",) + required if k not in c]
    if missing:
        raise ValueError(f"{where}: missing required fields {missing}")
    check_hf_config(c, HF_KEYS, where=where)
    c = HF_DEFAULTS | c
    # transformers writes non-finite floats into config.json as {"__float__": "Infinity"}
    unjson = lambda v: float(v["__float__"]) if isinstance(v, Mapping) and "__float__" in v else v
    c["time_step_limit"] = tuple(float(unjson(v)) for v in c["time_step_limit"])
    return c


def _mixer_config(c: Mapping[str, Any], where: str, overrides: Mapping[str, Any]) -> Mamba2Config:
    expand, rem = divmod(int(c["expand"] * c["hidden_size"]), c["hidden_size"])
    if rem:
        raise ValueError(f"{where}.expand={c['expand']}: expand·hidden_size must be a multiple of hidden_size")
    fields = dict(
        d_model=c["hidden_size"], d_state=c["state_size"], d_conv=c["conv_kernel"], expand=expand,
        head_dim=c["head_dim"], n_groups=c["n_groups"], chunk_size=c["chunk_size"], dt_min=c["time_step_min"],
        dt_max=c["time_step_max"], dt_init_floor=c["time_step_floor"], dt_limit=c["time_step_limit"],
        conv_bias=require_bool(f"{where}.use_conv_bias", c["use_conv_bias"]),
        bias=require_bool(f"{where}.use_bias", c["use_bias"]), norm_eps=c["layer_norm_epsilon"],
    )  # fmt: skip
    cfg = Mamba2Config(**(fields | dict(overrides)))
    if cfg.num_heads != c["num_heads"]:
        raise ValueError(f"{where}.num_heads={c['num_heads']} != expand·hidden_size/head_dim = {cfg.num_heads}")
    return cfg


def mixer_config_from_hf(hf_config: Any, **overrides) -> Mamba2Config:
    """``Mamba2Config`` of a ``transformers.Mamba2Config`` (or its ``config.json`` dict), checked like
    ``config_from_hf``; ``overrides`` are ``Mamba2Config`` fields."""
    return _mixer_config(_fields(hf_config, "hf_config", ("hidden_size", "num_heads")), "hf_config", overrides)


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
    if m.activation != "silu":
        raise ValueError(f"hf_mixer.activation={m.activation!r} is not implemented; allowed: 'silu'")
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


# ---- whole models ------------------------------------------------------------------------------------------------
# transformers 5.23 Mamba2Config, every field classified once (common PreTrainedConfig keys: lcjax/convert/__init__.py).
HF_KEYS = HFKeys(
    family="Mamba-2",
    model_types=("mamba2",),
    mapped=frozenset({
        "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size", "expand",
        "conv_kernel", "n_groups", "chunk_size", "use_bias", "use_conv_bias", "layer_norm_epsilon", "time_step_min",
        "time_step_max", "time_step_floor", "time_step_limit", "tie_word_embeddings",
    }),
    harmless=frozenset({
        "initializer_range", "rescale_prenorm_residual",  # init only
        "time_step_rank",  # stored by HF's mixer, never used (dt comes from in_proj)
        "residual_in_fp32",  # lcjax always adds the residual in float32: identical in float32, no worse in bf16
        "intermediate_size",  # written by 4.x configs; HF's mixer uses expand·hidden_size
    }),
    restricted={"hidden_act": ("silu",), "rms_norm": (True,), "norm_before_gate": (False,)},
    notes={
        "hidden_act": "the mixer's conv and gate activation is SiLU",
        "rms_norm": "a 4.x key; transformers always applies the gated RMSNorm",
        "norm_before_gate": "transformers' Mamba2 gates before the norm: norm(y·silu(z))",
    },
)  # fmt: skip
HF_DEFAULTS = dict(  # transformers 5.23.0 Mamba2Config defaults, for config.json files that omit a field
    head_dim=64, state_size=128, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8, use_bias=False,
    use_conv_bias=True, hidden_act="silu", residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1,
    time_step_floor=1e-4, time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False,
)  # fmt: skip
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads")


def _lm_config(c: Mapping[str, Any], where: str, overrides: Mapping[str, Any]) -> LMConfig:
    kw = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
        block_pattern=("mamba2",), mixers={"mamba2": _mixer_config(c, where, {})}, norm_eps=c["layer_norm_epsilon"],
        tie_embeddings=require_bool(f"{where}.tie_word_embeddings", c["tie_word_embeddings"]), max_seq_len=1 << 20,
    )  # fmt: skip
    return LMConfig(**(kw | dict(overrides)))


def config_from_hf(hf_config: Any, **overrides) -> LMConfig:
    """``LMConfig`` (``block_pattern=("mamba2",)``) of an HF ``Mamba2Config`` object or its ``config.json`` dict.

    HF uses ``layer_norm_epsilon`` for the block norms, ``norm_f`` and the gated norm alike. Every key is checked
    against ``HF_KEYS``: another ``model_type``, an activation other than SiLU or an unknown key raises
    ``ValueError`` naming it; ``residual_in_fp32`` is accepted either way (lcjax adds the residual in float32).
    """
    return _lm_config(_fields(hf_config, "hf_config", _REQUIRED), "hf_config", overrides)


def config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """The HF ``Mamba2Config`` kwargs describing ``cfg`` (pure Mamba-2 models with HF's mixer options only)."""
    m = cfg.mixers["mamba2"]
    if cfg.block_pattern != ("mamba2",):
        raise ValueError(f"config_to_hf: cfg.block_pattern must be ('mamba2',) for HF, got {cfg.block_pattern}")
    unsupported = {"rmsnorm": not m.rmsnorm, "norm_before_gate": m.norm_before_gate,
                   "norm_eps": m.norm_eps != cfg.norm_eps, "long_context": m.long_context != type(m.long_context)()}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"config_to_hf: Mamba2Config fields {bad} have no HF equivalent (need rmsnorm=True, "
                         f"norm_before_gate=False, mamba2.norm_eps == norm_eps, default long_context)")  # fmt: skip
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=m.d_state,
        expand=m.expand, head_dim=m.head_dim, num_heads=m.num_heads, n_groups=m.n_groups, conv_kernel=m.d_conv,
        chunk_size=m.chunk_size, use_bias=m.bias, use_conv_bias=m.conv_bias, layer_norm_epsilon=cfg.norm_eps,
        time_step_min=m.dt_min, time_step_max=m.dt_max, time_step_floor=m.dt_init_floor,
        time_step_limit=tuple(m.dt_limit), tie_word_embeddings=cfg.tie_embeddings, residual_in_fp32=True,
        hidden_act="silu",
    )  # fmt: skip


def _mixer_keys(m: Mamba2Config) -> list[str]:
    keys = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "out_proj.weight"]
    keys += ["in_proj.bias", "out_proj.bias"] if m.bias else []
    keys += ["conv1d.bias"] if m.conv_bias else []
    return keys + (["norm.weight"] if m.rmsnorm else [])


def _check_keys(tensors: Mapping[str, Any], cfg: LMConfig) -> None:
    want = {"backbone.embeddings.weight", "backbone.norm_f.weight"} | ({"lm_head.weight"} if not cfg.tie_embeddings
                                                                      else set())  # fmt: skip
    for i in range(cfg.n_layers):
        want |= {f"backbone.layers.{i}.norm.weight"}
        want |= {f"backbone.layers.{i}.mixer.{k}" for k in _mixer_keys(cfg.mixers["mamba2"])}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()  # HF state dicts list the tied head too
    missing, unknown = sorted(want - set(tensors)), sorted(set(tensors) - want - optional)
    if missing or unknown:
        raise ValueError(f"state_dict: missing keys {missing[:5]}, unexpected keys {unknown[:5]} (for {cfg.n_layers} "
                         f"mamba2 layers, tie_embeddings={cfg.tie_embeddings})")  # fmt: skip


def _assign(var: nnx.Variable, value: np.ndarray, key: str) -> None:
    if tuple(var.shape) != tuple(value.shape):
        raise ValueError(f"state_dict[{key!r}]: shape {tuple(value.shape)} does not fit lcjax shape {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, var.dtype))


def mamba2_from_state_dict(state_dict: Mapping[str, Any], cfg: LMConfig) -> LM:
    """An ``LM`` holding HF ``Mamba2ForCausalLM``-named weights (numpy arrays or torch tensors), shapes checked."""
    if cfg.block_pattern != ("mamba2",):
        raise ValueError(f"mamba2_from_state_dict: cfg.block_pattern must be ('mamba2',), got {cfg.block_pattern}")
    tensors = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state_dict.items()}
    _check_keys(tensors, cfg)
    get = lambda key: _np(tensors[key]).astype(np.float32)
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))  # every parameter is overwritten below
    _assign(model.embed_tokens.weight, get("backbone.embeddings.weight"), "backbone.embeddings.weight")
    _assign(model.norm.weight, get("backbone.norm_f.weight"), "backbone.norm_f.weight")
    if not cfg.tie_embeddings:
        _assign(model.lm_head, get("lm_head.weight").T, "lm_head.weight")
    elif "lm_head.weight" in tensors and not np.array_equal(get("lm_head.weight"), get("backbone.embeddings.weight")):
        raise ValueError("state_dict['lm_head.weight'] differs from the embeddings but cfg.tie_embeddings=True")
    norms = [get(f"backbone.layers.{i}.norm.weight") for i in range(cfg.n_layers)]
    mixers = [mixer_params_from_hf(tensors, cfg.mixers["mamba2"], prefix=f"backbone.layers.{i}.mixer.")
              for i in range(cfg.n_layers)]  # fmt: skip
    if cfg.scan_layers:  # one stacked block: (n_layers, ...) arrays
        blocks = [model.layers[0]]
        norms, mixers = [np.stack(norms)], [jax.tree.map(lambda *a: np.stack(a), *mixers)]
    else:
        blocks = list(model.layers)
    for i, (block, norm, mixer) in enumerate(zip(blocks, norms, mixers)):
        _assign(block.norm.weight, norm, f"backbone.layers.{i}.norm.weight")
        load_mixer_params(block.mixer, mixer)
        if cfg.mixers["mamba2"].long_context.state_norm or cfg.mixers["mamba2"].long_context.longmamba:
            if cfg.scan_layers:
                raise ValueError("mamba2_from_state_dict: long-context statistics need scan_layers=False")
            block.mixer.reset_long_context()
    missing = [k for k, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v.get_value(), jax.Array)]
    if missing:
        raise ValueError(f"state_dict: no HF tensor for {missing[:5]}")
    return model


def mamba2_from_hf(hf_model: Any, **overrides) -> LM:
    """An ``LM`` equal to an in-memory HF ``Mamba2ForCausalLM`` (config derived, weights copied)."""
    return mamba2_from_state_dict(dict(hf_model.state_dict()), config_from_hf(hf_model.config, **overrides))


def mamba2_from_pretrained_dir(path: str | os.PathLike, **overrides) -> LM:
    """Load a local HF-format checkpoint directory (``config.json`` + ``*.safetensors``), never unpickling."""
    config, state_dict = read_hf_dir(path, caller="mamba2_from_pretrained_dir")
    where = f"mamba2_from_pretrained_dir: {os.path.join(os.fspath(path), 'config.json')}"
    return mamba2_from_state_dict(state_dict, _lm_config(_fields(config, where, _REQUIRED), where, overrides))


def mamba2_to_state_dict(model: LM) -> dict[str, np.ndarray]:
    """HF ``Mamba2ForCausalLM`` state dict (float32 numpy, the keys of ``hf_model.state_dict()``) of an ``LM``."""
    cfg = model.cfg
    config_to_hf(cfg)  # validates that HF can express the model
    get = lambda var: np.asarray(jax.device_get(var[...]), np.float32)
    out = {"backbone.embeddings.weight": get(model.embed_tokens.weight)}
    if cfg.scan_layers:
        graphdef, state = nnx.split(model.layers[0])
        layers = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(cfg.n_layers)]
    else:
        layers = list(model.layers)
    for i, block in enumerate(layers):
        out[f"backbone.layers.{i}.norm.weight"] = get(block.norm.weight)
        out.update(mixer_to_hf(block.mixer, prefix=f"backbone.layers.{i}.mixer."))
    out["backbone.norm_f.weight"] = get(model.norm.weight)
    out["lm_head.weight"] = out["backbone.embeddings.weight"] if cfg.tie_embeddings else get(model.lm_head).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


__all__ = ["config_from_hf", "config_to_hf", "load_mixer_params", "mamba2_from_hf", "mamba2_from_pretrained_dir",
           "mamba2_from_state_dict", "mamba2_to_state_dict", "mixer_config_from_hf", "mixer_from_hf",
           "mixer_params_from_hf", "mixer_to_hf"]  # fmt: skip
