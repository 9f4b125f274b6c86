"""The tokenizer interface (``lcjax.data.tokenizers``): the byte tokenizer and an HF ``tokenizers`` tokenizer built
from a ``tokenizer.json`` written here, round trips, and the packed text pipeline fed by either."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lcjax.data import ByteTokenizer, packed_text_eval_dataset
from lcjax.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

ONE = dict(process_index=0, process_count=1)
CORPUS = ["the sky is blue", "a naïve café — λx.x", "the quick brown fox jumps over the lazy dog"] * 3


def tiny_bpe() -> RustTokenizer:
    """A tiny byte-level BPE (GPT-2 style, exact round trip): ids 0, 1, 2 = <pad>, <s>, </s>; 300 tokens."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """``tiny_bpe`` saved as tokenizer.json, with the tokenizer_config.json naming its special tokens."""
    tok = tiny_bpe()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(  # how an HF checkpoint directory names its special tokens
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    return str(path)


def hf_tokenizer(path, **kw) -> HFTokenizer:
    return HFTokenizer.from_file(path, **kw)


def test_both_tokenizers_satisfy_the_interface(tokenizer_json):
    for tok in (ByteTokenizer(), hf_tokenizer(tokenizer_json), load_tokenizer("byte"), load_tokenizer(tokenizer_json)):
        assert isinstance(tok, Tokenizer)
        assert isinstance(tok.vocab_size, int) and 0 <= tok.pad_id < tok.vocab_size
        ids = tok.encode("the sky", add_bos=True, add_eos=True)
        assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == "the sky"
    b = ByteTokenizer()
    assert (b.bos_id, b.eos_id, b.pad_id) == (b.BOS, b.EOS, b.PAD)


def test_hf_tokenizer_round_trip(tokenizer_json):
    tok = hf_tokenizer(tokenizer_json)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 300
    for text in ["the lazy café", "unseen words: zebra ∑ 🙂", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert np.all(ids > 2)  # no special token unless asked for
    assert len(tok.encode("the sky is blue")) < len("the sky is blue")  # merges were learnt
    np.testing.assert_array_equal(tok.encode(b"the sky"), tok.encode("the sky"))
    with_defaults = hf_tokenizer(tokenizer_json, add_bos=True, add_eos=True).encode("sky")
    assert with_defaults[0] == 1 and with_defaults[-1] == 2


def test_hf_tokenizer_bad_inputs(tokenizer_json, tmp_path):
    tok = hf_tokenizer(tokenizer_json)
    with pytest.raises(ValueError, match=r"HFTokenizer.decode: ids: token ids must be in \[0, vocab_size=300\)"):
        tok.decode([5, 300])
    with pytest.raises(TypeError, match="text"):  # the test suite's type-check hook or our own check
        tok.encode(3)
    with pytest.raises(ValueError, match="HFTokenizer.encode: add_bos=True but bos_id is None"):
        HFTokenizer(RustTokenizer.from_file(tokenizer_json)).encode("sky", add_bos=True)
    with pytest.raises(ValueError, match="eos_token='<eot>' is not in the vocabulary"):
        HFTokenizer.from_file(tokenizer_json, eos_token="<eot>")
    with pytest.raises(ValueError, match="neither 'byte' nor a tokenizer.json / .gguf file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"HFTokenizer.encode: token ids must be in \[0, vocab_size=10\)"):
        HFTokenizer.from_file(tokenizer_json, vocab_size=10).encode("the sky")  # more ids than the model has rows
    with pytest.raises(ValueError, match="HFTokenizer: vocab_size=0 is out of range; allowed: >= 1"):
        HFTokenizer.from_file(tokenizer_json, vocab_size=0)


def test_text_pipeline_with_hf_tokenizer(tokenizer_json):
    tok = hf_tokenizer(tokenizer_json, add_eos=True)
    docs = ["the sky is blue", "the lazy dog", "a café"]
    rows = list(packed_text_eval_dataset(docs, seq_len=8, global_batch_size=2, tokenizer=tok, **ONE))
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    assert batch["inputs"].max() < tok.vocab_size
    np.testing.assert_array_equal(batch["inputs"][batch["segment_ids"] == 0], tok.pad_id)
    # Every document comes back from its scored targets: split at EOS, decode.
    targets = batch["targets"][batch["loss_mask"]]
    ends = np.flatnonzero(targets == tok.eos_id)
    assert len(ends) == len(docs)
    first = tok.encode(docs[0])
    assert tok.decode(np.concatenate([first[:1], targets[: ends[0]]])) == docs[0]


def test_workdir_tokenizer_choice(tokenizer_json, tmp_path):
    """``lcjax generate`` on a text run: --tokenizer, else the workdir's tokenizer.json, else bytes."""
    from lcjax.data import MQARConfig
    from lcjax.models.lm import LMConfig
    from lcjax.train.config import ExperimentConfig, SyntheticDataConfig, TextDataConfig
    from lcjax.train.workdir import TOKENIZER_FILE, workdir_tokenizer

    def run(vocab_size, data):
        return ExperimentConfig(model=LMConfig(vocab_size=vocab_size, d_model=8, n_layers=1, mlp_dim=8), data=data,
                                batch_size=1, num_steps=1)  # fmt: skip

    text = TextDataConfig(train_files="*.txt", eval_files="*.txt", seq_len=8)
    text_run = run(300, text)
    assert isinstance(workdir_tokenizer(tmp_path, text_run), ByteTokenizer)
    assert isinstance(workdir_tokenizer(tmp_path, text_run, tokenizer_json), HFTokenizer)
    (tmp_path / TOKENIZER_FILE).write_text(open(tokenizer_json).read())
    assert workdir_tokenizer(tmp_path, text_run).vocab_size == 300
    assert isinstance(workdir_tokenizer(tmp_path, text_run, "byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size=300 exceeds the model's vocab_size=259"):
        workdir_tokenizer(tmp_path, run(259, text))
    task = MQARConfig(seq_len=16, num_kv_pairs=2, vocab_size=32)
    task_run = run(32, SyntheticDataConfig(task=task))
    assert workdir_tokenizer(tmp_path, task_run) is None
    with pytest.raises(ValueError, match="is a synthetic-task run"):
        workdir_tokenizer(tmp_path, task_run, "byte")
