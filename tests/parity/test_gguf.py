"""``lcjax.convert.gguf`` on tiny GGUF files written here with ``gguf.GGUFWriter`` from tiny random HF Llamas.

The writer does what llama.cpp's converter (``convert_hf_to_gguf.py``) does for Llama: metadata under ``llama.*``,
GGUF tensor names, and the Q/K rows of each head reordered from HF's rotate-half layout to llama.cpp's adjacent
pairs. The forward permutation is written here from the math (the loader holds the inverse), so a loader that
forgot to undo it, or undid the wrong one, fails the logits comparison.
"""

import json

import gguf
import jax
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests

from lcjax import cli
from lcjax.convert import gguf as gguf_convert
from lcjax.data.tokenizers import HFTokenizer
from tests.data.test_tokenizers import tiny_bpe
from tests.parity.test_llama_torch import hf_llama, hf_logits, toks
from tests.tolerances import F32_MODULE

pytestmark = pytest.mark.torch


def to_llama_cpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF Q/K rows (head, half j, pair i) -> llama.cpp rows (head, pair i, half j)."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, *, meta=None, drop=(), tensor_types=None, tokenizer=None) -> str:
    """A GGUF file of ``hf`` (F32 tensors unless ``tensor_types`` names a quantization per GGUF tensor name), with
    ``tokenizer`` (a byte-level BPE ``tokenizers.Tokenizer``) stored as llama.cpp stores a GPT-2 tokenizer."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    if tokenizer is not None:
        bpe = json.loads(tokenizer.to_str())["model"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
        w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(bpe["vocab"]) - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
    kv = {"llama.block_count": c.num_hidden_layers, "llama.context_length": c.max_position_embeddings,
          "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
          "llama.attention.head_count": c.num_attention_heads, "llama.attention.head_count_kv": c.num_key_value_heads,
          "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]),
          "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "llama.vocab_size": c.vocab_size,
          "llama.rope.dimension_count": c.head_dim}  # fmt: skip
    for key, value in (kv | (meta or {})).items():
        add = w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32
        add(key, value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if key in names:
            name = names[key]
        else:
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{layer[module]}.{kind}"
            if module == "self_attn.q_proj":
                a = to_llama_cpp_rows(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = to_llama_cpp_rows(a, c.num_key_value_heads)
        if name in drop:
            continue
        qtype = (tensor_types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


TIED_MQA = dict(num_key_value_heads=1, tie_word_embeddings=True)


@pytest.mark.parametrize("overrides", [{}, TIED_MQA], ids=["gqa", "mqa-tied"])
def test_gguf_logits_match_hf(tmp_path, overrides):
    hf = hf_llama(**overrides)
    path = write_gguf(tmp_path / "tiny.gguf", hf)
    cfg = gguf_convert.gguf_config(path)
    shape = (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size)
    assert shape == (2, 4, hf.config.num_key_value_heads, 8, 101)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    model = gguf_convert.llama_from_gguf(path)
    t = toks((2, 19))
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, t), hf_logits(hf, t), **F32_MODULE)


def test_gguf_qk_permutation_round_trips():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(gguf_convert.unpermute_qk(to_llama_cpp_rows(w, 4), 4), w)
    assert not np.array_equal(to_llama_cpp_rows(w, 4), w)


def test_gguf_quantized_tensor_is_dequantized(tmp_path):
    hf = hf_llama()
    path = write_gguf(tmp_path / "q8.gguf", hf, tensor_types={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0})
    model = gguf_convert.llama_from_gguf(path)
    up = hf.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    q8 = gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.dequantize(gguf.quants.quantize(up, q8), q8)
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.up_proj[...]), want.T)
    assert not np.array_equal(want, up)  # the file really was quantized


@pytest.mark.parametrize(
    "meta, drop, match",
    [
        ({"llama.expert_count": 4}, (), "llama.expert_count"),
        ({"llama.rope.scaling.type": "yarn"}, (), "llama.rope.scaling.type='yarn'"),
        ({"llama.attention.sliding_window": 16}, (), "llama.attention.sliding_window"),
        ({"llama.rope.dimension_count": 4}, (), "llama.rope.dimension_count=4"),
        ({}, ("blk.1.ffn_up.weight",), "missing keys"),
    ],
    ids=["experts", "yarn", "sliding-window", "partial-rope", "missing-tensor"],
)
def test_gguf_bad_metadata_raises(tmp_path, meta, drop, match):
    hf = hf_llama()
    path = write_gguf(tmp_path / "bad.gguf", hf, meta=meta, drop=drop)
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace(".", r"\.")):
        gguf_convert.llama_from_gguf(path)


def test_gguf_other_architecture_and_non_gguf_raise(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='mamba' is not supported"):
        gguf_convert.gguf_config(tmp_path / "m.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        gguf_convert.gguf_config(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="is not a file"):
        gguf_convert.llama_from_gguf(tmp_path / "absent.gguf")


def test_gguf_tokenizer_and_cli_generate_match_hf(tmp_path, capsys):
    """The file's tokenizer (rebuilt from its metadata) equals the one written; ``lcjax generate --gguf`` prints the
    decoded greedy continuation HF computes."""
    bpe = tiny_bpe()
    hf = hf_llama(vocab_size=300)
    path = write_gguf(tmp_path / "tok.gguf", hf, tokenizer=bpe)
    tok = HFTokenizer.from_gguf(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (300, 1, 2, 0, False)
    text = "the lazy café 🙂"
    assert tok.encode(text).tolist() == bpe.encode(text).ids and tok.decode(tok.encode(text)) == text
    prompt = tok.encode("the sky is")
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt[None].astype(np.int64)), max_new_tokens=5, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))  # fmt: skip
    assert cli.main(["generate", "--gguf", path, "--prompt", "the sky is", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out == tok.decode(ref[0, len(prompt):].numpy()) + "\n"
    assert cli.main(["generate", "--gguf", path, "--prompt", "x", "--tokenizer", "byte"]) == 2
    assert "--tokenizer: a GGUF file brings its own tokenizer" in capsys.readouterr().err
