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
from lcjax.convert.hf_config import rope_from_hf  # noqa: E402
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
    inv, ours_scale = rope_ops.rope_frequencies(16, rope_from_hf({"rope_parameters": params}))
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert ours_scale == scale


def test_unsupported_hf_configs_raise():
    with pytest.raises(ValueError, match="hidden_act"):
        convert.config_from_hf(dict(hf_llama().config.to_dict(), hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type"):
        convert.config_from_hf(dict(hf_llama().config.to_dict(), rope_parameters={"rope_type": "mrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="missing keys"):
        convert.llama_from_state_dict({}, convert.config_from_hf(hf_llama().config))


# ---- config keys and checkpoint directories: every bad input names what is wrong --------------------------------
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _write_dir(path, config: dict, weights: dict | None = None):
    """A checkpoint directory: ``config`` as config.json, tiny Llama weights as model.safetensors."""
    import json

    from safetensors.numpy import save_file

    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights is None:
        weights = {k: v.numpy() for k, v in hf_llama().state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    return path


def test_other_families_raise_naming_the_key(tmp_path):
    from transformers import MistralConfig, Qwen2Config

    mistral = _write_dir(tmp_path / "mistral", MistralConfig(**TINY, sliding_window=16).to_dict())
    with pytest.raises(ValueError, match=r"mistral/config.json: .*model_type='mistral' is not supported "
                                         r"\(supported: 'llama'\); sliding_window=16 \(allowed: None"):
        convert.llama_from_pretrained_dir(mistral)
    qwen = _write_dir(tmp_path / "qwen", Qwen2Config(**TINY).to_dict())
    with pytest.raises(ValueError, match=r"model_type='qwen2' is not supported \(supported: 'llama'\)"):
        convert.llama_from_pretrained_dir(str(qwen))
    no_type = {k: v for k, v in LlamaConfig(**TINY).to_dict().items() if k != "model_type"}
    with pytest.raises(ValueError, match=r"model_type is missing \(supported: 'llama'\)"):
        convert.config_from_hf(no_type)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(sliding_window=8), r"sliding_window=8 \(allowed: None"),  # Mistral's key under model_type llama
        (dict(attention_dropout=0.1), r"attention_dropout=0.1 \(allowed: 0.0, None"),
        (dict(quantization_config={"quant_method": "gptq"}), r"quantization_config=.*does not know"),
        (dict(auto_map={"AutoModel": "x.Y"}), "auto_map"),
        (dict(pruned_heads={"0": [1]}), "pruned_heads"),
        (dict(tie_word_embeddings="no"), "hf_config.tie_word_embeddings must be a bool"),
        (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}),
         r"rope_type='proportional' is not implemented"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}), "factor"),
        (dict(vocab_size=True), "LMConfig.vocab_size must be an int, got True"),
    ],
)
def test_unimplemented_config_keys_raise(change, match):
    config = LlamaConfig(**TINY).to_dict() | change
    with pytest.raises((ValueError, TypeError), match=match):
        convert.config_from_hf(config)


def test_missing_required_fields_raise():
    with pytest.raises(ValueError, match=r"missing required Llama fields \['intermediate_size'\]"):
        convert.config_from_hf({k: v for k, v in LlamaConfig(**TINY).to_dict().items() if k != "intermediate_size"})


@pytest.mark.parametrize("legacy", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    {"rope_scaling": None, "rope_theta": 123.0},
])  # fmt: skip
def test_legacy_rope_keys_are_read_as_transformers_reads_them(legacy):
    """4.x config.json files carry rope_theta / rope_scaling; the result equals transformers' own standardisation."""
    config = {k: v for k, v in LlamaConfig(**TINY).to_dict().items() if k != "rope_parameters"} | legacy
    want = rope_from_hf({"rope_parameters": LlamaConfig.from_dict(config).rope_parameters})
    assert convert.config_from_hf(config).rope == want


def test_harmless_keys_load():
    """pretraining_tp only slices the matmuls (transformers 5.23 ignores it); generation defaults, dtype, ids."""
    base = convert.config_from_hf(LlamaConfig(**TINY))
    extra = dict(pretraining_tp=2, torch_dtype="bfloat16", temperature=0.7, pad_token_id=0, use_cache=False)
    assert convert.config_from_hf(LlamaConfig(**TINY).to_dict() | extra) == base


def test_checkpoint_directory_errors_name_the_file(tmp_path):
    from safetensors.numpy import save_file

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"llama_from_pretrained_dir: checkpoint directory .*nope' does not "
                                                r"exist"):  # fmt: skip
        convert.llama_from_pretrained_dir(missing)
    good = _write_dir(tmp_path / "good", LlamaConfig(**TINY).to_dict())
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        convert.llama_from_pretrained_dir(good / "config.json")
    (good / "config.json").rename(good / "other.json")
    with pytest.raises(FileNotFoundError, match=r"good/config.json' does not exist"):
        convert.llama_from_pretrained_dir(good)
    (good / "other.json").write_text("{not json")
    (good / "other.json").rename(good / "config.json")
    with pytest.raises(ValueError, match=r"good/config.json' is not valid JSON"):
        convert.llama_from_pretrained_dir(good)

    corrupt = _write_dir(tmp_path / "corrupt", LlamaConfig(**TINY).to_dict())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"cannot read '.*corrupt/model.safetensors' \(corrupt or truncated"):
        convert.llama_from_pretrained_dir(corrupt)
    data = (good / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn download
    with pytest.raises(ValueError, match=r"cannot read '.*corrupt/model.safetensors'"):
        convert.llama_from_pretrained_dir(corrupt)

    sharded = _write_dir(tmp_path / "sharded", LlamaConfig(**TINY).to_dict(), {"lm_head.weight": np.zeros((101, 32))})
    save_file({"lm_head.weight": np.zeros((101, 32))}, str(sharded / "model-2.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' is stored in both"):
        convert.llama_from_pretrained_dir(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-3-of-3.safetensors"}}')
    with pytest.raises(ValueError, match=r"lists shards that are not in .*\['model-3-of-3.safetensors'\]"):
        convert.llama_from_pretrained_dir(sharded)


def test_windowed_model_does_not_export_as_llama():
    import dataclasses

    cfg = dataclasses.replace(convert.config_from_hf(LlamaConfig(**TINY)), window=8)
    with pytest.raises(ValueError, match="cfg.window=8 has no Llama equivalent"):
        convert.config_to_hf(cfg)
