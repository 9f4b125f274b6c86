"""Import released M2-BERT checkpoints (HazyResearch/m2, ``togethercomputer/m2-bert-*``) into ``lcjax.models.m2_bert``.

Key names follow HazyResearch/m2 ``bert/src/bert_layers.py`` and ``bert/src/mm/`` (HF prefix ``bert.``, composer
prefix ``model.bert.``; heads ``cls.predictions.*`` and ``bert.pooler.dense.*``). torch Linear weights are
``(out, in)`` and are transposed; ``in_linear``/``short_filter`` channels ``[x1 | x2 | v]`` become a ``(…, 3, E)``
axis; ``BlockdiagLinear`` weights ``(nb, out/nb, in/nb)`` become ``(nb, in/nb, out/nb)``. The six copies of the
shared Sin frequency (``implicit_filter{,_rev}.{1,3,5}.freq``) must be equal and are loaded once; the buffers
``pos_emb.t`` and ``modulation.deltas`` are loaded as they are (``Buffer`` variables); FlashFFTConv buffers (any key
with a ``flashfft`` component, attached by ``use_flash_fft``) and the ``position_ids``/``token_type_ids`` buffers
are skipped. Anything else unexpected raises ``ValueError`` (pass ``ignore=("classifier.",)`` for GLUE heads).

No unpickling here: pass a dict of numpy arrays or torch tensors. For safetensors files::

    from safetensors.numpy import load_file
    model = m2_bert_from_state_dict(load_file("model.safetensors"))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from lcjax.layers import m2_filter
from lcjax.models.m2_bert import M2Bert, M2BertConfig


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _strip(key: str) -> str:
    for prefix in ("model.", "bert."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _normalize(state_dict: Mapping[str, Any], ignore: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        name = _strip(key)
        if "flashfft" in name.split(".") or name in ("embeddings.position_ids", "embeddings.token_type_ids"):
            continue
        if any(name.startswith(p) or key.startswith(p) for p in ignore):
            continue
        out[name] = _to_numpy(value)
    return out


def m2_bert_config_from_state_dict(state_dict: Mapping[str, Any], **overrides) -> M2BertConfig:
    """Infer ``M2BertConfig`` from the tensor shapes (layer norm eps, conv impl etc. via ``overrides``)."""
    sd = {_strip(k): v for k, v in state_dict.items()}
    f = "encoder.layer.0.attention.filter_fn."
    need = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "encoder.layer.0.mlp.gated_layers.weight",
            f + "implicit_filter.0.weight", f + "pos_emb.z"]  # fmt: skip
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"m2_bert_from_state_dict: not an M2-BERT state dict, missing {missing}")
    shape = lambda k: tuple(sd[k].shape)
    V, D = shape(need[0])
    nb, two_f_blk, _ = shape(need[3])
    o, e = shape(need[4])
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    inferred = dict(
        d_model=D, d_ff=two_f_blk * nb // 2, n_layers=max(layers) + 1, vocab_size=V,
        max_position_embeddings=shape(need[1])[0], type_vocab_size=shape(need[2])[0],
        l_max=None if shape(need[5])[1] == shape(need[1])[0] else shape(need[5])[1],
        nblocks=nb, filter_order=o, emb_dim=e,
        bidirectional=any("implicit_filter_rev" in k for k in sd),
        residual_long_conv=any(".filter_fn2." in k for k in sd),
        training_additions="encoder.layer.0.attention.layernorm.weight" in sd,
        pooler="pooler.dense.weight" in sd, mlm_head="cls.predictions.transform.dense.weight" in sd,
    )  # fmt: skip
    return M2BertConfig(**(inferred | overrides))


def _filter_params(sd: dict, prefix: str, fcfg: m2_filter.HyenaFilterConfig, used: set) -> dict:
    get = lambda k: (used.add(prefix + k), sd[prefix + k])[1]
    out = {("bias",): get("bias"), ("z",): get("pos_emb.z")[0]}
    mlps = ["implicit_filter"] + (["implicit_filter_rev"] if fcfg.bidirectional else [])
    freqs = [get(f"{mlp}.{i}.freq").reshape(-1) for mlp in mlps for i in (1, 3, 5) if f"{prefix}{mlp}.{i}.freq" in sd]
    if not freqs or any(not np.array_equal(f, freqs[0]) for f in freqs):
        raise ValueError(f"m2_bert_from_state_dict: {prefix}*.freq copies are missing or differ (one shared Sin)")
    out[("freq",)] = freqs[0]
    for mlp in mlps:
        for j, i in enumerate((0, 2, 4)):
            out[(mlp, f"w{j}")] = get(f"{mlp}.{i}.weight").T
            out[(mlp, f"b{j}")] = get(f"{mlp}.{i}.bias")
        out[(mlp, "w3")] = get(f"{mlp}.6.weight").T
    # buffers: loaded when present (an export without them gets the standard values)
    out[("t",)] = get("pos_emb.t").reshape(-1) if prefix + "pos_emb.t" in sd else m2_filter.time_grid(fcfg.l_max)
    has_deltas = prefix + "modulation.deltas" in sd
    out[("deltas",)] = get("modulation.deltas").reshape(-1) if has_deltas else m2_filter.decay_rates(fcfg)
    return out


def _layer_params(sd: dict, i: int, cfg: M2BertConfig, used: set) -> dict:
    p = f"encoder.layer.{i}."
    get = lambda k: (used.add(p + k), sd[p + k])[1]
    D = cfg.d_model
    a = "attention."
    out = {
        ("mixer", "in_linear"): get(a + "in_linear.weight").reshape(3, D, D).transpose(2, 0, 1),
        ("mixer", "in_linear_bias"): get(a + "in_linear.bias").reshape(3, D),
        ("mixer", "out_linear"): get(a + "out_linear.weight").T,
        ("mixer", "out_linear_bias"): get(a + "out_linear.bias"),
        ("mixer", "short_filter"): get(a + "short_filter.weight")[:, 0, :].reshape(3, D, -1).transpose(2, 0, 1),
        ("mixer", "short_filter_bias"): get(a + "short_filter.bias").reshape(3, D),
        ("mlp", "gated_layers", "weight"): get("mlp.gated_layers.weight").transpose(0, 2, 1),
        ("mlp", "wo", "weight"): get("mlp.wo.weight").transpose(0, 2, 1),
        ("mlp", "wo", "bias"): get("mlp.wo.bias"),
        ("mlp", "layernorm"): get("mlp.layernorm.weight"),
        ("mlp", "layernorm_bias"): get("mlp.layernorm.bias"),
    }
    if cfg.training_additions:
        out[("mixer", "layernorm")] = get(a + "layernorm.weight")
        out[("mixer", "layernorm_bias")] = get(a + "layernorm.bias")
    fcfg = cfg.sequence_mixer_config().filter_config()
    for name in ("filter_fn",) + (("filter_fn2",) if cfg.residual_long_conv else ()):
        for k, v in _filter_params(sd, p + a + name + ".", fcfg, used).items():
            out[("mixer", name, *k)] = v
    return out


def m2_bert_from_state_dict(state_dict: Mapping[str, Any], *, ignore: tuple[str, ...] = (), param_dtype=np.float32,
                            **config_overrides) -> M2Bert:  # fmt: skip
    """An ``M2Bert`` holding the weights of a released M2-BERT ``state_dict`` (numpy arrays or torch tensors).

    The config is inferred from the shapes (``m2_bert_config_from_state_dict``); ``config_overrides`` set the rest
    (``mask_padding``, ``conv_impl``, ``layer_norm_eps``...). ``param_dtype=np.float64`` (under ``jax.enable_x64``)
    gives a float64 model. Raises ``ValueError`` on missing, unexpected or mis-shaped tensors.
    """
    if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):  # a bare str would match by letter
        raise TypeError(f"m2_bert_from_state_dict: ignore must be a tuple of key prefixes (str), got {ignore!r}")
    cfg = m2_bert_config_from_state_dict(state_dict, **config_overrides)
    sd = _normalize(state_dict, tuple(ignore))
    used: set[str] = set()
    get = lambda k: (used.add(k), sd[k])[1]
    try:
        params = {
            ("embeddings", "word_embeddings"): get("embeddings.word_embeddings.weight"),
            ("embeddings", "position_embeddings"): get("embeddings.position_embeddings.weight"),
            ("embeddings", "token_type_embeddings"): get("embeddings.token_type_embeddings.weight"),
            ("embeddings", "layernorm"): get("embeddings.LayerNorm.weight"),
            ("embeddings", "layernorm_bias"): get("embeddings.LayerNorm.bias"),
        }
        for i in range(cfg.n_layers):
            params |= {("layers", i, *k): v for k, v in _layer_params(sd, i, cfg, used).items()}
        if cfg.pooler:
            params[("pooler",)] = get("pooler.dense.weight").T
            params[("pooler_bias",)] = get("pooler.dense.bias")
        if cfg.mlm_head:
            c = "cls.predictions."
            params[("transform",)] = get(c + "transform.dense.weight").T
            params[("transform_bias",)] = get(c + "transform.dense.bias")
            params[("transform_layernorm",)] = get(c + "transform.LayerNorm.weight")
            params[("transform_layernorm_bias",)] = get(c + "transform.LayerNorm.bias")
            bias_key = c + "decoder.bias" if c + "decoder.bias" in sd else c + "bias"
            params[("decoder_bias",)] = get(bias_key)
            for tied in (c + "decoder.weight",):
                if tied in sd:
                    used.add(tied)
                    if not np.array_equal(sd[tied], sd["embeddings.word_embeddings.weight"]):
                        raise ValueError(f"m2_bert_from_state_dict: {tied} is not tied to the word embeddings")
            used.add(c + "bias")
            used.add(c + "decoder.bias")
    except KeyError as e:
        raise ValueError(f"m2_bert_from_state_dict: missing tensor {e.args[0]!r}") from None
    unexpected = sorted(set(sd) - used)
    if unexpected:
        more = "..." if len(unexpected) > 8 else ""
        raise ValueError(f"m2_bert_from_state_dict: unexpected tensors {unexpected[:8]}{more} "
                         "(pass ignore=(prefix, ...) to skip heads lcjax does not model)")  # fmt: skip
    model = jax.eval_shape(lambda: M2Bert(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, m2_filter.Buffer))):
        if path not in params:
            raise ValueError(f"m2_bert_from_state_dict: no checkpoint tensor for parameter {'.'.join(map(str, path))}")
        value = params.pop(path)
        if tuple(value.shape) != tuple(var.value.shape):
            raise ValueError(f"m2_bert_from_state_dict: {'.'.join(map(str, path))} has shape {value.shape}, "
                             f"expected {var.value.shape}")  # fmt: skip
        var.value = jax.numpy.asarray(value, param_dtype)
    if params:
        raise ValueError(f"m2_bert_from_state_dict: internal mapping produced unknown paths {sorted(params)[:4]}")
    return model
