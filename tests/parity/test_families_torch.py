"""Mistral, Qwen2, Qwen3, Phi-3 parity with HF transformers 5.23 (tiny random models; lcjax.convert.families).

Each family: logits in memory and from a ``save_pretrained`` directory through ``lcjax.convert.from_pretrained_dir``,
cached decoding (Mistral past its window, through the ring cache), greedy generation, export back, v4- and v5-style
config.json, and the configs lcjax refuses (``ValueError`` naming the key).
"""

import json

import jax
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests
import transformers
from flax import nnx

from lcjax import convert
from lcjax.convert import families
from lcjax.layers.attention import KVCache, RingKVCache
from lcjax.models import lm as lm_lib
from tests.tolerances import EXACT, F32_MODULE

pytestmark = pytest.mark.torch

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, eos_token_id=None,
            bos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})  # fmt: skip
WINDOW = 8
CASES = {  # id -> (HF class name, config overrides)
    "mistral": ("Mistral", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2", {}),
    "qwen2-sliding": ("Qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    "qwen3": ("Qwen3", dict(head_dim=12, attention_bias=True)),  # head_dim 12 != 32 / 4
    "phi3": ("Phi3", dict(sliding_window=WINDOW)),
    # LongRoPE (short factors up to 16 positions, long past them) rotating half of each head (Phi-4-mini style)
    "phi3-longrope": ("Phi3", dict(original_max_position_embeddings=16, partial_rotary_factor=0.5,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                                                    "short_factor": [1.0, 1.3], "long_factor": [2.5, 7.0]})),
}


def hf_model(case: str):
    name, overrides = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**(TINY | overrides))
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():  # biases and q/k norms start at 0 / 1: make them matter
        for key, p in model.named_parameters():
            if key.endswith("bias") or "_norm" in key:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens, np.int64))).logits.float().numpy()


def toks(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 101, shape).astype(np.int32)


forward = jax.jit(lambda m, x: m(x))
step = jax.jit(lambda m, x, c: m(x, cache=c))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_in_memory_and_from_a_directory(case, tmp_path):
    hf = hf_model(case)
    model = families.from_hf(hf)
    t = toks((2, 30))  # past the window of 8
    ref = hf_logits(hf, t)
    np.testing.assert_allclose(forward(model, t), ref, **F32_MODULE)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    loaded = convert.from_pretrained_dir(tmp_path)
    assert loaded.cfg == model.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), nnx.state(loaded), nnx.state(model))
    np.testing.assert_allclose(forward(loaded, t), ref, **F32_MODULE)
    if case == "phi3-longrope":  # 12 positions: HF switches to the short factors
        assert model.cfg.rope.rope_type == "longrope" and model.cfg.rope.partial_rotary_factor == 0.5
        np.testing.assert_allclose(forward(model, t[:, :12]), hf_logits(hf, t[:, :12]), **F32_MODULE)


def test_mistral_ring_cache_decoding_matches_hf_past_the_window():
    """Prefill 5, a 12-token chunk (longer than the window), then one token at a time up to 34: teacher-forced
    logits equal HF's full forward, with a cache of 8 slots per layer (memory O(window))."""
    hf = hf_model("mistral")
    model = families.from_hf(hf)
    t = toks((2, 34), seed=2)
    cache = model.init_cache(2, 34)
    assert all(isinstance(c, RingKVCache) and c.k_BSKP.shape[1] == WINDOW for c in cache.layers)
    outs = []
    for lo, hi in [(0, 5), (5, 17)] + [(i, i + 1) for i in range(17, 34)]:
        logits, cache = step(model, t[:, lo:hi], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), hf_logits(hf, t), **F32_MODULE)
    assert all(isinstance(c, KVCache) for c in model.init_cache(2, WINDOW).layers)  # the window fits: a plain cache


@pytest.mark.parametrize("case, new", [("mistral", 30), ("qwen2", 6), ("qwen3", 6), ("phi3", 12)])
def test_greedy_generate_matches_hf(case, new):
    hf = hf_model(case)
    model = families.from_hf(hf)
    prompt = toks((2, 6), seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt.astype(np.int64)), max_new_tokens=new, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones(prompt.shape, dtype=torch.long))  # fmt: skip
    np.testing.assert_array_equal(lm_lib.generate(model, prompt, max_new_tokens=new), ref[:, 6:].numpy())


@pytest.mark.parametrize("case", ["mistral", "qwen2-sliding", "qwen3", "phi3-longrope"])
def test_export_round_trip_is_exact(case):
    hf = hf_model(case)
    model = families.from_hf(hf)
    model_type = hf.config.model_type
    exported = families.to_state_dict(model, model_type)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(exported) == set(ref)
    for k in ref:
        np.testing.assert_allclose(exported[k], ref[k], **EXACT)
    name = CASES[case][0]
    ids = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # Phi3Config's default pad id is 32000
    hf2 = getattr(transformers, f"{name}ForCausalLM")(
        getattr(transformers, f"{name}Config")(**families.config_to_hf(model.cfg, model_type), **ids)
    ).eval()  # fmt: skip
    hf2.set_attn_implementation("eager")
    hf2.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()})
    assert families.config_from_hf(hf2.config) == model.cfg
    t = toks((1, 20), seed=4)
    np.testing.assert_allclose(hf_logits(hf2, t), hf_logits(hf, t), **EXACT)


# ---- config.json: v4 and v5 spellings, and the configs lcjax refuses -------------------------------------------
V4_EXTRA = {  # keys a transformers 4.x config.json of the family carries
    "mistral": dict(sliding_window=4096, rope_theta=1e6, head_dim=None),
    "qwen2": dict(use_sliding_window=False, sliding_window=131072, max_window_layers=21, rope_theta=1e6,
                  rope_scaling=None),
    "qwen3": dict(use_sliding_window=False, sliding_window=None, max_window_layers=28, rope_theta=1e6, head_dim=12,
                  attention_bias=False, rope_scaling=None),
    "phi3": dict(sliding_window=2047, original_max_position_embeddings=64, rope_theta=1e6, rope_scaling=None,
                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
}  # fmt: skip


def _v4_config(model_type: str) -> dict:
    base = {k: v for k, v in TINY.items() if k != "rope_parameters"}
    return base | V4_EXTRA[model_type] | dict(model_type=model_type, hidden_act="silu", torch_dtype="bfloat16",
                                              transformers_version="4.44.0", use_cache=True)  # fmt: skip


@pytest.mark.parametrize("model_type", list(V4_EXTRA))
def test_v4_and_v5_config_json_agree_with_transformers(model_type):
    """A 4.x config.json (top-level rope_theta) and transformers 5.23's own re-save of it give one LMConfig."""
    v4 = _v4_config(model_type)
    name = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3"}[model_type]
    v5 = getattr(transformers, f"{name}Config").from_dict(v4).to_dict()
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    ours = families.config_from_hf(v4)
    assert ours == families.config_from_hf(v5)
    assert ours.rope.theta == 1e6
    window = {"mistral": 4096, "qwen2": None, "qwen3": None, "phi3": 2047}[model_type]
    assert ours.window == window


def test_phi3_v4_su_rope_is_longrope_as_transformers_reads_it():
    v4 = _v4_config("phi3") | dict(original_max_position_embeddings=16, rope_scaling={
        "type": "su", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0],
        "original_max_position_embeddings": 16})  # fmt: skip (transformers 5.23 requires it in the dict too)
    v5 = transformers.Phi3Config.from_dict(v4).to_dict()
    assert v5["rope_parameters"]["rope_type"] == "longrope"
    ours = families.config_from_hf(v4)
    assert ours == families.config_from_hf(v5)
    assert ours.rope.rope_type == "longrope" and ours.rope.original_max_position_embeddings == 16


@pytest.mark.parametrize(
    "model_type, change, match",
    [
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
         r"layer_types: per-layer sliding windows are not supported .* 1 sliding and 1 full layers"),
        ("qwen2", dict(layer_types=["full_attention"]), r"layer_types=\['full_attention'\] must list one entry per"),
        ("qwen3", dict(layer_types=["sliding_attention"] * 2, use_sliding_window=False),
         r"layer_types has 'sliding_attention' layers but use_sliding_window=False"),
        ("qwen3", dict(layer_types=["chunked_attention"] * 2), r"layer_types: \['chunked_attention'\]"),
        ("mistral", dict(attention_bias=True), r"attention_bias=True \(a key lcjax's Mistral loader does not know"),
        ("mistral", dict(attention_dropout=0.1), r"attention_dropout=0.1 \(allowed: 0.0, None"),
        ("phi3", dict(resid_pdrop=0.1), r"resid_pdrop=0.1 \(allowed: 0.0, None"),
        ("phi3", dict(hidden_act="gelu"), r"hidden_act='gelu' \(allowed: 'silu'"),
        ("qwen3", dict(quantization_config={"quant_method": "awq"}), "quantization_config=.*does not know"),
        ("qwen2", dict(use_sliding_window="yes"), "hf_config.use_sliding_window must be a bool"),
        ("mistral", dict(rope_scaling={"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
         r"partial_rotary_factor=0.5 is not implemented for model_type='mistral'"),
        ("qwen2", dict(rope_scaling={"type": "mrope", "mrope_section": [1, 1]}), r"rope_type='mrope' is not impl"),
    ],
)  # fmt: skip
def test_bad_configs_raise_naming_the_key(model_type, change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        families.config_from_hf(_v4_config(model_type) | change)


def test_dispatcher_picks_the_family_and_names_bad_model_types(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path / "llama")
    model = convert.from_pretrained_dir(tmp_path / "llama")
    assert model.cfg.window is None and model.cfg.attention.qkv_bias is False
    for name, config in [("gpt2", {"model_type": "gpt2"}), ("none", {"hidden_size": 8})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type='gpt2' is not supported \(supported: "
                                         r"'llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'mamba2'"):  # fmt: skip
        convert.from_pretrained_dir(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"none/config.json: model_type is missing"):
        convert.from_pretrained_dir(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"from_pretrained_dir: checkpoint directory .*nope' does not exist"):
        convert.from_pretrained_dir(tmp_path / "nope")


def test_export_refuses_what_the_family_cannot_express():
    cfg = families.config_from_hf(_v4_config("qwen2"))
    with pytest.raises(ValueError, match=r"qkv_bias=True, o_bias=False, qk_norm=False has no Mistral equivalent"):
        families.config_to_hf(cfg, "mistral")
    with pytest.raises(ValueError, match=r"qkv_bias=True, o_bias=False, qk_norm=False has no Llama equivalent"):
        convert.llama.config_to_hf(cfg)
