"""HF ``LlamaForCausalLM`` <-> lcjax ``LM`` (attention blocks).

The lcjax parameter tree mirrors HF's names, so the map is per-tensor reshapes only: torch ``Linear`` weights are
``[out, in]``; lcjax keeps ``q_proj`` as ``[D, H, P]`` and ``o_proj`` as ``[H, P, D]`` so einsums name every axis.
Checkpoints are read from in-memory tensors or safetensors files only, never by unpickling. ``HF_KEYS`` classifies
every ``LlamaConfig`` field once (mapped, harmless, or restricted to what lcjax implements); any other key, another
``model_type`` (Mistral, Qwen2: they share the weight names but not the math) or an unimplemented RoPE scaling
raises ``ValueError`` naming it instead of loading a different model.
Reference: transformers 5.23.0 ``models/llama/modeling_llama.py`` and ``configuration_llama.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.checks import require_bool
from lcjax.convert import HFKeys, check_hf_config, hf_config, hf_config_dict, read_hf_dir
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import rope as rope_ops


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, without importing torch
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


# transformers 5.23 LlamaConfig, every field classified once (common PreTrainedConfig keys: lcjax/convert/__init__.py).
HF_KEYS = HFKeys(
    family="Llama",
    model_types=("llama",),
    mapped=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "attention_bias", "mlp_bias", "rope_parameters",
        "rope_theta", "rope_scaling",  # the 4.x spellings of rope_parameters, read as transformers reads them
    }),
    # initializer_range: init only. pretraining_tp: 4.x sliced each matmul into pretraining_tp parts and summed
    # them (the same product up to rounding); transformers 5.23 ignores it.
    harmless=frozenset({"initializer_range", "pretraining_tp"}),
    restricted={"hidden_act": ("silu",), "attention_dropout": (0.0, None), "sliding_window": (None,)},
    notes={
        "hidden_act": "the MLP is SwiGLU",
        "attention_dropout": "lcjax has no attention dropout (HF applies it in training mode only)",
        "sliding_window": "lcjax's Llama loader maps full causal attention only",
    },
)  # fmt: skip
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def read_rope(c: Mapping[str, Any], where: str) -> rope_ops.RopeConfig:
    """The RoPE of an HF config dict as transformers 5.23 standardises it (``lcjax.convert.hf_config.rope_from_hf``:
    v4 ``rope_scaling`` / ``rope_theta`` and v5 ``rope_parameters``, every HF rope type); refuses, naming the key,
    any RoPE key it does not read."""
    rope = hf_config.rope_from_hf(c, where=where)
    # HF Llama / Mistral / Qwen2 / Qwen3 attention rotates the whole head (their apply_rotary_pos_emb has no
    # pass-through part); Phi-3's rotates the first rotary_dim dims only.
    if c.get("model_type") != "phi3" and rope.partial_rotary_factor != 1.0:
        raise ValueError(f"{where}.rope_parameters.partial_rotary_factor={rope.partial_rotary_factor} is not "
                         f"implemented for model_type={c.get('model_type')!r} (its HF attention rotates the whole "
                         "head; allowed: 1.0)")  # fmt: skip
    return rope


def _config_from_dict(c: Mapping[str, Any], where: str, overrides: Mapping[str, Any]) -> LMConfig:
    missing = [k for k in _REQUIRED if k not in c]
    if missing:
        raise ValueError(f"{where}: missing required Llama fields {missing}")
    check_hf_config(c, HF_KEYS, where=where)
    n_heads = c["num_attention_heads"]
    flag = lambda key: require_bool(f"{where}.{key}", c.get(key, False))
    kw = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        mlp_dim=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
        rope=read_rope(c, where), norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=flag("tie_word_embeddings"),
        attention_bias=flag("attention_bias"), mlp_bias=flag("mlp_bias"),
    )  # fmt: skip
    return LMConfig(**(kw | dict(overrides)))


def config_from_hf(hf_config: Any, **overrides) -> LMConfig:
    """LMConfig from an HF ``LlamaConfig`` (object or ``config.json`` dict); ``overrides`` are LMConfig fields.

    Raises ``ValueError`` naming every key that would make lcjax compute a different model (``HF_KEYS``): another
    ``model_type`` (Mistral, Qwen2, ...), a sliding window, an activation other than SiLU, a RoPE scaling lcjax
    does not implement, an unknown key.
    """
    return _config_from_dict(hf_config_dict(hf_config), "hf_config", overrides)


def config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """The HF ``LlamaConfig`` kwargs describing ``cfg`` (attention-only models)."""
    if cfg.window is not None:
        raise ValueError(f"config_to_hf: cfg.window={cfg.window} has no Llama equivalent (HF Llama attends to the "
                         "whole causal prefix); export a model with window=None")  # fmt: skip
    att = cfg.attention
    if att.qk_norm or att.qkv_bias != att.o_bias:
        raise ValueError(f"config_to_hf: qkv_bias={att.qkv_bias}, o_bias={att.o_bias}, qk_norm={att.qk_norm} has no "
                         "Llama equivalent (attention_bias covers q, k, v and o alike; no qk norm)")  # fmt: skip
    return base_config_to_hf(cfg, "config_to_hf") | dict(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def base_config_to_hf(cfg: LMConfig, caller: str) -> dict[str, Any]:
    """The HF config kwargs every Llama-like family shares (sizes, norm, tied embeddings, RoPE, SiLU)."""
    if set(cfg.block_pattern) != {"attention"}:
        raise ValueError(f"{caller}: only attention-only models map to Llama-like families, got {cfg.block_pattern}")
    from lcjax.convert.hf_config import rope_to_hf

    rope = rope_to_hf(cfg.rope)
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.rope.max_position_embeddings or cfg.max_seq_len,  # dynamic NTK's threshold
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, hidden_act="silu",
    )  # fmt: skip


def _layer_map(cfg: LMConfig, i: int) -> dict[str, tuple[tuple[Any, ...], tuple[Any, Any]]]:
    """HF key -> (lcjax path, HF->lcjax fn, lcjax->HF fn) for layer i."""
    D, H, K, P = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pre, path = f"model.layers.{i}.", ("layers", i)
    heads_in = lambda n: (lambda w: w.T.reshape(D, n, P), lambda w: w.reshape(D, n * P).T)
    m = {
        "input_layernorm.weight": (("input_layernorm", "weight"), None),
        "post_attention_layernorm.weight": (("post_attention_layernorm", "weight"), None),
        "self_attn.q_proj.weight": (("self_attn", "q_proj"), heads_in(H)),
        "self_attn.k_proj.weight": (("self_attn", "k_proj"), heads_in(K)),
        "self_attn.v_proj.weight": (("self_attn", "v_proj"), heads_in(K)),
        "self_attn.o_proj.weight": (("self_attn", "o_proj"), (lambda w: w.T.reshape(H, P, D), lambda w: w.reshape(H * P, D).T)),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), (np.transpose, np.transpose)),
        "mlp.up_proj.weight": (("mlp", "up_proj"), (np.transpose, np.transpose)),
        "mlp.down_proj.weight": (("mlp", "down_proj"), (np.transpose, np.transpose)),
    }
    att = cfg.attention
    if att.qkv_bias:
        m["self_attn.q_proj.bias"] = (("self_attn", "q_bias"), (lambda b: b.reshape(H, P), lambda b: b.reshape(-1)))
        m["self_attn.k_proj.bias"] = (("self_attn", "k_bias"), (lambda b: b.reshape(K, P), lambda b: b.reshape(-1)))
        m["self_attn.v_proj.bias"] = (("self_attn", "v_bias"), (lambda b: b.reshape(K, P), lambda b: b.reshape(-1)))
    if att.o_bias:
        m["self_attn.o_proj.bias"] = (("self_attn", "o_bias"), None)
    if att.qk_norm:  # Qwen3
        m["self_attn.q_norm.weight"] = (("self_attn", "q_norm", "weight"), None)
        m["self_attn.k_norm.weight"] = (("self_attn", "k_norm", "weight"), None)
    if cfg.mlp_bias:
        for name in ("gate", "up", "down"):
            m[f"mlp.{name}_proj.bias"] = (("mlp", f"{name}_bias"), None)
    identity = (lambda w: w, lambda w: w)
    return {pre + k: (path + p, fns or identity) for k, (p, fns) in m.items()}


def key_map(cfg: LMConfig) -> dict[str, tuple[tuple[Any, ...], tuple[Any, Any]]]:
    """The full HF state-dict key -> (lcjax path, to_lcjax, to_hf) table."""
    identity = (lambda w: w, lambda w: w)
    m = {"model.embed_tokens.weight": (("embed_tokens", "weight"), identity),
         "model.norm.weight": (("norm", "weight"), identity)}  # fmt: skip
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = (("lm_head",), (np.transpose, np.transpose))
    for i in range(cfg.n_layers):
        m.update(_layer_map(cfg, i))
    return m


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def llama_from_state_dict(state_dict: Mapping[str, Any], cfg: LMConfig) -> LM:
    """An ``LM`` holding the given HF-named weights (numpy arrays or torch tensors)."""
    if cfg.scan_layers:
        raise ValueError("llama_from_state_dict: build with scan_layers=False (HF layers are separate tensors)")
    keys = key_map(cfg)
    skip = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(k for k in state_dict if k not in keys and k not in skip and not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(k for k in keys if k not in state_dict)
    if unknown or missing:
        raise ValueError(f"state_dict: missing keys {missing[:5]}, unexpected keys {unknown[:5]}")
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    for key, (path, (to_lcjax, _)) in keys.items():
        var = _get(state, path)
        value = to_lcjax(_to_numpy(state_dict[key]))
        if value.shape != var.shape:
            raise ValueError(f"state_dict[{key!r}]: shape {value.shape} does not fit {path} of shape {var.shape}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    nnx.update(model, state)
    return model


def llama_from_hf(hf_model: Any, **overrides) -> LM:
    """An ``LM`` equal to an in-memory HF ``LlamaForCausalLM`` (config derived, weights copied)."""
    cfg = config_from_hf(hf_model.config, **overrides)
    return llama_from_state_dict(dict(hf_model.state_dict()), cfg)


def llama_from_pretrained_dir(path: str | os.PathLike, **overrides) -> LM:
    """Load a local HF checkpoint directory (``config.json`` + ``*.safetensors``), never unpickling.

    The config is checked as in ``config_from_hf`` (errors name the ``config.json`` path); ``read_hf_dir`` names the
    file at fault for a missing directory or config, or an unreadable safetensors file.
    """
    config, state_dict = read_hf_dir(path, caller="llama_from_pretrained_dir")
    where = f"llama_from_pretrained_dir: {os.path.join(os.fspath(path), 'config.json')}"
    return llama_from_state_dict(state_dict, _config_from_dict(config, where, overrides))


def llama_to_state_dict(model: LM) -> dict[str, np.ndarray]:
    """HF-named numpy state dict of an attention-only ``LM`` (the reverse of ``llama_from_state_dict``; also the
    unfused Llama-style names the other families export from)."""
    cfg = model.cfg
    base_config_to_hf(cfg, "llama_to_state_dict")  # validates the block pattern
    if cfg.scan_layers:
        raise ValueError("llama_to_state_dict: export a model built with scan_layers=False")
    state = nnx.state(model)
    out = {}
    for key, (path, (_, to_hf)) in key_map(cfg).items():
        out[key] = np.ascontiguousarray(to_hf(np.asarray(jax.device_get(_get(state, path)[...]))))
    return out
