"""HF transformers <-> lcjax weight maps (in-memory tensors or safetensors; never unpickle).

``from_pretrained_dir(path)`` loads any supported checkpoint directory, picking the loader from ``model_type``
(``LOADERS``: llama, mistral, qwen2, qwen3, phi3, mamba2). Shared by the family loaders (``llama.py``,
``families.py``, ``mamba2.py``): ``read_hf_dir`` reads a local checkpoint directory and
names the file at fault; ``check_hf_config`` refuses a config that lcjax would otherwise load as a different model.
Each family classifies every key of its transformers 5.23 config once (its ``HF_KEYS``): *mapped* onto the lcjax
config, *harmless* (never changes the forward pass: bookkeeping, tokenizer ids, init-only settings) or *restricted*
to the values lcjax implements. A key in none of these (e.g. Mistral's ``sliding_window`` under ``model_type:
llama``, a ``quantization_config``, remote-code ``auto_map``) is refused as well: lcjax cannot tell that it does
not change the math, and never ignores it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lcjax.checks import require_str

# PreTrainedConfig bookkeeping (transformers 5.23 and the 4.x spellings still found in config.json files), token
# ids, and generation defaults that older versions saved into config.json: none of them changes a model's forward.
HF_COMMON_HARMLESS = frozenset({
    "_attn_implementation", "_attn_implementation_internal", "_commit_hash", "_experts_implementation",
    "_name_or_path", "add_cross_attention", "architectures", "attn_implementation", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "dtype", "experts_implementation", "finetuning_task", "id2label",
    "is_encoder_decoder", "is_decoder", "label2id", "name_or_path", "num_labels", "output_attentions",
    "output_hidden_states", "prefix", "problem_type", "return_dict", "task_specific_params", "tf_legacy_loss",
    "tie_encoder_decoder", "tokenizer_class", "torch_dtype", "torchscript", "transformers_version", "use_bfloat16",
    "bos_token_id", "decoder_start_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    # GenerationConfig defaults (transformers pops these from a model config; lcjax.models.lm.generate takes its own)
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
    "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "suppress_tokens", "target_lookbehind",
    "temperature", "top_k", "top_p", "typical_p", "use_cache",
})  # fmt: skip

# Common keys that change the model unless they hold their default (pruned heads reshape the attention weights).
HF_COMMON_RESTRICTED: dict[str, tuple[Any, ...]] = {"pruned_heads": ({}, None)}


@dataclasses.dataclass(frozen=True)
class HFKeys:
    """One model family's classification of its HF config keys (``check_hf_config`` enforces it).

    ``restricted[key]`` lists the values lcjax implements (compared with ``==``, a bool never standing in for a
    number); ``notes[key]`` says why the others are refused.
    """

    family: str
    model_types: tuple[str, ...]
    mapped: frozenset[str]
    harmless: frozenset[str]
    restricted: Mapping[str, tuple[Any, ...]]
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        overlap = (self.mapped & self.harmless) | ((self.mapped | self.harmless) & set(self.restricted))
        if overlap:
            raise ValueError(f"HFKeys({self.family}): keys classified twice: {sorted(overlap)}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same(value: Any, allowed: Any) -> bool:
    return isinstance(value, bool) == isinstance(allowed, bool) and value == allowed


def check_hf_config(config: Mapping[str, Any], keys: HFKeys, *, where: str = "hf_config") -> None:
    """``ValueError`` naming every key of ``config`` (an HF ``config.json`` dict) that lcjax does not implement.

    ``model_type`` must be one of ``keys.model_types`` (a missing one is refused too); every other key must be mapped,
    harmless, or hold a value listed in ``keys.restricted``. All problems are reported at once.
    """
    problems = []
    model_type = config.get("model_type")
    if model_type not in keys.model_types:
        supported = ", ".join(repr(t) for t in keys.model_types)
        got = " is missing" if model_type is None else f"={model_type!r} is not supported"
        problems.append(f"model_type{got} (supported: {supported})")
    restricted = {**HF_COMMON_RESTRICTED, **keys.restricted}
    for key, value in config.items():
        if key == "model_type" or key in keys.mapped or key in keys.harmless or key in HF_COMMON_HARMLESS:
            continue
        if key in restricted:
            if not any(_same(value, ok) for ok in restricted[key]):
                note = keys.notes.get(key, "")
                allowed = ", ".join(_short(ok) for ok in restricted[key])
                problems.append(f"{key}={_short(value)} (allowed: {allowed}{'; ' + note if note else ''})")
        else:
            problems.append(f"{key}={_short(value)} (a key lcjax's {keys.family} loader does not know; it may "
                            "change the model)")  # fmt: skip
    if problems:
        raise ValueError(f"{where}: not loadable as lcjax's {keys.family} without changing the model: "
                         + "; ".join(problems))  # fmt: skip


def hf_config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict of an HF config object (``to_dict()``) or of a ``config.json`` mapping."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be an HF config object or a dict, got {type(hf_config).__name__}")


def read_hf_config(path: str | os.PathLike, *, caller: str) -> dict[str, Any]:
    """``config.json`` of a local HF checkpoint directory as a dict (errors as in ``read_hf_dir``)."""
    if not isinstance(path, os.PathLike):
        require_str(f"{caller}: path", path)
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{caller}: checkpoint directory {path!r} {what} (expected config.json and "
                                "*.safetensors files in it)")  # fmt: skip
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{caller}: {config_path!r} does not exist (an HF checkpoint directory holds its "
                                "config.json next to the *.safetensors files)")  # fmt: skip
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{caller}: {config_path!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{caller}: {config_path!r} holds a JSON {type(config).__name__}, not an object")
    return config


def read_hf_dir(path: str | os.PathLike, *, caller: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json as a dict, the merged state dict of every *.safetensors file)`` of a local HF checkpoint
    directory, read without unpickling. Every error names ``caller`` and the path or file at fault: a missing
    directory or ``config.json`` (``FileNotFoundError``), unreadable JSON or safetensors, no weights, a tensor in
    two files, or a shard listed in ``model.safetensors.index.json`` but absent (``ValueError``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = read_hf_config(path, caller=caller)
    path = os.fspath(path)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise ValueError(f"{caller}: no *.safetensors files in {path!r}")
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{caller}: {index_path!r} is not a safetensors index (a JSON weight_map): {e}") from e
        absent = sorted(s for s in shards if not os.path.isfile(os.path.join(path, s)))
        if absent:
            raise ValueError(f"{caller}: {index_path!r} lists shards that are not in {path!r}: {absent[:5]}")
    state_dict: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{caller}: cannot read {file!r} (corrupt or truncated safetensors file?): {e}") from e
        for key in tensors:
            if key in origin:
                raise ValueError(f"{caller}: tensor {key!r} is stored in both {origin[key]!r} and {file!r}")
            origin[key] = file
        state_dict.update(tensors)
    return config, state_dict


# model_type -> (module, loader): what ``from_pretrained_dir`` dispatches to (modules imported on use: no cycle).
LOADERS: dict[str, tuple[str, str]] = {
    "llama": ("lcjax.convert.llama", "llama_from_pretrained_dir"),
    "mistral": ("lcjax.convert.families", "from_pretrained_dir"),
    "qwen2": ("lcjax.convert.families", "from_pretrained_dir"),
    "qwen3": ("lcjax.convert.families", "from_pretrained_dir"),
    "phi3": ("lcjax.convert.families", "from_pretrained_dir"),
    "mamba2": ("lcjax.convert.mamba2", "mamba2_from_pretrained_dir"),
    "bamba": ("lcjax.convert.bamba", "bamba_from_pretrained_dir"),
}


def from_pretrained_dir(path: str | os.PathLike, **overrides) -> Any:
    """An ``lcjax.models.lm.LM`` from a local HF checkpoint directory, the family picked by ``config.json``'s
    ``model_type`` (``LOADERS``); ``overrides`` are ``LMConfig`` fields. An unknown or missing ``model_type`` raises
    ``ValueError`` naming it and the supported ones; the family's loader then checks every key."""
    import importlib

    config = read_hf_config(path, caller="from_pretrained_dir")
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        got = " is missing" if model_type is None else f"={model_type!r} is not supported"
        raise ValueError(f"from_pretrained_dir: {os.path.join(os.fspath(path), 'config.json')}: model_type{got} "
                         f"(supported: {', '.join(map(repr, LOADERS))})")  # fmt: skip
    module, name = LOADERS[model_type]
    return getattr(importlib.import_module(module), name)(path, **overrides)


__all__ = ["LOADERS", "HFKeys", "check_hf_config", "from_pretrained_dir", "hf_config_dict", "read_hf_config",
           "read_hf_dir"]  # fmt: skip
