"""lcjax hybrid LM vs HF transformers 5.23.0 ``BambaForCausalLM`` (Mamba-2 + attention, every layer with a SwiGLU MLP).

Weights via ``lcjax.convert.bamba``; HF runs its torch fallback path (no mamba_ssm kernels on CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import BambaConfig, BambaForCausalLM

from lcjax import convert
from lcjax.convert.bamba import (
    bamba_config_from_hf, bamba_config_to_hf, bamba_from_hf, bamba_from_pretrained_dir, bamba_from_state_dict,
    bamba_to_state_dict,
)  # fmt: skip
from lcjax.models import lm as lm_lib
from lcjax.ops.losses import token_cross_entropy
from tolerances import EXACT, F32_MODULE

pytestmark = pytest.mark.torch

V = 128
# 4 layers, attention at index 1; mamba: 8 heads of 16, 2 groups, d_state 16, chunk 16 (L = 37: a partial chunk).
TINY = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=256,
    use_cache=False,
)  # fmt: skip
CASES = {
    "attn1": {},
    "attn3_tied_bias": dict(attn_layer_indices=[3], tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                            mamba_proj_bias=True, mamba_conv_bias=False),
}  # fmt: skip


def hf_model(**overrides) -> BambaForCausalLM:
    """A tiny random HF Bamba made non-trivial (HF inits A_log = ln(1..H), D = 1, dt_bias = 1, norms = 1)."""
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**(TINY | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif name.endswith(".D"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 2.0)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def pair(case: str):
    hf = hf_model(**CASES[case])
    return hf, bamba_from_hf(hf)


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape)


def hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens))).logits.numpy()


full = jax.jit(lambda m, t: m(t))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case):
    hf, model = pair(case)
    assert model.cfg.layer_types() == tuple("attention" if i in hf.config.attn_layer_indices else "mamba2_mlp"
                                            for i in range(4))  # fmt: skip
    assert model.cfg.rope.partial_rotary_factor == 0.5
    tokens = ids((2, 37))
    ref = hf_logits(hf, tokens)
    got = np.asarray(full(model, jnp.asarray(tokens)))
    print(f"bamba {case}: max abs logits diff vs HF = {np.max(np.abs(got - ref)):.2e}")
    np.testing.assert_allclose(got, ref, **F32_MODULE)


def test_pretrained_dir_and_export_round_trip(tmp_path):
    hf, model = pair("attn1")
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    loaded = bamba_from_pretrained_dir(tmp_path)
    assert loaded.cfg == model.cfg
    assert convert.from_pretrained_dir(tmp_path).cfg == model.cfg  # the dispatcher picks Bamba from model_type
    tokens = ids((1, 24), seed=1)
    got = np.asarray(full(loaded, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, hf_logits(hf, tokens), **F32_MODULE)
    exported = bamba_to_state_dict(loaded)
    ref_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(exported) == set(ref_sd)
    for key, value in ref_sd.items():
        np.testing.assert_allclose(exported[key], value, err_msg=key, **EXACT)
    back = BambaForCausalLM(BambaConfig(**bamba_config_to_hf(loaded.cfg), use_cache=False)).eval()
    back.load_state_dict({k: torch.tensor(v) for k, v in exported.items()})
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(hf, tokens), **EXACT)


def test_cached_greedy_generate_equals_teacher_forced_hf_argmax():
    hf, model = pair("attn1")
    prompt = ids((2, 11), seed=2)
    new = np.asarray(lm_lib.generate(model, jnp.asarray(prompt), max_new_tokens=8))
    seq = np.concatenate([prompt, new], axis=1)
    ref_next = hf_logits(hf, seq)[:, prompt.shape[1] - 1 : -1].argmax(-1)  # HF's greedy choice at every step
    np.testing.assert_array_equal(new, ref_next)


def test_one_train_step_runs_and_lowers_the_loss():
    _, model = pair("attn1")
    tokens = jnp.asarray(ids((2, 17), seed=3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        total, count = token_cross_entropy(nnx.merge(graphdef, p, rest)(tokens[:, :-1]), tokens[:, 1:])
        return total / count

    @jax.jit
    def step(p):  # one SGD step: the loss before and after it
        loss, grads = jax.value_and_grad(loss_fn)(p)
        return loss, loss_fn(jax.tree.map(lambda a, g: a - 0.05 * g, p, grads))

    loss0, loss1 = map(float, step(params))
    assert np.isfinite(loss0) and np.isfinite(loss1) and loss1 < loss0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="mamba2"), "model_type='mamba2' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(z_loss_coefficient=0.1), "z_loss_coefficient=0.1"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1"),
        (dict(sliding_window=8), "sliding_window=8 .a key lcjax's Bamba loader does not know"),
        (dict(attn_layer_indices=[4]), "attn_layer_indices\\[\\]"),
        (dict(layer_types=["full_attention"] * 4), "layer_types=.*disagrees with attn_layer_indices"),
        (dict(mamba_n_heads=4), "mamba_n_heads=4"),
        (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 1e4}), "bogus"),
        (dict(partial_rotary_factor=0.25), "partial_rotary_factor=0.25"),
    ],
)  # fmt: skip
def test_bad_configs_raise(change, match):
    config = BambaConfig(**TINY).to_dict() | change
    with pytest.raises((ValueError, TypeError), match=match):
        bamba_config_from_hf(config)


def test_v4_style_config_reads_rope_theta_and_the_hardcoded_partial_rotary_factor():
    """A transformers 4.x config.json: top-level ``rope_theta``, ``rope_scaling: null``, no ``rope_parameters``."""
    config = BambaConfig(**TINY).to_dict()
    del config["rope_parameters"]
    config |= dict(rope_theta=5e5, rope_scaling=None, partial_rotary_factor=0.5)
    rope = bamba_config_from_hf(config).rope
    hf_rope = BambaConfig.from_dict(config).rope_parameters  # how transformers 5.23 reads the same file
    assert (rope.rope_type, rope.theta, rope.partial_rotary_factor) == ("default", 5e5, 0.5)
    assert (hf_rope["rope_type"], hf_rope["rope_theta"], hf_rope["partial_rotary_factor"]) == ("default", 5e5, 0.5)


def test_config_round_trip_and_bad_state_dict():
    hf, model = pair("attn3_tied_bias")
    cfg = model.cfg
    assert bamba_config_from_hf(BambaConfig(**bamba_config_to_hf(cfg))) == cfg
    sd = dict(hf.state_dict())
    del sd["model.layers.0.mamba.A_log"]
    with pytest.raises(ValueError, match="missing keys \\['model.layers.0.mamba.A_log'\\]"):
        bamba_from_state_dict(sd, cfg)
