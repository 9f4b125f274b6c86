"""LM parity with HF transformers ``LlamaForCausalLM`` (tiny random configs, weights copied by llama_from_hf)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests
import transformers
from flax import nnx  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lcjax.convert import llama as convert  # noqa: E402
from lcjax.models import lm as lm_lib  # noqa: E402
from lcjax.ops import rope as rope_ops  # noqa: E402
from tests.tolerances import EXACT, F32_GRAD_REL, F32_MODULE, max_rel_err  # noqa: E402

pytestmark = pytest.mark.torch

ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip


def hf_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    kw = dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**(kw | overrides))).eval()
    model.set_attn_implementation("eager")
    return model


def hf_logits(hf, tokens, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def toks(shape, seed=0, vocab=101):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA 4 heads / 2 kv heads
        dict(num_key_value_heads=1, tie_word_embeddings=True),  # MQA, tied embeddings
        dict(attention_bias=True, mlp_bias=True, head_dim=12, rope_parameters=ROPE_LLAMA3),
    ],
    ids=["gqa", "mqa-tied", "bias-headdim-llama3rope"],
)
def test_logits_match_hf(overrides):
    hf = hf_llama(**overrides)
    model = convert.llama_from_hf(hf)
    t = toks((2, 19))
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, t), hf_logits(hf, t), **F32_MODULE)


def test_packed_documents_match_hf_with_4d_mask():
    hf = hf_llama()
    model = convert.llama_from_hf(hf)
    lengths = [5, 8, 3]
    L = sum(lengths)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    t = toks((1, L), seed=1)
    allowed = (seg[0][:, None] == seg[0][None, :]) & (np.arange(L)[:, None] >= np.arange(L)[None, :])
    mask = torch.where(torch.as_tensor(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
    ref = hf_logits(hf, t, attention_mask=mask, position_ids=torch.as_tensor(pos.astype(np.int64)))
    out = jax.jit(lambda m, x, s: m(x, segment_ids_BL=s))(model, t, seg)  # positions derived from segments
    np.testing.assert_allclose(out, ref, **F32_MODULE)


def test_cached_decoding_matches_hf_full_forward():
    hf = hf_llama()
    model = convert.llama_from_hf(hf)
    t = toks((2, 14), seed=2)
    step = jax.jit(lambda m, x, c: m(x, cache=c))
    logits, cache = step(model, t[:, :9], model.init_cache(2, 16))
    outs = [logits]
    for i in range(9, 14):
        logits, cache = step(model, t[:, i : i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), hf_logits(hf, t), **F32_MODULE)


def test_greedy_generate_matches_hf():
    hf = hf_llama()
    model = convert.llama_from_hf(hf)
    prompt = toks((2, 6), seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt.astype(np.int64)), max_new_tokens=6, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones(prompt.shape, dtype=torch.long))  # fmt: skip
    np.testing.assert_array_equal(lm_lib.generate(model, prompt, max_new_tokens=6), ref[:, 6:].numpy())


def test_gradients_match_torch_autograd():
    hf = hf_llama()
    model = convert.llama_from_hf(hf)
    t = toks((2, 11), seed=4)
    targets = toks((2, 11), seed=5)
    out = hf(torch.as_tensor(t.astype(np.int64))).logits
    torch.nn.functional.cross_entropy(out.reshape(-1, 101), torch.as_tensor(targets.reshape(-1).astype(np.int64))).backward()
    ref = {k: p.grad.numpy() for k, p in hf.named_parameters()}

    from lcjax.ops.losses import token_cross_entropy

    def loss(m):
        total, n = token_cross_entropy(m(t), jnp.asarray(targets))
        return total / n

    grads = convert.llama_to_state_dict(jax.jit(jax.grad(loss))(model))
    assert set(grads) == set(ref)
    for key in ref:
        assert max_rel_err(grads[key], ref[key]) <= F32_GRAD_REL, key


def test_export_import_round_trip_is_exact():
    hf = hf_llama(tie_word_embeddings=False)
    model = convert.llama_from_hf(hf)
    exported = convert.llama_to_state_dict(model)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(exported) == set(ref)
    for k in ref:
        np.testing.assert_allclose(exported[k], ref[k], **EXACT)
    # into a fresh HF model built from the exported config, and back
    hf2 = LlamaForCausalLM(LlamaConfig(**convert.config_to_hf(model.cfg))).eval()
    hf2.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    back = convert.llama_from_hf(hf2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **EXACT), nnx.state(back), nnx.state(model))


def test_safetensors_directory_load(tmp_path):
    from safetensors.torch import save_file

    hf = hf_llama()
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = convert.llama_from_pretrained_dir(str(tmp_path))
    t = toks((1, 7), seed=6)
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, t), hf_logits(hf, t), **F32_MODULE)


@pytest.mark.parametrize("params", [{"rope_type": "default", "rope_theta": 10_000.0}, ROPE_LLAMA3,
                                    {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}])  # fmt: skip
def test_rope_frequencies_match_hf(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=params, max_position_embeddings=64)
    if params["rope_type"] == "default":
        ref, scale = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    inv, ours_scale = rope_ops.rope_frequencies(16, rope_ops.rope_config_from_hf(params))
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert ours_scale == scale


def test_unsupported_hf_configs_raise():
    with pytest.raises(ValueError, match="hidden_act"):
        convert.config_from_hf(dict(hf_llama().config.to_dict(), hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type"):
        convert.config_from_hf(dict(hf_llama().config.to_dict(), rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="missing keys"):
        convert.llama_from_state_dict({}, convert.config_from_hf(hf_llama().config))
