"""HF transformers ``BambaForCausalLM`` <-> lcjax ``LM`` (a Mamba-2 / attention hybrid ``block_pattern``).

Bamba (IBM, Princeton, UIUC; https://huggingface.co/ibm-fms/Bamba-9B): every decoder layer is a Mamba-2 mixer
(``BambaMixer``) or GQA attention (``BambaAttention``, at ``attn_layer_indices``), and every layer ends in a
pre-norm SwiGLU feed-forward (``BambaMLP``). lcjax builds it with one ``block_pattern`` entry per layer:
``"mamba2_mlp"`` (``lcjax/models/blocks/mamba2_mlp.py``) for the Mamba layers, ``"attention"`` for the others.

What differs from the plain families, checked against transformers 5.23.0 ``models/bamba/{configuration,
modeling}_bamba.py``: the mixer is HF ``Mamba2Mixer``'s math (in_proj rows [z | x | B | C | dt], conv over
[x | B | C], gated RMSNorm norm(y·silu(z))·w over groups of d_inner/n_groups) with ``rms_norm_eps`` as its epsilon and
``time_step_limit`` as Δ's clamp; RoPE rotates only the first half of each head (``partial_rotary_factor`` is 0.5
unless ``rope_parameters`` says otherwise: the config hardcodes it); both residual adds run in the compute dtype.
HF's one-token recurrent step does not apply ``time_step_limit`` while its chunked scan does; lcjax clamps in both
(with the default limit (0, inf) neither clamps, and the two agree).

    HF key (layer i)                                  lcjax variable (layers[i].)        transform
    model.layers.{i}.input_layernorm.weight           input_layernorm.weight             as is
    model.layers.{i}.pre_ff_layernorm.weight          pre_ff_layernorm.weight (Mamba)    as is
                                                      post_attention_layernorm.weight (attention)
    model.layers.{i}.feed_forward.{gate,up,down}_proj feed_forward.* (Mamba) / mlp.* (attention)   transpose
    model.layers.{i}.mamba.*                          mamba.*                            convert/mamba2.py mixer map
    model.layers.{i}.self_attn.{q,k,v}_proj.weight    self_attn.{q,k,v}_proj (D,H,P)     transpose, reshape
    model.layers.{i}.self_attn.o_proj.weight          self_attn.o_proj (H,P,D)           transpose, reshape
    model.embed_tokens.weight / model.final_layernorm.weight / lm_head.weight (V,D)
                                                      embed_tokens.weight / norm.weight / lm_head (D,V)

Configs: ``HF_KEYS`` classifies every ``BambaConfig`` field once (mapped, harmless, or restricted to what lcjax
implements); another ``model_type`` or any other key raises ``ValueError`` naming it (``lcjax/convert/__init__.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.checks import require_bool, require_int
from lcjax.convert import HFKeys, check_hf_config, hf_config_dict, read_hf_dir
from lcjax.convert.hf_config import rope_from_hf, rope_to_hf
from lcjax.convert.mamba2 import load_mixer_params, mixer_params_from_hf, mixer_to_hf
from lcjax.layers.mamba2 import Mamba2Config
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import rope as rope_ops

# transformers 5.23 BambaConfig, every field classified once (common PreTrainedConfig keys: lcjax/convert/__init__.py).
HF_KEYS = HFKeys(
    family="Bamba",
    model_types=("bamba",),
    mapped=frozenset({
        "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
        "attn_layer_indices", "layer_types", "layers_block_type", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
        "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias",
        "time_step_limit", "rope_parameters", "attention_bias", "mlp_bias",
        "rope_theta", "rope_scaling",  # the 4.x spellings of rope_parameters, read as transformers reads them
    }),
    harmless=frozenset({
        "initializer_range",  # init only
        "num_logits_to_keep",  # how many prompt logits HF's generate computes; lcjax returns them all
    }),
    restricted={
        "hidden_act": ("silu",), "attention_dropout": (0.0, None), "z_loss_coefficient": (0.0, None),
        "partial_rotary_factor": (0.5,),
    },
    notes={
        "hidden_act": "the MLP is SwiGLU and the mixer's conv and gate activation SiLU",
        "attention_dropout": "lcjax has no attention dropout (HF applies it in training mode only)",
        "z_loss_coefficient": "lcjax's LM loss has no z-loss term; train with z_loss_coefficient=0",
        "partial_rotary_factor": "transformers 5.23 overrides a top-level value with 0.5 (set it in rope_parameters)",
    },
)  # fmt: skip
HF_DEFAULTS = dict(  # transformers 5.23.0 BambaConfig defaults, for config.json files that omit a field
    vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=262144,
    attn_layer_indices=None, mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256,
    mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
    time_step_limit=(0.0, math.inf), attention_bias=False, mlp_bias=False,
)  # fmt: skip
HF_PARTIAL_ROTARY = 0.5  # BambaConfig.__post_init__ hardcodes it unless rope_parameters carries one
KINDS = {"linear_attention": "mamba2_mlp", "full_attention": "attention"}  # HF layer type -> lcjax block type


def _fields(hf_config: Any, where: str) -> dict[str, Any]:
    """The checked fields of an HF ``BambaConfig`` (object or ``config.json`` dict), HF defaults filled in."""
    c = hf_config_dict(hf_config)
    check_hf_config(c, HF_KEYS, where=where)
    c = HF_DEFAULTS | c
    if c["mamba_d_head"] == "auto":
        c["mamba_d_head"] = c["mamba_expand"] * c["hidden_size"] // c["mamba_n_heads"]
    limit = c["time_step_limit"]
    if not isinstance(limit, list | tuple) or len(limit) != 2:
        raise ValueError(f"{where}.time_step_limit={limit!r}: a (low, high) pair is required")
    # transformers writes non-finite floats into config.json as {"__float__": "Infinity"}
    unjson = lambda v: float(v["__float__"]) if isinstance(v, Mapping) and "__float__" in v else float(v)
    c["time_step_limit"] = tuple(unjson(v) for v in limit)
    return c


def _layer_types(c: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """One lcjax block type per layer: ``"attention"`` at ``attn_layer_indices``, ``"mamba2_mlp"`` elsewhere."""
    n = require_int(f"{where}.num_hidden_layers", c["num_hidden_layers"], min=1)
    indices = c["attn_layer_indices"] or []
    if not isinstance(indices, list | tuple):
        raise TypeError(f"{where}.attn_layer_indices must be a list of layer indices, got {indices!r}")
    for i in indices:
        require_int(f"{where}.attn_layer_indices[]", i, min=0, max=n - 1)
    hf_types = ["full_attention" if i in indices else "linear_attention" for i in range(n)]
    for key in ("layer_types", "layers_block_type"):  # HF derives them from attn_layer_indices; must agree
        if c.get(key) is not None and list(c[key]) != hf_types:
            raise ValueError(f"{where}.{key}={c[key]!r} disagrees with attn_layer_indices={list(indices)} "
                             f"(expected {hf_types})")  # fmt: skip
    return tuple(KINDS[t] for t in hf_types)


def _rope(c: Mapping[str, Any], where: str) -> rope_ops.RopeConfig:
    """RoPE as transformers reads it (``lcjax.convert.hf_config.rope_from_hf``), with Bamba's hardcoded partial
    rotary factor 0.5 where ``rope_parameters`` / ``rope_scaling`` give none (a top-level value is overridden)."""
    explicit = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    rope = rope_from_hf({k: v for k, v in c.items() if k != "partial_rotary_factor"}, where=where)
    if explicit.get("partial_rotary_factor") is None:
        rope = dataclasses.replace(rope, partial_rotary_factor=HF_PARTIAL_ROTARY)
    return rope


def _mixer(c: Mapping[str, Any], where: str) -> Mamba2Config:
    cfg = Mamba2Config(
        d_model=c["hidden_size"], d_state=c["mamba_d_state"], d_conv=c["mamba_d_conv"], expand=c["mamba_expand"],
        head_dim=c["mamba_d_head"], n_groups=c["mamba_n_groups"], chunk_size=c["mamba_chunk_size"],
        dt_limit=c["time_step_limit"], conv_bias=require_bool(f"{where}.mamba_conv_bias", c["mamba_conv_bias"]),
        bias=require_bool(f"{where}.mamba_proj_bias", c["mamba_proj_bias"]), norm_eps=c["rms_norm_eps"],
    )  # fmt: skip
    if cfg.num_heads != c["mamba_n_heads"]:
        raise ValueError(f"{where}.mamba_n_heads={c['mamba_n_heads']} != mamba_expand·hidden_size/mamba_d_head = "
                         f"{cfg.num_heads}")  # fmt: skip
    return cfg


def _lm_config(c: Mapping[str, Any], where: str, overrides: Mapping[str, Any]) -> LMConfig:
    types = _layer_types(c, where)
    n_heads = c["num_attention_heads"]
    flag = lambda key: require_bool(f"{where}.{key}", c[key])  # noqa: E731
    kw = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c["num_key_value_heads"] or n_heads, head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        mlp_dim=c["intermediate_size"], block_pattern=types, mixers={"mamba2_mlp": _mixer(c, where)},
        max_seq_len=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"], attention_bias=flag("attention_bias"),
        mlp_bias=flag("mlp_bias"), tie_embeddings=flag("tie_word_embeddings"), rope=_rope(c, where),
    )  # fmt: skip
    if "mamba2_mlp" not in types:
        del kw["mixers"]
    return LMConfig(**(kw | dict(overrides)))


def bamba_config_from_hf(hf_config: Any, **overrides) -> LMConfig:
    """``LMConfig`` of an HF ``BambaConfig`` (object or ``config.json`` dict); ``overrides`` are LMConfig fields.

    ``block_pattern`` lists one block type per layer. Every key is checked against ``HF_KEYS``: another
    ``model_type``, an activation other than SiLU, attention dropout, a z-loss, an unknown key raise ``ValueError``
    naming it; so does a RoPE scaling lcjax does not implement (``lcjax.convert.hf_config``).
    """
    return _lm_config(_fields(hf_config, "hf_config"), "hf_config", overrides)


def bamba_config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """The HF ``BambaConfig`` kwargs describing ``cfg`` (layers of types ``mamba2_mlp`` and ``attention`` only)."""
    types = cfg.layer_types()
    bad = sorted(set(types) - set(KINDS.values()))
    if bad:
        raise ValueError(f"bamba_config_to_hf: block types {bad} have no Bamba equivalent (allowed: mamba2_mlp, "
                         "attention)")  # fmt: skip
    if cfg.window is not None:
        raise ValueError(f"bamba_config_to_hf: cfg.window={cfg.window} has no Bamba equivalent")
    m = cfg.mixers["mamba2_mlp"] if "mamba2_mlp" in types else Mamba2Config(d_model=cfg.d_model, head_dim=cfg.d_model)
    unsupported = {"rmsnorm": not m.rmsnorm, "norm_before_gate": m.norm_before_gate,
                   "norm_eps": m.norm_eps != cfg.norm_eps, "long_context": m.long_context != type(m.long_context)()}
    if any(unsupported.values()):
        raise ValueError(f"bamba_config_to_hf: Mamba2Config fields {[k for k, v in unsupported.items() if v]} have no "
                         "Bamba equivalent (need rmsnorm=True, norm_before_gate=False, norm_eps == LMConfig.norm_eps, "
                         "default long_context)")  # fmt: skip
    rope = rope_to_hf(cfg.rope) | {"partial_rotary_factor": cfg.rope.partial_rotary_factor}  # explicit: HF's is 0.5
    return dict(
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, hidden_act="silu",
        attn_layer_indices=[i for i, t in enumerate(types) if t == "attention"], mamba_n_heads=m.num_heads,
        mamba_d_head=m.head_dim, mamba_n_groups=m.n_groups, mamba_d_state=m.d_state, mamba_d_conv=m.d_conv,
        mamba_expand=m.expand, mamba_chunk_size=m.chunk_size, mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias,
        time_step_limit=tuple(m.dt_limit), rope_parameters=rope, attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
    )  # fmt: skip


# ---- weights -----------------------------------------------------------------------------------------------------
def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, without importing torch
        t = t.detach().cpu()
        t = (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    return np.asarray(t, np.float32)


def _dense_map(cfg: LMConfig, i: int, kind: str) -> dict[str, tuple[tuple[Any, ...], Any, Any]]:
    """HF key -> (lcjax path, HF->lcjax fn, lcjax->HF fn) for the norms, MLP and attention of layer ``i``."""
    D, H, K, P = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same, T = (lambda w: w), np.transpose
    mlp, post = ("mlp", "post_attention_layernorm") if kind == "attention" else ("feed_forward", "pre_ff_layernorm")
    m = {"input_layernorm.weight": (("input_layernorm", "weight"), same, same),
         "pre_ff_layernorm.weight": ((post, "weight"), same, same)}  # fmt: skip
    for name in ("gate", "up", "down"):
        m[f"feed_forward.{name}_proj.weight"] = ((mlp, f"{name}_proj"), T, T)
        if cfg.mlp_bias:
            m[f"feed_forward.{name}_proj.bias"] = ((mlp, f"{name}_bias"), same, same)
    if kind == "attention":
        for name, n in (("q", H), ("k", K), ("v", K)):
            to = lambda w, n=n: w.T.reshape(D, n, P)  # noqa: E731
            m[f"self_attn.{name}_proj.weight"] = (("self_attn", f"{name}_proj"), to, lambda w: w.reshape(D, -1).T)
            if cfg.attention_bias:
                m[f"self_attn.{name}_proj.bias"] = (("self_attn", f"{name}_bias"), lambda b, n=n: b.reshape(n, P),
                                                    lambda b: b.reshape(-1))  # fmt: skip
        m["self_attn.o_proj.weight"] = (("self_attn", "o_proj"), lambda w: w.T.reshape(H, P, D),
                                        lambda w: w.reshape(H * P, D).T)  # fmt: skip
        if cfg.attention_bias:
            m["self_attn.o_proj.bias"] = (("self_attn", "o_bias"), same, same)
    return {f"model.layers.{i}.{k}": (("layers", i, *p), a, b) for k, (p, a, b) in m.items()}


def _key_map(cfg: LMConfig) -> dict[str, tuple[tuple[Any, ...], Any, Any]]:
    same = lambda w: w  # noqa: E731
    m = {"model.embed_tokens.weight": (("embed_tokens", "weight"), same, same),
         "model.final_layernorm.weight": (("norm", "weight"), same, same)}  # fmt: skip
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = (("lm_head",), np.transpose, np.transpose)
    for i, kind in enumerate(cfg.layer_types()):
        m.update(_dense_map(cfg, i, kind))
    return m


def _mixer_prefixes(cfg: LMConfig) -> dict[int, str]:
    return {i: f"model.layers.{i}.mamba." for i, kind in enumerate(cfg.layer_types()) if kind == "mamba2_mlp"}


def _mixer_keys(cfg: LMConfig) -> set[str]:
    """Every HF tensor key of the Mamba mixers (``BambaMixer``'s parameters)."""
    if "mamba2_mlp" not in cfg.layer_types():
        return set()
    m = cfg.mixers["mamba2_mlp"]
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    names += ["in_proj.bias", "out_proj.bias"] if m.bias else []
    names += ["conv1d.bias"] if m.conv_bias else []
    return {prefix + name for prefix in _mixer_prefixes(cfg).values() for name in names}


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p] if isinstance(p, int) else getattr(tree, p)
    return tree


def bamba_from_state_dict(state_dict: Mapping[str, Any], cfg: LMConfig) -> LM:
    """An ``LM`` holding HF ``BambaForCausalLM``-named weights (numpy arrays or torch tensors), shapes checked."""
    if cfg.scan_layers:
        raise ValueError("bamba_from_state_dict: build with scan_layers=False (HF layers are separate tensors)")
    keys, prefixes, want = _key_map(cfg), _mixer_prefixes(cfg), set(_key_map(cfg)) | _mixer_keys(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()  # HF state dicts list the tied head too
    unknown, missing = sorted(set(state_dict) - want - optional), sorted(want - set(state_dict))
    if unknown or missing:
        raise ValueError(f"state_dict: missing keys {missing[:5]}, unexpected keys {unknown[:5]} (for layer types "
                         f"{cfg.layer_types()}, tie_embeddings={cfg.tie_embeddings})")  # fmt: skip
    tensors = {k: _to_numpy(v) for k, v in state_dict.items()}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError("state_dict['lm_head.weight'] differs from the embeddings but cfg.tie_embeddings=True")
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))  # every parameter is overwritten below
    for key, (path, to_lcjax, _) in keys.items():
        var, value = _get(model, path), to_lcjax(tensors[key])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"state_dict[{key!r}]: shape {value.shape} does not fit lcjax shape {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
    for i, prefix in prefixes.items():
        load_mixer_params(model.layers[i].mamba, mixer_params_from_hf(tensors, cfg.mixers["mamba2_mlp"], prefix=prefix))
    missing = [k for k, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v.get_value(), jax.Array)]
    if missing:
        raise ValueError(f"state_dict: no HF tensor for {missing[:5]}")
    return model


def bamba_from_hf(hf_model: Any, **overrides) -> LM:
    """An ``LM`` equal to an in-memory HF ``BambaForCausalLM`` (config derived, weights copied)."""
    return bamba_from_state_dict(dict(hf_model.state_dict()), bamba_config_from_hf(hf_model.config, **overrides))


def bamba_from_pretrained_dir(path: str | os.PathLike, **overrides) -> LM:
    """Load a local HF Bamba checkpoint directory (``config.json`` + ``*.safetensors``), never unpickling; errors
    name the ``config.json`` path (config) or the file at fault (``read_hf_dir``)."""
    config, state_dict = read_hf_dir(path, caller="bamba_from_pretrained_dir")
    where = f"bamba_from_pretrained_dir: {os.path.join(os.fspath(path), 'config.json')}"
    return bamba_from_state_dict(state_dict, _lm_config(_fields(config, where), where, overrides))


def bamba_to_state_dict(model: LM) -> dict[str, np.ndarray]:
    """HF ``BambaForCausalLM`` state dict (float32 numpy) of an ``LM`` (the inverse of ``bamba_from_state_dict``)."""
    cfg = model.cfg
    bamba_config_to_hf(cfg)  # validates that HF can express the model
    if cfg.scan_layers:
        raise ValueError("bamba_to_state_dict: export a model built with scan_layers=False")
    out = {key: to_hf(np.asarray(jax.device_get(_get(model, path)[...]), np.float32))
           for key, (path, _, to_hf) in _key_map(cfg).items()}  # fmt: skip
    for i, prefix in _mixer_prefixes(cfg).items():
        out.update(mixer_to_hf(model.layers[i].mamba, prefix=prefix))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


__all__ = ["HF_KEYS", "bamba_config_from_hf", "bamba_config_to_hf", "bamba_from_hf", "bamba_from_pretrained_dir",
           "bamba_from_state_dict", "bamba_to_state_dict"]  # fmt: skip
