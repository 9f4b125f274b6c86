"""RoPE parity with transformers 5.23: every rope_type x head_dim x partial_rotary_factor, below and beyond
``original_max_position_embeddings`` (and across the dynamic-NTK threshold / LongRoPE's short-long switch); the
config reader on v4 and v5 spellings; tiny ``LlamaForCausalLM`` logits beyond the original context."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

from lcjax.convert import llama as convert
from lcjax.convert.hf_config import rope_from_hf
from lcjax.ops import rope as rope_ops
from tests.tolerances import F32_MODULE, F32_OP, F32_ULP

pytestmark = pytest.mark.torch

L0 = 32  # original_max_position_embeddings (dynamic: max_position_embeddings), small so the tests are cheap


def rope_params(rope_type, R):
    """v5 ``rope_parameters`` of each type (R = rotated dims); yarn also in its DeepSeek / untruncated variants."""
    half = R // 2
    return {
        "default": {"rope_type": "default", "rope_theta": 10_000.0},
        "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 4.0},
        "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": L0},
        "yarn_deepseek": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "mscale": 0.707,
                          "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2,
                          "original_max_position_embeddings": L0},
        "yarn_untruncated": {"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 8.0, "truncate": False,
                             "attention_factor": 1.3, "original_max_position_embeddings": L0},
        "longrope": {"rope_type": "longrope", "rope_theta": 10_000.0, "original_max_position_embeddings": L0,
                     "short_factor": [1.0 + 0.05 * i for i in range(half)],
                     "long_factor": [1.0 + 0.5 * i for i in range(half)]},
        "llama3": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": L0},
    }[rope_type]  # fmt: skip


CASES = ["default", "linear", "dynamic", "yarn", "yarn_deepseek", "yarn_untruncated", "longrope", "llama3"]
LENGTHS = {"dynamic": (L0, L0 + 1, 50), "longrope": (L0, L0 + 1, 50)}  # the switch happens past L0


def hf_config(rope_type, head_dim, partial):
    params = rope_params(rope_type, int(head_dim * partial)) | {"partial_rotary_factor": partial}
    max_pos = L0 if rope_type == "dynamic" else 4 * L0  # dynamic's threshold is max_position_embeddings
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=params)  # fmt: skip


def hf_rotate(config, q, k, L):
    """HF's cos/sin (a fresh module: HF keeps dynamic/longrope frequencies as state) and rotated q, k."""
    rot = Phi3RotaryEmbedding(config)  # Llama's rotary embedding, plus partial rotary for the default type
    pos = torch.arange(L)[None]
    with torch.no_grad():
        cos, sin = rot(torch.as_tensor(q), pos)
        q2, k2 = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(k), cos, sin)
    return rot, q2.numpy(), k2.numpy()


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("case", CASES)
def test_rope_matches_hf(case, head_dim, partial):
    config = hf_config(case, head_dim, partial)
    cfg = rope_from_hf(config.to_dict())
    worst = 0.0
    for L in LENGTHS.get(case, (20, 50)):
        rng = np.random.default_rng(L)
        q, k = (rng.standard_normal((1, 2, L, head_dim)).astype(np.float32) for _ in range(2))  # HF [B, H, L, P]
        rot, q_ref, k_ref = hf_rotate(config, q, k, L)
        inv, scale = rope_ops.rope_frequencies(head_dim, cfg, seq_len=L)
        np.testing.assert_allclose(inv, rot.inv_freq.numpy(), **F32_ULP)
        assert scale == pytest.approx(rot.attention_scaling, rel=1e-12)
        positions = np.arange(L, dtype=np.int32)[None]
        for x, ref in ((q, q_ref), (k, k_ref)):
            ours = np.asarray(rope_ops.rope(jnp.asarray(x.transpose(0, 2, 1, 3)), jnp.asarray(positions), cfg,
                                            head_dim=head_dim))
            np.testing.assert_allclose(ours.transpose(0, 2, 1, 3), ref, **F32_OP)
            worst = max(worst, float(np.max(np.abs(ours.transpose(0, 2, 1, 3) - ref))))
    print(f"rope parity {case} head_dim={head_dim} partial={partial}: max abs diff {worst:.2e}")


def test_dynamic_and_longrope_switch_on_length():
    """The schedules really change past the threshold (so the parity above crosses it)."""
    for case in ("dynamic", "longrope"):
        cfg = rope_from_hf(hf_config(case, 16, 1.0).to_dict())
        at, past = (rope_ops.rope_frequencies(16, cfg, seq_len=n)[0] for n in (L0, L0 + 1))
        assert not np.allclose(at, past), case


@pytest.mark.parametrize("case", ["yarn", "dynamic", "longrope"])
def test_llama_logits_beyond_original_context(case):
    """A tiny HF Llama with the scaled RoPE, 48 tokens > original_max_position_embeddings = 32, via llama_from_hf."""
    import jax

    torch.manual_seed(0)
    config = hf_config(case, 8, 1.0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=config.max_position_embeddings,
                         rope_parameters=rope_params(case, 8))  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    hf.set_attn_implementation("eager")
    # dynamic NTK exists to run past max_position_embeddings (its threshold), which is also LMConfig.max_seq_len
    model = convert.llama_from_hf(hf, max_seq_len=64)
    tokens = np.random.default_rng(1).integers(0, 101, (1, 48))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    print(f"llama logits {case} at 48 tokens: max abs diff {np.max(np.abs(ours - ref)):.2e}")
    np.testing.assert_allclose(ours, ref, **F32_MODULE)


# ---- the config reader: v4 / v5 spellings as transformers standardises them; bad configs raise -----------------
BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
LONG = dict(short_factor=[1.0] * 8, long_factor=[2.0] * 8)  # head_dim 64 / 4 heads = 16: 8 factors
LONG4 = dict(short_factor=[1.0] * 4, long_factor=[2.0] * 4)  # partial_rotary_factor 0.5: 4 factors


@pytest.mark.parametrize("legacy, v5", [
    (dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    (dict(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                           "original_max_position_embeddings": 32, "truncate": True})),
    (dict(rope_scaling={"type": "su", **LONG}, original_max_position_embeddings=32),
     dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0, **LONG,
                           "original_max_position_embeddings": 32})),
    (dict(model_type="phi3", partial_rotary_factor=0.5, rope_scaling={"type": "yarn", **LONG4},
          original_max_position_embeddings=64),
     dict(model_type="phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, **LONG4,
                                              "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64})),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
])  # fmt: skip
def test_rope_from_hf_v4_equals_v5(legacy, v5):
    assert rope_from_hf(BASE | legacy) == rope_from_hf(BASE | v5)


def test_rope_from_hf_fills_as_transformers():
    """yarn/longrope without factor use max_position_embeddings / original; Phi-3's top-level original wins."""
    cfg = rope_from_hf(BASE | dict(rope_parameters={"rope_type": "longrope", **LONG},
                                   original_max_position_embeddings=32))
    assert (cfg.factor, cfg.original_max_position_embeddings) == (4.0, 32)
    cfg = rope_from_hf(BASE | dict(rope_parameters={"rope_type": "yarn", "factor": None,
                                                    "original_max_position_embeddings": 16}))  # fmt: skip
    assert cfg.factor == 8.0 and cfg.attention_factor is None
    dynamic = rope_from_hf(BASE | dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert dynamic.max_position_embeddings == 128
    yarn = rope_from_hf(BASE | dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "truncate": None}))
    assert yarn.truncate is False


@pytest.mark.parametrize("config, match", [
    (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}),
     r"rope_type='proportional' is not implemented"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [1, 1]}), r"rope_type='mrope' is not implemented"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta_fast": 4}),
     r"\{'beta_fast': 4\} not implemented"),
    (dict(rope_parameters={"rope_type": "yarn"}), r"rope_type='yarn' requires \['factor'\]"),
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8}), r"requires \['long_factor'\]"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     r"RopeConfig.high_freq_factor=1.0 must be > low_freq_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.5}), r"RopeConfig.factor=0.5 is out of range"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "per-layer-type RoPE"),
    (dict(rope_parameters={"rope_type": "default"}, partial_rotary_factor=1.5), r"RopeConfig.partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "longrope", **LONG4}), r"RopeConfig.short_factor has 4 entries; rotary_dim/2 = 8"),
])  # fmt: skip
def test_rope_from_hf_bad_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        rope_from_hf(BASE | config)


@pytest.mark.parametrize("case", ["linear", "dynamic", "yarn_deepseek", "yarn_untruncated", "longrope", "llama3"])
def test_rope_exports_to_hf_and_back(case):
    """config_to_hf writes every RoPE field (dynamic's threshold as max_position_embeddings); HF reads it back."""
    hf = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     max_position_embeddings=L0 if case == "dynamic" else 4 * L0, rope_parameters=rope_params(case, 8))
    cfg = convert.config_from_hf(hf, max_seq_len=256)
    again = convert.config_from_hf(LlamaConfig(**convert.config_to_hf(cfg)).to_dict())
    assert again.rope == cfg.rope


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_cached_decode_matches_hf_generation(case):
    """Prefill 30 tokens (below L0) then decode 6 one at a time past L0 = 32 with post-RoPE cached keys: each step's
    frequencies follow its own seq_len, in HF (stateful) and in lcjax (pure), so every step's logits agree."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=L0 if case == "dynamic" else 4 * L0,
        rope_parameters=rope_params(case, 8))).eval()  # fmt: skip
    hf.set_attn_implementation("eager")
    model = convert.llama_from_hf(hf, max_seq_len=64)
    tokens = np.random.default_rng(2).integers(0, 101, (1, 36))
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens[:, :30]), use_cache=True)
        ref, past = [out.logits.numpy()], out.past_key_values
        for t in range(30, 36):
            out = hf(torch.as_tensor(tokens[:, t : t + 1]), past_key_values=past, use_cache=True)
            ref.append(out.logits.numpy())
            past = out.past_key_values
    cache = model.init_cache(1, 64)
    logits, cache = model(jnp.asarray(tokens[:, :30]), cache=cache)
    ours = [np.asarray(logits)]
    for t in range(30, 36):
        logits, cache = model(jnp.asarray(tokens[:, t : t + 1]), cache=cache)
        ours.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(ours, 1), np.concatenate(ref, 1), **F32_MODULE)


@pytest.mark.parametrize("legacy", [
    dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
    dict(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8}),
    dict(rope_scaling={"rope_type": "longrope", **LONG, "original_max_position_embeddings": 32}),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    # ("su" is left out: transformers 5.23's Phi3Config renames it only after standardising, then misses the
    # original_max_position_embeddings it needs; lcjax reads it as longrope, test_rope_from_hf_v4_equals_v5)
    dict(model_type="phi3", partial_rotary_factor=0.5, rope_scaling={"type": "yarn", "short_factor": [1.0] * 4,
                                                                     "long_factor": [2.0] * 4},
         original_max_position_embeddings=64),
])  # fmt: skip
def test_rope_from_hf_reads_4x_configs_as_transformers(legacy):
    """transformers' own standardisation of a 4.x config (LlamaConfig / Phi3Config.from_dict) reads the same."""
    from transformers import Phi3Config

    config = BASE | legacy
    hf = (Phi3Config if config["model_type"] == "phi3" else LlamaConfig).from_dict(config)
    standard = {"model_type": config["model_type"], "max_position_embeddings": hf.max_position_embeddings,
                "rope_parameters": hf.rope_parameters}  # fmt: skip
    assert rope_from_hf(config) == rope_from_hf(standard)
