"""HF Mistral, Qwen2/2.5, Qwen3 and Phi-3 <-> lcjax ``LM`` (attention blocks), next to Llama (``llama.py``).

All four are Llama's decoder with one change each, so they reuse Llama's weight map (``llama.key_map``):
- Mistral (Jiang et al. 2023, https://arxiv.org/abs/2310.06825): ``sliding_window`` -> ``LMConfig.window`` (a query
  sees itself and the ``window - 1`` keys before it; decoding keeps a ring cache of ``window`` slots).
- Qwen2/2.5 (https://arxiv.org/abs/2407.10671): bias on q, k, v but not o. ``use_sliding_window`` /
  ``max_window_layers`` / ``layer_types`` are read as transformers reads them; one window for every layer (or none)
  loads, a per-layer mix of full and sliding layers is refused (``ValueError`` naming ``layer_types``).
- Qwen3 (https://arxiv.org/abs/2505.09388): QK-norm (RMSNorm over the head dim on q and k before RoPE), ``head_dim``
  decoupled from ``hidden_size / num_attention_heads``, ``attention_bias`` on all four projections.
- Phi-3 (https://arxiv.org/abs/2404.14219): fused ``qkv_proj`` and ``gate_up_proj`` (split on import, fused again on
  export), ``sliding_window``, LongRoPE and ``partial_rotary_factor`` through the RoPE reader
  (``lcjax.convert.hf_config.rope_from_hf``: v4 ``"su"`` / ``"yarn"`` mean longrope there).
Every config key is classified in the family's ``HFKeys`` (mapped / harmless / restricted): a key lcjax does not
implement raises ``ValueError`` naming it.
Reference: transformers 5.23.0 ``models/{mistral,qwen2,qwen3,phi3}/{configuration,modeling}_*.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lcjax.checks import require_bool
from lcjax.convert import HFKeys, check_hf_config, hf_config_dict, read_hf_dir
from lcjax.convert import llama
from lcjax.models.lm import LM, LMConfig

# Keys every Llama-like family maps the same way (the 4.x rope_theta / rope_scaling spellings included).
_SHARED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "rope_theta", "rope_scaling",
})  # fmt: skip
_QWEN_WINDOW = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
_DROPOUT = (0.0, None)
_NOTES = {"hidden_act": "the MLP is SwiGLU", "attention_dropout": "lcjax has no attention dropout",
          "resid_pdrop": "lcjax has no dropout", "embd_pdrop": "lcjax has no dropout"}  # fmt: skip
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _keys(family: str, model_type: str, mapped: frozenset[str], restricted: Mapping[str, tuple] = ()) -> HFKeys:
    restricted = {"hidden_act": ("silu",), "attention_dropout": _DROPOUT, **dict(restricted)}
    return HFKeys(family=family, model_types=(model_type,), mapped=_SHARED | mapped,
                  harmless=frozenset({"initializer_range"}), restricted=restricted, notes=_NOTES)  # fmt: skip


MISTRAL_KEYS = _keys("Mistral", "mistral", frozenset({"head_dim", "sliding_window"}))
QWEN2_KEYS = _keys("Qwen2", "qwen2", _QWEN_WINDOW | {"head_dim"})
QWEN3_KEYS = _keys("Qwen3", "qwen3", _QWEN_WINDOW | {"head_dim", "attention_bias"})
PHI3_KEYS = _keys("Phi3", "phi3", frozenset({"sliding_window", "original_max_position_embeddings",
                                             "partial_rotary_factor"}),
                  {"resid_pdrop": _DROPOUT, "embd_pdrop": _DROPOUT})  # fmt: skip


def _window(c: Mapping[str, Any], where: str) -> int | None:
    """Mistral / Phi-3: ``sliding_window`` (None = full causal attention)."""
    return c.get("sliding_window")


def _qwen_window(c: Mapping[str, Any], where: str) -> int | None:
    """The one window of every layer, as ``Qwen2Config`` / ``Qwen3Config.__post_init__`` derive ``layer_types``.

    ``sliding_window`` counts only with ``use_sliding_window``; layers ``i >= max_window_layers`` slide unless
    ``layer_types`` says otherwise. A mix of full and sliding layers raises (lcjax has one window per model)."""
    use = require_bool(f"{where}.use_sliding_window", c.get("use_sliding_window", False))
    window = c.get("sliding_window") if use else None
    n = c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, (list, tuple)) or len(types) != n:
        raise ValueError(f"{where}.layer_types={types!r} must list one entry per layer (num_hidden_layers={n})")
    kinds = set(types)
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"{where}.layer_types: {sorted(kinds)} (allowed: 'full_attention', 'sliding_attention')")
    if kinds == {"sliding_attention"} and window is not None:
        return window
    if kinds == {"full_attention"}:
        return None
    if window is None:
        raise ValueError(f"{where}.layer_types has 'sliding_attention' layers but use_sliding_window="
                         f"{c.get('use_sliding_window')!r}, sliding_window={c.get('sliding_window')!r}: no window "
                         "to apply")  # fmt: skip
    raise ValueError(f"{where}.layer_types: per-layer sliding windows are not supported (lcjax applies one window to "
                     f"every layer), got {types.count('sliding_attention')} sliding and "
                     f"{types.count('full_attention')} full layers (max_window_layers={c.get('max_window_layers')!r}"
                     ")")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Family:
    """One Llama-like HF family: its key table, the LMConfig fields it sets, its HF export fields, fused tensors."""

    keys: HFKeys
    fields: Callable[[Mapping[str, Any], str], dict[str, Any]]  # (config dict, where) -> LMConfig kwargs
    to_hf: Callable[[LMConfig], dict[str, Any]]  # LMConfig -> family-specific HF config kwargs
    fused: bool = False  # Phi-3: qkv_proj / gate_up_proj


def _mistral_to_hf(cfg: LMConfig) -> dict[str, Any]:
    return dict(sliding_window=cfg.window)


def _phi3_to_hf(cfg: LMConfig) -> dict[str, Any]:
    # rope_from_hf reads a top-level original_max_position_embeddings first (Phi-3 stores it there)
    original = cfg.rope.original_max_position_embeddings
    return dict(sliding_window=cfg.window, original_max_position_embeddings=original or cfg.max_seq_len)


def _qwen_window_to_hf(cfg: LMConfig) -> dict[str, Any]:
    if cfg.window is None:
        return dict(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * cfg.n_layers)
    return dict(use_sliding_window=True, sliding_window=cfg.window, max_window_layers=0,
                layer_types=["sliding_attention"] * cfg.n_layers)  # fmt: skip


FAMILIES: dict[str, Family] = {
    "mistral": Family(MISTRAL_KEYS, lambda c, w: dict(window=_window(c, w)), _mistral_to_hf),
    "qwen2": Family(QWEN2_KEYS, lambda c, w: dict(window=_qwen_window(c, w), qkv_bias=True, o_bias=False),
                    _qwen_window_to_hf),
    "qwen3": Family(QWEN3_KEYS, lambda c, w: dict(window=_qwen_window(c, w), qk_norm=True,
                                                  attention_bias=require_bool(f"{w}.attention_bias",
                                                                              c.get("attention_bias", False))),
                    lambda cfg: _qwen_window_to_hf(cfg) | dict(attention_bias=cfg.attention_bias)),
    "phi3": Family(PHI3_KEYS, lambda c, w: dict(window=_window(c, w)), _phi3_to_hf, fused=True),
}  # fmt: skip


def _family(model_type: Any, where: str) -> tuple[str, Family]:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type={model_type!r} is not one of {sorted(FAMILIES)}")
    return model_type, FAMILIES[model_type]


def _config_from_dict(c: Mapping[str, Any], family: Family, where: str, overrides: Mapping[str, Any]) -> LMConfig:
    missing = [k for k in _REQUIRED if k not in c]
    if missing:
        raise ValueError(f"{where}: missing required {family.keys.family} fields {missing}")
    check_hf_config(c, family.keys, where=where)
    n_heads = c["num_attention_heads"]
    kw = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        mlp_dim=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
        rope=llama.read_rope(c, where), norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=require_bool(f"{where}.tie_word_embeddings", c.get("tie_word_embeddings", False)),
    )  # fmt: skip
    return LMConfig(**(kw | family.fields(c, where) | dict(overrides)))


def config_from_hf(hf_config: Any, **overrides) -> LMConfig:
    """LMConfig from an HF Mistral / Qwen2 / Qwen3 / Phi-3 config (object or ``config.json`` dict), by ``model_type``.

    Raises ``ValueError`` naming every key lcjax does not implement (the family's ``HFKeys``)."""
    c = hf_config_dict(hf_config)
    _, family = _family(c.get("model_type"), "hf_config")
    return _config_from_dict(c, family, "hf_config", overrides)


def config_to_hf(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """The HF config kwargs of ``model_type`` describing ``cfg`` (``ValueError`` where that family cannot)."""
    _, family = _family(model_type, "config_to_hf")
    att = cfg.attention
    want = {"mistral": (False, False, False), "qwen2": (True, False, False), "phi3": (False, False, False),
            "qwen3": (cfg.attention_bias, cfg.attention_bias, True)}[model_type]  # fmt: skip
    if (att.qkv_bias, att.o_bias, att.qk_norm) != want:
        raise ValueError(f"config_to_hf: qkv_bias={att.qkv_bias}, o_bias={att.o_bias}, qk_norm={att.qk_norm} has no "
                         f"{family.keys.family} equivalent (it has qkv_bias, o_bias, qk_norm = {want})")  # fmt: skip
    if cfg.mlp_bias:
        raise ValueError(f"config_to_hf: mlp_bias=True has no {family.keys.family} equivalent")
    out = llama.base_config_to_hf(cfg, "config_to_hf") | family.to_hf(cfg)
    if model_type in ("qwen2", "phi3") and cfg.head_dim != cfg.d_model // cfg.n_heads:
        raise ValueError(f"config_to_hf: head_dim={cfg.head_dim} != d_model // n_heads has no "
                         f"{family.keys.family} config key")  # fmt: skip
    if model_type in ("qwen2", "phi3"):
        out.pop("head_dim")
    return out | dict(model_type=model_type)


# ---- Phi-3's fused tensors ----------------------------------------------------------------------------------------
def _unfuse(state_dict: Mapping[str, Any], cfg: LMConfig) -> dict[str, Any]:
    """Phi-3 names -> Llama names: ``qkv_proj`` rows are [q (H*P), k (K*P), v (K*P)], ``gate_up_proj`` [gate, up]."""
    q, k = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for key, value in state_dict.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            w = llama._to_numpy(value)
            if w.shape[0] != q + 2 * k:
                raise ValueError(f"state_dict[{key!r}]: {w.shape[0]} rows, expected {q + 2 * k} (q, k, v)")
            pre = key[: -len("qkv_proj.weight")]
            out |= {pre + "q_proj.weight": w[:q], pre + "k_proj.weight": w[q : q + k],
                    pre + "v_proj.weight": w[q + k :]}
        elif key.endswith("mlp.gate_up_proj.weight"):
            w = llama._to_numpy(value)
            if w.shape[0] != 2 * cfg.mlp_dim:
                raise ValueError(f"state_dict[{key!r}]: {w.shape[0]} rows, expected {2 * cfg.mlp_dim} (gate, up)")
            pre = key[: -len("gate_up_proj.weight")]
            out |= {pre + "gate_proj.weight": w[: cfg.mlp_dim], pre + "up_proj.weight": w[cfg.mlp_dim :]}
        else:
            out[key] = value
    return out


def _fuse(state_dict: dict[str, np.ndarray], cfg: LMConfig) -> dict[str, np.ndarray]:
    out = dict(state_dict)
    for i in range(cfg.n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[a + "qkv_proj.weight"] = np.concatenate([out.pop(a + f"{n}_proj.weight") for n in "qkv"], axis=0)
        gate, up = out.pop(m + "gate_proj.weight"), out.pop(m + "up_proj.weight")
        out[m + "gate_up_proj.weight"] = np.concatenate([gate, up], axis=0)
    return out


# ---- loaders ------------------------------------------------------------------------------------------------------
def from_state_dict(state_dict: Mapping[str, Any], cfg: LMConfig, model_type: str) -> LM:
    """An ``LM`` holding HF-named weights of ``model_type`` (numpy arrays or torch tensors)."""
    _, family = _family(model_type, "from_state_dict")
    if family.fused:
        state_dict = _unfuse(state_dict, cfg)
    return llama.llama_from_state_dict(state_dict, cfg)


def from_hf(hf_model: Any, **overrides) -> LM:
    """An ``LM`` equal to an in-memory HF ``{Mistral,Qwen2,Qwen3,Phi3}ForCausalLM`` (by ``config.model_type``)."""
    cfg = config_from_hf(hf_model.config, **overrides)
    return from_state_dict(dict(hf_model.state_dict()), cfg, hf_model.config.model_type)


def from_pretrained_dir(path: str | os.PathLike, **overrides) -> LM:
    """Load a local Mistral / Qwen2 / Qwen3 / Phi-3 checkpoint directory (``config.json`` + ``*.safetensors``)."""
    config, state_dict = read_hf_dir(path, caller="from_pretrained_dir")
    where = f"from_pretrained_dir: {os.path.join(os.fspath(path), 'config.json')}"
    model_type, family = _family(config.get("model_type"), where)
    return from_state_dict(state_dict, _config_from_dict(config, family, where, overrides), model_type)


def to_state_dict(model: LM, model_type: str) -> dict[str, np.ndarray]:
    """HF-named numpy state dict of ``model`` in ``model_type``'s layout (Phi-3: fused projections)."""
    _, family = _family(model_type, "to_state_dict")
    config_to_hf(model.cfg, model_type)  # validates that the family can express the model
    out = llama.llama_to_state_dict(model)
    return _fuse(out, model.cfg) if family.fused else out


__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "from_hf", "from_pretrained_dir", "from_state_dict",
           "to_state_dict"]  # fmt: skip
