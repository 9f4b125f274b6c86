"""GGUF (llama.cpp's file format) -> lcjax ``LM``, for the Llama architecture.

A GGUF file holds typed metadata (``llama.block_count``, ``llama.rope.freq_base``, ``tokenizer.ggml.*`` ...) and
tensors, possibly quantized (Q4_1, Q8_0, ...). ``gguf_config`` maps the metadata to an ``LMConfig`` through the HF
Llama reader (``lcjax.convert.llama.config_from_hf``), so both doors check the same things; ``llama_from_gguf``
dequantizes every tensor to float32 with the ``gguf`` package (``gguf.quants.dequantize``) and loads it by HF name.

Two layout facts matter:

- GGUF lists a tensor's dims fastest-first, so a GGUF ``[in, out]`` matrix is the numpy / torch ``[out, in]`` array
  that ``GGUFReader`` and ``dequantize`` hand back; the arrays below are in that (torch) order.
- llama.cpp applies RoPE to adjacent pairs (x[2i], x[2i+1]) while HF Llama rotates halves (x[i], x[i + P/2]).
  llama.cpp's converter therefore reorders the rows of ``q_proj`` / ``k_proj`` inside each head: with rows indexed
  (head h, half j in {0, 1}, i < P/2) in HF order, the GGUF row (h, i, j) holds HF row (h, j, i). Undoing it is the
  transpose of the two inner axes: ``w.reshape(heads, P/2, 2, D).swapaxes(1, 2)``. llama.cpp's pairwise RoPE on the
  permuted rows equals HF's rotate-half RoPE on the original ones; lcjax rotates halves, so it needs HF's order.

Every metadata key is classified: ``general.*``, ``GGUF.*`` and ``tokenizer.*`` do not change the model's math; the
architecture keys are mapped (``_MAPPED``) or, if unknown or not implemented (experts, sliding windows, YaRN, Llama-3
``rope_freqs``), raise ``ValueError`` naming the key instead of loading a different model.
Reference: ``gguf`` 0.19.0 (``gguf/constants.py``: key and tensor names); llama.cpp ``convert_hf_to_gguf.py``
(``LlamaModel.permute``); transformers 5.23.0 ``modeling_gguf_pytorch_utils.py`` (the inverse, for its own loader).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lcjax.convert import llama as llama_convert
from lcjax.models.lm import LM, LMConfig

ARCH = "llama"
# llama.<key> -> HF LlamaConfig field (values cast below).
_MAPPED = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# Read and checked here, not passed on as HF fields.
_CHECKED = {"rope.dimension_count", "attention.value_length", "rope.scaling.type", "rope.scaling.factor",
            "rope.scaling.original_context_length", "rope.scaling.finetuned", "expert_count",
            "expert_used_count"}  # fmt: skip
_NEUTRAL_PREFIXES = ("general.", "GGUF.", "tokenizer.")  # names, licence, file type, the tokenizer: not the math
_RENAMES = {  # GGUF tensor name -> HF Llama state-dict name ({i} = layer)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}


def _reader(path: str | os.PathLike, caller: str):
    import gguf  # optional dependency: pip install "lcjax[gguf]"

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{caller}: {path!r} is not a file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError / struct errors on a non-GGUF file
        raise ValueError(f"{caller}: {path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its Python value (strings, numbers, bools, lists)."""
    return _metadata(_reader(path, "gguf_metadata"))


def _metadata(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        value = field.contents()
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _hf_config(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The HF ``LlamaConfig`` dict equal to a GGUF file's metadata; raises naming any key lcjax would not honour."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"{where}: general.architecture={arch!r} is not supported; lcjax reads {ARCH!r} GGUF files")
    prefix = ARCH + "."
    for key in meta:
        if key.startswith(_NEUTRAL_PREFIXES):
            continue
        sub = key[len(prefix):] if key.startswith(prefix) else None
        if sub is None or (sub not in _MAPPED and sub not in _CHECKED):
            raise ValueError(f"{where}: metadata key {key!r} is not implemented (it may change the model; lcjax "
                             f"reads {sorted(prefix + k for k in {*_MAPPED, *_CHECKED})})")  # fmt: skip
    get = lambda sub, default=None: meta.get(prefix + sub, default)
    config: dict[str, Any] = {"model_type": "llama", "hidden_act": "silu"}
    for sub, hf in _MAPPED.items():
        if get(sub) is not None:
            config[hf] = float(get(sub)) if hf in ("rms_norm_eps", "rope_theta") else int(get(sub))
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    for sub in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if sub not in config:
            gguf_key = next((prefix + k for k, v in _MAPPED.items() if v == sub), sub)
            raise ValueError(f"{where}: missing metadata key {gguf_key!r}")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for sub in ("attention.value_length", "rope.dimension_count"):
        if get(sub) is not None and int(get(sub)) != head_dim:
            raise ValueError(f"{where}: {prefix + sub}={get(sub)} differs from the head dim {head_dim}; lcjax's GGUF "
                             "reader implements equal key/value head dims rotated whole by RoPE")  # fmt: skip
    for sub in ("expert_count", "expert_used_count"):
        if get(sub, 0):
            raise ValueError(f"{where}: {prefix + sub}={get(sub)}: mixture-of-experts GGUF models are not implemented")
    scaling = get("rope.scaling.type", "none")
    rope: dict[str, Any] = {"rope_theta": config.pop("rope_theta", 10_000.0)}
    if scaling == "none":
        rope["rope_type"] = "default"
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
    else:
        raise ValueError(f"{where}: {prefix}rope.scaling.type={scaling!r} is not implemented (lcjax reads 'none' "
                         "and 'linear' from GGUF metadata)")  # fmt: skip
    if scaling == "none" and get("rope.scaling.factor", 1.0) not in (1.0, 0.0):
        raise ValueError(f"{where}: {prefix}rope.scaling.factor={get('rope.scaling.factor')} without a scaling type")
    config["rope_parameters"] = rope
    return config


def gguf_config(path: str | os.PathLike, **overrides) -> LMConfig:
    """The ``LMConfig`` of a Llama GGUF file (``overrides`` are LMConfig fields, e.g. ``dtype``).

    Tied embeddings are read from the tensors (no ``output.weight``). Raises ``ValueError`` naming the key for
    another architecture or any metadata that would change the math and is not implemented.
    """
    reader = _reader(path, "gguf_config")
    return _config(reader, f"gguf_config: {os.fspath(path)}", overrides)


def _config(reader: Any, where: str, overrides: Mapping[str, Any]) -> LMConfig:
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{where}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency RoPE factors, e.g. "
                         "Llama-3.1 scaling) is not implemented")  # fmt: skip
    config = _hf_config(_metadata(reader), where)
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    return llama_convert.config_from_hf(config, **overrides)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order of a llama.cpp ``attn_q`` / ``attn_k`` weight ``[n_heads * P, D]`` (or bias ``[n_heads * P]``):
    within each head, GGUF row (i, j) -> HF row (j, i) for pair index i < P/2 and half j in {0, 1}."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, where: str) -> str:
    if name in _RENAMES:
        return _RENAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_RENAMES:
        return f"model.layers.{parts[1]}.{_LAYER_RENAMES[parts[2]]}"
    raise ValueError(f"{where}: tensor {name!r} is not a Llama tensor lcjax maps")


def gguf_state_dict(reader: Any, cfg: LMConfig, where: str) -> dict[str, np.ndarray]:
    """HF-named float32 arrays ([out, in], HF's Q/K row order) of every tensor in an open ``GGUFReader``."""
    import gguf

    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name, where)
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF dims are fastest-first
        if ".q_proj." in name:
            w = unpermute_qk(w, cfg.n_heads)
        elif ".k_proj." in name:
            w = unpermute_qk(w, cfg.n_kv_heads)
        out[name] = w
    return out


def llama_from_gguf(path: str | os.PathLike, *, dtype: str = "float32", **overrides) -> LM:
    """An ``LM`` holding a Llama GGUF file's weights, dequantized to float32 and stored as ``dtype``.

    ``dtype`` sets the parameter and compute dtypes; ``overrides`` are other LMConfig fields (e.g. ``attn_impl``).
    The tokenizer of the file: ``lcjax.data.tokenizers.HFTokenizer.from_gguf(path)``.
    """
    reader = _reader(path, "llama_from_gguf")
    where = f"llama_from_gguf: {os.fspath(path)}"
    cfg = _config(reader, where, {"dtype": dtype, "param_dtype": dtype, **overrides})
    return llama_convert.llama_from_state_dict(gguf_state_dict(reader, cfg, where), cfg)
