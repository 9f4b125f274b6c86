"""Byte-level text: the tokenizer, document sources (local files, prepared TFDS text datasets) and bits per byte.

``ByteTokenizer``: ids 0..255 are the UTF-8 bytes, then ``PAD = 256``, ``BOS = 257``, ``EOS = 258``
(``vocab_size = 259``; a model may round its embedding table up, ids above 258 never occur). A document encodes to
``[BOS, b1 .. bn, EOS]``, so a model trained on it predicts every byte from BOS on, and the document's end.

Document sources are random-access sequences of ``bytes`` (one element per document) that ``pipeline.py`` packs:

- ``TextFileSource(paths_or_glob)``: one document per file, or per ``separator``-delimited part of each file.
- ``TfdsTextSource(name, split=..., data_dir=...)``: a TFDS dataset that the user prepared locally (e.g. ``pg19``,
  text in ``book_text``), read with ``tfds.data_source``, so only the prepared files are needed, no TensorFlow and
  no download. PG-19's builder itself reads ``gs://deepmind-gutenberg`` through ``tf.io.gfile`` while preparing.

Bits per byte (comparable across tokenizers, unlike token perplexity): ``Σ NLL (nats) / (ln 2 · #bytes)``. With this
tokenizer each document adds one EOS prediction to its n byte predictions, so ``tokens_per_byte = (n + 1) / n``.
"""

from __future__ import annotations

import glob as globlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import SupportsIndex

import numpy as np

from lcjax.checks import check_token_ids, require, require_float
from lcjax.typing import Bool, Int


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes 0..255 plus ``PAD = 256``, ``BOS = 257``, ``EOS = 258``."""

    PAD = 256
    BOS = 257
    EOS = 258
    vocab_size = 259
    # The lcjax.data.tokenizers.Tokenizer interface (shared with HFTokenizer).
    bos_id = property(lambda self: self.BOS)
    eos_id = property(lambda self: self.EOS)
    pad_id = property(lambda self: self.PAD)

    def encode(self, text: str | bytes, *, add_bos: bool = True, add_eos: bool = True) -> Int[np.ndarray, "L"]:
        """``[BOS] + UTF-8 bytes + [EOS]`` as int32 (``str`` is UTF-8 encoded, ``bytes`` taken as they are)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray, memoryview)):
            raise TypeError(f"ByteTokenizer.encode: text must be str or bytes, got {type(text).__name__}")
        body = np.frombuffer(bytes(text), np.uint8).astype(np.int32)
        parts = [np.array([self.BOS], np.int32)] * add_bos + [body] + [np.array([self.EOS], np.int32)] * add_eos
        return np.concatenate(parts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of the byte ids in ``ids`` (special ids dropped; invalid UTF-8 becomes U+FFFD)."""
        ids = np.asarray(ids)
        require(ids.ndim == 1, f"ByteTokenizer.decode: ids must be 1-D, got shape {ids.shape}")
        check_token_ids("ByteTokenizer.decode: ids", ids, self.vocab_size)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not patterns:
        raise ValueError("paths is empty: give files or glob patterns")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(globlib.glob(pattern, recursive=True)) if globlib.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"paths: {pattern!r} matches no file")
        files.extend(matches)
    return files


class TextFileSource:
    """Documents from local text files: one per file (sorted glob order), or one per ``separator``-delimited part.

    ``paths`` is a path, a glob (``"data/**/*.txt"``) or a list of them. Files are read lazily per document; with a
    ``separator`` (e.g. ``"\\n\\n\\n"``) each file is scanned once at construction to find its parts (empty parts
    are skipped). Elements are ``bytes``.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, separator: str | bytes | None = None):
        self.files = _expand_paths(paths)
        if isinstance(separator, str):
            separator = separator.encode("utf-8")
        if separator is not None and not separator:
            raise ValueError("separator must be None or a non-empty string")
        self.separator = separator
        # (file index, start byte, stop byte); stop = -1 reads to the end of the file.
        self._spans: list[tuple[int, int, int]] = []
        for f, path in enumerate(self.files):
            if separator is None:
                self._spans.append((f, 0, -1))
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            start = 0
            while start <= len(data):
                stop = data.find(separator, start)
                stop = len(data) if stop < 0 else stop
                if stop > start:
                    self._spans.append((f, start, stop))
                start = stop + len(separator)

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: SupportsIndex) -> bytes:
        i = int(index)
        if not 0 <= i < len(self._spans):
            raise IndexError(f"document {i} out of range [0, {len(self._spans)})")
        f, start, stop = self._spans[i]
        with open(self.files[f], "rb") as fh:
            if stop < 0:
                return fh.read()
            fh.seek(start)
            return fh.read(stop - start)

    def __repr__(self) -> str:
        return f"TextFileSource({len(self.files)} files, {len(self)} documents, separator={self.separator!r})"


class TfdsTextSource:
    """Documents from a locally prepared TFDS dataset, by name: ``record[text_key]`` as UTF-8 ``bytes``.

    ``TfdsTextSource("pg19", split="validation", data_dir="~/tensorflow_datasets", text_key="book_text")``.
    Reading needs only the prepared files (``tfds.data_source``); ``split`` accepts slicing (``"train[:100]"``).
    """

    def __init__(self, name: str, *, split: str, data_dir: str | os.PathLike | None = None, text_key: str = "text"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.text_key = name, split, text_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        features = getattr(self._source.dataset_info, "features", None)
        if features is not None and text_key not in features:
            raise ValueError(f"text_key={text_key!r} is not a feature of {name}; features: {sorted(features)}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> bytes:
        text = self._source[int(index)][self.text_key]
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)

    def __repr__(self) -> str:
        return f"TfdsTextSource({self.name!r}, split={self.split!r}, text_key={self.text_key!r}, {len(self)} documents)"


def bits_per_byte(mean_nll_nats: float, tokens_per_byte: float = 1.0) -> float:
    """Bits per byte from the mean token NLL in nats: ``mean_nll · tokens_per_byte / ln 2``.

    For an eval set, ``tokens_per_byte = #scored tokens / #scored bytes`` (``count_bytes``); with the byte tokenizer
    it is slightly above 1 because each document's EOS is scored too.
    """
    mean_nll_nats = require_float("bits_per_byte: mean_nll_nats", mean_nll_nats, min=0)
    tokens_per_byte = require_float("bits_per_byte: tokens_per_byte", tokens_per_byte, min=0, min_open=True)
    return mean_nll_nats * tokens_per_byte / math.log(2.0)


def count_bytes(targets: Int[np.ndarray, "*shape"], loss_mask: Bool[np.ndarray, "*shape"]) -> int:
    """The number of scored positions whose target is a byte (not EOS/PAD): the denominator of bits per byte."""
    return int(np.sum(np.asarray(loss_mask) & (np.asarray(targets) < 256)))
