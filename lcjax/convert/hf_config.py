"""The one reader of HF RoPE settings: ``config.json`` (v4 or v5 spellings) -> ``lcjax.ops.rope.RopeConfig``.

transformers 5.23 standardises RoPE in ``configuration_utils`` / ``modeling_rope_utils``
(``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` and ``standardize_rope_params``); ``rope_from_hf`` reads
a config dict the same way, written from that behaviour:

- a legacy 4.x ``rope_scaling`` dict wins over ``rope_parameters``; ``type`` is the old spelling of ``rope_type``
  (``rope_type`` wins when both are present); a top-level ``rope_theta`` / ``partial_rotary_factor`` fills a
  missing one (``rope_theta`` defaults to ``default_theta``);
- aliases: ``"su"`` -> ``longrope`` (Phi-3 before 4.42), and under ``model_type: phi3`` also ``"yarn"`` -> ``longrope``
  (transformers' Phi3Config does the same); ``"ntk"`` (4.4x spelling of dynamic NTK) -> ``dynamic``;
- for ``llama3``/``yarn``/``longrope`` a top-level ``original_max_position_embeddings`` (Phi-3 stores it there) takes
  priority, else the one in the RoPE dict, else ``max_position_embeddings``; ``dynamic`` reads
  ``max_position_embeddings`` as its threshold; ``yarn``/``longrope`` with no ``factor`` use
  ``max_position_embeddings / original_max_position_embeddings``;
- yarn's ``beta_fast``/``beta_slow`` default to 32/1 when missing or falsy and ``truncate`` to True (``None`` means
  no truncation), as HF reads them.

Anything transformers would warn about and ignore, or that lcjax does not implement, raises ``ValueError`` naming
the key instead: an unknown ``rope_type`` (``proportional``, ``mrope``, ...), a key the type does not read, a
missing required key, per-layer-type (nested) RoPE dicts, or a value ``RopeConfig`` rejects.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from lcjax.ops import rope as rope_ops

# Keys each rope_type reads (besides rope_type / type / rope_theta / partial_rotary_factor); required ones first.
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "longrope": ("original_max_position_embeddings", "factor", "attention_factor"),
    "llama3": ("original_max_position_embeddings",),
}  # fmt: skip
_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_ALIASES = {"su": "longrope", "ntk": "dynamic"}
DEFAULT_MAX_POSITION_EMBEDDINGS = 2048  # transformers' PreTrainedConfig / LlamaConfig default


def _rope_dict(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    raw = config.get("rope_scaling") or config.get("rope_parameters") or {}
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}.{key} must be a dict, got {raw!r}")
    nested = [k for k, v in raw.items() if isinstance(v, Mapping)]
    if nested:
        raise ValueError(f"{where}.{key}: per-layer-type RoPE ({nested}) is not implemented; lcjax uses one RoPE "
                         "for every layer")  # fmt: skip
    return dict(raw)


def _as_float(v: Any) -> Any:
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v  # others: RopeConfig refuses


def rope_from_hf(
    config: Mapping[str, Any], *, where: str = "hf_config", default_theta: float = 10_000.0
) -> rope_ops.RopeConfig:
    """The ``RopeConfig`` of an HF ``config.json`` dict, as transformers 5.23 standardises it (module docstring).

    Raises ``ValueError`` naming every RoPE key lcjax would otherwise ignore or cannot implement."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: rope_from_hf takes a config dict, got {type(config).__name__}")
    params = _rope_dict(config, where)
    params.setdefault("rope_theta", config.get("rope_theta", default_theta))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if config.get("model_type") == "phi3" and rope_type == "yarn":
        rope_type = "longrope"  # Phi3Config's backward compatibility
    rope_type = _ALIASES.get(rope_type, rope_type)
    if rope_type not in _REQUIRED:
        raise ValueError(f"{where}.rope_parameters.rope_type={rope_type!r} is not implemented; allowed: "
                         f"{', '.join(map(repr, rope_ops.ROPE_TYPES))} (aliases {sorted(_ALIASES)})")  # fmt: skip
    read = set(_COMMON) | set(_REQUIRED[rope_type]) | set(_OPTIONAL[rope_type])
    unread = {k: v for k, v in params.items() if k not in read and v is not None}
    if unread:
        raise ValueError(f"{where}.rope_parameters: {unread} not implemented for rope_type={rope_type!r} (lcjax "
                         f"reads {sorted(read - {'type'})})")  # fmt: skip
    missing = [k for k in _REQUIRED[rope_type] if k not in params and not (k == "factor" and rope_type == "longrope")]
    if missing:
        raise ValueError(f"{where}.rope_parameters: rope_type={rope_type!r} requires {missing}")
    max_pos = config.get("max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS)
    kw: dict[str, Any] = dict(rope_type=rope_type, theta=params["rope_theta"])
    if params.get("partial_rotary_factor") is not None:
        kw["partial_rotary_factor"] = params["partial_rotary_factor"]
    if rope_type in ("linear", "dynamic", "llama3", "yarn", "longrope"):
        kw["factor"] = params.get("factor")
    if rope_type in ("llama3", "yarn", "longrope"):
        original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        kw["original_max_position_embeddings"] = original or max_pos
        if kw["factor"] is None:
            kw["factor"] = max_pos / kw["original_max_position_embeddings"]
    if rope_type == "dynamic":
        kw["max_position_embeddings"] = max_pos
    if rope_type in ("yarn", "longrope"):
        kw["attention_factor"] = params.get("attention_factor")
    if rope_type == "yarn":
        truncate = params.get("truncate", True)
        kw.update(beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
                  mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                  truncate=False if truncate is None else truncate)  # fmt: skip
    if rope_type == "longrope":
        kw.update(short_factor=params["short_factor"], long_factor=params["long_factor"])
    if rope_type == "llama3":
        kw.update(low_freq_factor=params["low_freq_factor"], high_freq_factor=params["high_freq_factor"])
    floats = {"theta", "factor", "partial_rotary_factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "low_freq_factor", "high_freq_factor"}  # JSON writes 8 for 8.0
    kw = {k: _as_float(v) if k in floats else v for k, v in kw.items()}
    for k in ("short_factor", "long_factor"):
        if isinstance(kw.get(k), (list, tuple)):
            kw[k] = tuple(_as_float(v) for v in kw[k])
    try:
        rope = rope_ops.RopeConfig(**kw)
        head_dim = config.get("head_dim") or _div(config.get("hidden_size"), config.get("num_attention_heads"))
        if head_dim is not None:
            rope_ops.rotary_dim(head_dim, rope)  # longrope's factor lengths, an even rotated dim
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}.rope_parameters: {e}") from e
    return rope


def _div(a: Any, b: Any) -> int | None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b))
    return a // b if ok else None


def rope_to_hf(rope: rope_ops.RopeConfig) -> dict[str, Any]:
    """The v5 ``rope_parameters`` dict describing ``rope`` (read back by ``rope_from_hf``; ``dynamic`` also needs the
    config's ``max_position_embeddings`` to equal ``rope.max_position_embeddings``)."""
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    t = rope.rope_type
    if t != "default":
        out["factor"] = rope.factor
    if t in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if t in ("yarn", "longrope") and rope.attention_factor is not None:
        out["attention_factor"] = rope.attention_factor
    if t == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        out.update({k: getattr(rope, k) for k in ("mscale", "mscale_all_dim") if getattr(rope, k) is not None})
    if t == "longrope":
        out.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
    if t == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    return out


__all__ = ["rope_from_hf", "rope_to_hf"]
