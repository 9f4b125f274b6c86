"""Mamba-2 LM vs HF transformers 5.23.0 ``Mamba2ForCausalLM`` (torch CPU fallback), weights via ``mamba2_from_hf``."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM

from lcjax.convert.mamba2 import (config_from_hf, config_to_hf, mamba2_from_hf, mamba2_from_pretrained_dir,
                                  mamba2_from_state_dict, mamba2_to_state_dict, mixer_config_from_hf)  # fmt: skip
from lcjax.models import lm as lm_lib
from tolerances import EXACT, F32_GRAD_REL, F32_MODULE, max_rel_err

pytestmark = pytest.mark.torch

V = 97
CASES = {  # chunk 8: L = 37 ends in a partial chunk
    "groups1": dict(n_groups=1),
    "groups2_tied": dict(n_groups=2, tie_word_embeddings=True),
}


def hf_model(**overrides) -> Mamba2ForCausalLM:
    """A tiny random HF model made non-trivial (HF inits A_log = ln(1..H), D = 1, norms = 1, conv bias = 0)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=V, hidden_size=32, expand=2, head_dim=8, num_heads=8, state_size=8, conv_kernel=4,
              chunk_size=8, num_hidden_layers=2, tie_word_embeddings=False, use_cache=False)  # fmt: skip
    model = Mamba2ForCausalLM(HFMamba2Config(**(kw | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif name.endswith(".D"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 2.0)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def pair(case: str):
    hf = hf_model(**CASES[case])
    return hf, mamba2_from_hf(hf)


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape)


full = jax.jit(lambda m, t: m(t))
cached = jax.jit(lambda m, t, c: m(t, cache=c))


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case):
    hf, model = pair(case)
    cfg = model.cfg
    assert cfg == config_from_hf(hf.config) and cfg.block_pattern == ("mamba2",)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    hf_cfg = HFMamba2Config(**config_to_hf(cfg))
    assert config_from_hf(hf_cfg) == cfg and config_from_hf(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize("case", CASES)
def test_logits_prefill_continuation_and_decoding_match_hf(case):
    hf, model = pair(case)
    tokens = ids((2, 37))
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        ref = hf(t).logits.numpy()
        out = hf(t[:, :30], use_cache=True)  # HF's cache path: chunked prefill, then single-token state updates
        ref_cached = [out.logits]
        for i in range(30, 37):
            out = hf(t[:, i : i + 1], cache_params=out.cache_params, use_cache=True)
            ref_cached.append(out.logits)
    ref_cached = torch.cat(ref_cached, dim=1).numpy()
    tokens = jnp.asarray(tokens, jnp.int32)
    np.testing.assert_allclose(full(model, tokens), ref, **F32_MODULE)

    # prefill 30, then the other 7 in one call from the carried states (chunked SSD from initial state + conv history)
    cache = model.init_cache(2, 37)
    prefill, cache_30 = cached(model, tokens[:, :30], cache)
    rest, cache = cached(model, tokens[:, 30:], cache_30)
    np.testing.assert_allclose(jnp.concatenate([prefill, rest], axis=1), ref, **F32_MODULE)
    assert int(cache.index) == 37

    # ... or token by token (the O(1) recurrent step), against HF's cached decoding
    cache, steps = cache_30, [prefill]
    for i in range(30, 37):
        logits, cache = cached(model, tokens[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), ref_cached, **F32_MODULE)
    np.testing.assert_allclose(ref_cached, ref, **F32_MODULE)


def test_gradients_match_torch_autograd():
    hf, model = pair("groups2_tied")  # groups and the tied embedding (its gradient has both uses)
    tokens = ids((2, 19), seed=1)
    w = torch.randn(2, 19, V, generator=torch.Generator().manual_seed(2))
    hf.zero_grad()
    (hf(torch.as_tensor(tokens)).logits * w).sum().backward()
    # torch gradients rearranged by the same (linear) map as the weights
    ref = mamba2_from_state_dict({k: p.grad for k, p in hf.named_parameters()}, model.cfg)

    def loss(m):
        return jnp.sum(m(jnp.asarray(tokens, jnp.int32)) * jnp.asarray(w.numpy()))

    grads = jax.jit(jax.grad(loss))(model)
    flat = dict(nnx.to_flat_state(nnx.state(grads, nnx.Param)))
    flat_ref = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    assert flat.keys() == flat_ref.keys() and len(flat) > 10
    for key in flat:
        assert max_rel_err(flat[key][...], flat_ref[key][...]) <= F32_GRAD_REL, key


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip_is_exact_and_loads_into_hf(case):
    hf, model = pair(case)
    exported = mamba2_to_state_dict(model)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert exported.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(exported[key], ref[key], **EXACT)
    fresh = Mamba2ForCausalLM(HFMamba2Config(**config_to_hf(model.cfg))).eval()
    fresh.load_state_dict({k: torch.as_tensor(v) for k, v in exported.items()}, strict=True)
    tokens = torch.as_tensor(ids((1, 11), seed=3))
    with torch.no_grad():
        np.testing.assert_allclose(fresh(tokens).logits.numpy(), hf(tokens).logits.numpy(), **EXACT)


def test_scan_layers_import_and_export():
    hf, model = pair("groups2_tied")
    scanned = mamba2_from_hf(hf, scan_layers=True)
    tokens = jnp.asarray(ids((2, 13), seed=4), jnp.int32)
    np.testing.assert_allclose(full(scanned, tokens), full(model, tokens), **F32_MODULE)
    exported, ref = mamba2_to_state_dict(scanned), mamba2_to_state_dict(model)
    assert exported.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(exported[key], ref[key], **EXACT)


def test_pretrained_dir_and_bad_state_dicts(tmp_path):
    hf = hf_model(n_groups=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors (the tied head is not stored)
    model = mamba2_from_pretrained_dir(str(tmp_path))
    for key, value in mamba2_to_state_dict(model).items():
        np.testing.assert_allclose(value, hf.state_dict()[key].numpy(), **EXACT)

    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = model.cfg
    with pytest.raises(ValueError, match="missing keys"):
        mamba2_from_state_dict({k: v for k, v in state.items() if "layers.1.mixer.D" not in k}, cfg)
    with pytest.raises(ValueError, match="unexpected keys"):
        mamba2_from_state_dict(state | {"backbone.layers.2.norm.weight": state["backbone.norm_f.weight"]}, cfg)
    with pytest.raises(ValueError, match="differs from the embeddings"):
        mamba2_from_state_dict(state | {"lm_head.weight": state["lm_head.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="shape"):
        mamba2_from_state_dict(state, dataclasses.replace(cfg, vocab_size=V + 1))
    with pytest.raises(ValueError, match="block_pattern"):
        config_to_hf(dataclasses.replace(cfg, block_pattern=("mamba2", "attention"), mlp_dim=8))
    with pytest.raises(ValueError, match="required fields"):
        config_from_hf({"hidden_size": 32})
    assert lm_lib.param_count(cfg) == sum(p.numel() for p in hf.parameters())


# ---- config keys: every key is mapped, harmless, or refused by name ----------------------------------------------
TINY = dict(vocab_size=V, hidden_size=32, expand=2, head_dim=8, num_heads=8, state_size=8, conv_kernel=4,
            chunk_size=8, num_hidden_layers=2, n_groups=2)  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="mamba"), r"model_type='mamba' is not supported \(supported: 'mamba2'\)"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' \(allowed: 'silu'"),
        (dict(norm_before_gate=True), r"norm_before_gate=True \(allowed: False"),  # a mamba_ssm option HF lacks
        (dict(rms_norm=False), r"rms_norm=False \(allowed: True"),  # a 4.x key
        (dict(attention_layer_indices=[1]), r"attention_layer_indices=\[1\] \(a key .* does not know"),  # hybrids
        (dict(use_conv_bias="yes"), "hf_config.use_conv_bias must be a bool"),
        (dict(tie_word_embeddings=1), "hf_config.tie_word_embeddings must be a bool"),
    ],
)
def test_unimplemented_config_keys_raise(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        config_from_hf(HFMamba2Config(**TINY).to_dict() | change)


def test_config_key_checks_cover_dicts_objects_and_directories(tmp_path):
    import json

    base = config_from_hf(HFMamba2Config(**TINY))
    harmless = dict(residual_in_fp32=False, rescale_prenorm_residual=True, time_step_rank=3, initializer_range=0.5,
                    intermediate_size=14336, torch_dtype="float16", pad_token_id=0)  # fmt: skip
    assert config_from_hf(HFMamba2Config(**TINY).to_dict() | harmless) == base
    with pytest.raises(ValueError, match="missing required fields \\['model_type'\\]"):
        config_from_hf({k: v for k, v in HFMamba2Config(**TINY).to_dict().items() if k != "model_type"})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        mixer_config_from_hf(HFMamba2Config(**TINY, hidden_act="relu"))
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "falcon_h1"}))
    with pytest.raises(ValueError, match=r"mamba2_from_pretrained_dir: .*config.json: .*model_type='falcon_h1'"):
        mamba2_from_pretrained_dir(tmp_path)
