"""Byte-level text: tokenizer, file and TFDS document sources, packed text pipelines, bits per byte."""

import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lcjax.data import (
    ByteTokenizer,
    TextFileSource,
    TfdsTextSource,
    bits_per_byte,
    count_bytes,
    packed_text_dataset,
    packed_text_eval_dataset,
)

tfds.disable_progress_bar()
TOK = ByteTokenizer()
ONE = dict(process_index=0, process_count=1)


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "sky", "is", "blue", "naïve", "café", "—", "λx.x", "\n"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


def _documents_from_rows(batches):
    """Rebuild the documents from packed rows: join segment pieces, split at EOS targets."""
    docs, current = [], []
    for batch in batches:
        for b in range(batch["inputs"].shape[0]):
            seg, tgt = batch["segment_ids"][b], batch["targets"][b]
            for s in range(1, int(seg.max(initial=0)) + 1):
                for t in tgt[seg == s]:
                    if t == TOK.EOS:
                        docs.append(TOK.decode(current))
                        current = []
                    else:
                        current.append(int(t))
    assert not current
    return docs


def test_tokenizer():
    ids = TOK.encode("héllo")
    assert ids.dtype == np.int32 and ids[0] == TOK.BOS and ids[-1] == TOK.EOS
    assert ids[1:-1].tolist() == list("héllo".encode()) and TOK.decode(ids) == "héllo"
    assert TOK.encode(b"ab", add_bos=False, add_eos=False).tolist() == [97, 98]
    assert TOK.vocab_size == 259 and {TOK.PAD, TOK.BOS, TOK.EOS} == {256, 257, 258}
    assert TOK.decode([104, 105, TOK.PAD, TOK.EOS]) == "hi"
    with pytest.raises(ValueError, match="ids"):
        TOK.decode([300])
    with pytest.raises((ValueError, TypeError), match="text"):  # TypeError: the suite's beartype hook fires first
        TOK.encode(3)


def test_text_file_source(tmp_path):
    texts = _texts(5)
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    src = TextFileSource(str(tmp_path / "*.txt"))
    assert len(src) == 5 and [src[i].decode() for i in range(5)] == texts
    assert len(TextFileSource([tmp_path / "0.txt", tmp_path / "3.txt"])) == 2
    (tmp_path / "joined.md").write_text("a b\n\n\nc\n\n\n\n\n\nd", encoding="utf-8")
    parts = TextFileSource(tmp_path / "joined.md", separator="\n\n\n")
    assert [parts[i] for i in range(len(parts))] == [b"a b", b"c", b"d"]
    with pytest.raises(ValueError, match="paths"):
        TextFileSource(str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="paths"):
        TextFileSource([])
    with pytest.raises(IndexError):
        src[5]


def test_every_byte_is_trained_on_once_per_epoch(tmp_path):
    texts = _texts(9, seed=1)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    docs = TextFileSource(tmp_path / "*.txt")
    # global batch 1: nothing is dropped at the end of the epoch, so the epoch must reproduce every document
    train = packed_text_dataset(docs, seq_len=16, global_batch_size=1, shuffle=True, seed=3, num_epochs=1, **ONE)
    assert sorted(_documents_from_rows(train)) == sorted(texts)
    evald = packed_text_eval_dataset(docs, seq_len=16, global_batch_size=4, **ONE)
    assert _documents_from_rows(evald) == [docs[i].decode() for i in range(len(docs))]  # in order


def test_text_pipeline_shards_documents_across_processes(tmp_path):
    texts = _texts(10, seed=2)
    docs = [t.encode() for t in texts]
    seen = []
    for p in range(2):
        ds = packed_text_dataset(
            docs, seq_len=24, global_batch_size=2, shuffle=True, seed=0, num_epochs=1, process_index=p,
            process_count=2,
        )
        seen.append(_documents_from_rows(ds))
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(texts)
    # eval: processes stay in step (same number of batches) and together cover every row once
    per_process = [list(packed_text_eval_dataset(docs, seq_len=24, global_batch_size=4, process_index=p,
                                                 process_count=2)) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1])
    merged = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*per_process)]
    assert _documents_from_rows(merged) == texts


class FakePg19(tfds.core.GeneratorBasedBuilder):
    """A local stand-in with PG-19's features (the real builder reads gs://deepmind-gutenberg through tf.io)."""

    VERSION = tfds.core.Version("0.1.1")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"book_text": tfds.features.Text(), "book_id": np.int32, "book_title": np.str_}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 6), "validation": self._generate_examples(100, 3)}

    def _generate_examples(self, start, n):
        for i, text in enumerate(_texts(n, seed=start)):
            yield start + i, {"book_text": text, "book_id": start + i, "book_title": f"book {start + i}"}


def test_tfds_text_source_feeds_the_pipeline(tmp_path):
    FakePg19(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = TfdsTextSource("fake_pg19", split="validation", data_dir=str(tmp_path), text_key="book_text")
    assert len(src) == 3 and all(isinstance(src[i], bytes) for i in range(3))
    assert sorted(src[i].decode() for i in range(3)) == sorted(_texts(3, seed=100))
    evald = packed_text_eval_dataset(src, seq_len=32, global_batch_size=2, **ONE)
    assert _documents_from_rows(evald) == [src[i].decode() for i in range(3)]
    assert len(TfdsTextSource("fake_pg19", split="train[:2]", data_dir=str(tmp_path), text_key="book_text")) == 2
    with pytest.raises(ValueError, match="text_key"):
        TfdsTextSource("fake_pg19", split="train", data_dir=str(tmp_path), text_key="text")


def test_bits_per_byte():
    assert bits_per_byte(math.log(256.0)) == pytest.approx(8.0, rel=1e-12)  # uniform over bytes = 8 bits
    assert bits_per_byte(math.log(2.0), tokens_per_byte=1.5) == pytest.approx(1.5, rel=1e-12)
    targets = np.array([[104, 105, TOK.EOS, TOK.PAD]])
    mask = np.array([[True, True, True, False]])
    assert count_bytes(targets, mask) == 2
    with pytest.raises(ValueError, match="mean_nll_nats"):
        bits_per_byte(float("nan"))
    with pytest.raises(ValueError, match="tokens_per_byte"):
        bits_per_byte(1.0, tokens_per_byte=0.0)


def test_text_pipeline_checks():
    docs = [b"abc", b"def"]
    with pytest.raises(ValueError, match="seq_len"):
        packed_text_dataset(docs, seq_len=0, global_batch_size=2, **ONE)
    with pytest.raises(ValueError, match="global_batch_size"):
        packed_text_dataset(docs, seq_len=8, global_batch_size=3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        packed_text_dataset(docs, seq_len=8, global_batch_size=4, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="documents"):
        packed_text_eval_dataset([b""], seq_len=8, global_batch_size=1, tokenizer=_NoSpecials(), **ONE)


class _NoSpecials(ByteTokenizer):
    def encode(self, text, *, add_bos=False, add_eos=False):
        return super().encode(text, add_bos=False, add_eos=False)


class _OutOfVocab(ByteTokenizer):
    def encode(self, text, *, add_bos=True, add_eos=True):
        return np.append(super().encode(text), self.vocab_size)  # one id past the vocabulary


def test_tokenizer_output_is_checked_against_its_vocab():
    docs = [b"abc", b"def"]
    match = r"_OutOfVocab.encode: token ids must be in \[0, vocab_size=259\)"
    with pytest.raises(ValueError, match=match):
        next(iter(packed_text_dataset(docs, seq_len=8, global_batch_size=1, tokenizer=_OutOfVocab(), **ONE)))
    with pytest.raises(ValueError, match=match):
        packed_text_eval_dataset(docs, seq_len=8, global_batch_size=1, tokenizer=_OutOfVocab(), **ONE)
    with pytest.raises(TypeError, match="packed_text_dataset: seq_len must be an int"):  # a bool is not an int
        packed_text_dataset(docs, seq_len=True, global_batch_size=1, **ONE)
