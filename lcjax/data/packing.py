"""Sequence packing of tokenized documents into fixed-length rows with segment ids and positions.

Rule (the same for the streaming packer and the static layout, which give identical rows for one document order):

1. A document of n tokens ``t`` gives n - 1 (input, target) pairs ``(t[j], t[j + 1])``: the shift happens inside
   the document, so no target ever crosses a document boundary.
2. Documents with more than ``seq_len`` pairs are split explicitly into pieces of ``seq_len`` pairs (pairs
   ``[k·L, (k + 1)·L)``), the last piece holding the rest; nothing is dropped. Each piece is its own segment with
   positions restarting at 0, because the model sees no earlier piece. A document with fewer than 2 tokens has no
   pair and yields nothing.
3. Pieces are placed greedily in order (next fit): a piece that does not fit into the rest of the current row closes
   the row (padded) and starts the next one.

A row is ``inputs, targets`` (int32 [L]), ``loss_mask`` (bool [L], True on every real pair), ``segment_ids`` (int32
[L], 1, 2, ... per piece, 0 on padding) and ``positions`` (int32 [L], 0 .. len-1 within each piece, 0 on padding);
padding has ``inputs = targets = pad_id``. These segment ids have lcjax's one meaning (``lcjax/ops``, every model):
a document is a run of equal positive ids, a row never reuses an id, and 0 is padding, which belongs to no document.
Attention stays inside a segment (real tokens never see padding; padding sees only padding and is never scored),
Mamba-2 starts a fresh state at every change of id, M2 treats each positive run as a document.

The streaming packer (``PackIterDataset``) is a grain ``IterDataset`` whose iterator state is the parent's state
before the document that holds the next piece, plus that piece's index: restoring re-reads one document and
continues exactly. The state is JSON, so grain's orbax handler stores it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex

import grain
import numpy as np

from lcjax.checks import check_token_ids, require, require_int, require_optional_int

Piece = tuple[int, int]  # [start, stop) over a document's (input, target) pairs
Row = dict[str, np.ndarray]


def document_pieces(num_tokens: int, seq_len: int) -> list[Piece]:
    """The pieces of a document of ``num_tokens`` tokens: ``[k·L, min((k+1)·L, num_tokens - 1))`` over its pairs."""
    num_pairs = max(num_tokens - 1, 0)
    return [(start, min(start + seq_len, num_pairs)) for start in range(0, num_pairs, seq_len)]


def build_row(pieces: Sequence[tuple[np.ndarray, int, int]], seq_len: int, pad_id: int) -> Row:
    """One packed row from ``(tokens, start, stop)`` pieces: inputs ``tokens[start:stop]``, targets shifted by one."""
    row = dict(
        inputs=np.full(seq_len, pad_id, np.int32),
        targets=np.full(seq_len, pad_id, np.int32),
        loss_mask=np.zeros(seq_len, bool),
        segment_ids=np.zeros(seq_len, np.int32),
        positions=np.zeros(seq_len, np.int32),
    )
    at = 0
    for segment, (tokens, start, stop) in enumerate(pieces, start=1):
        n = stop - start
        if at + n > seq_len:
            raise ValueError(f"pieces hold more than seq_len={seq_len} pairs")
        row["inputs"][at : at + n] = tokens[start:stop]
        row["targets"][at : at + n] = tokens[start + 1 : stop + 1]
        row["loss_mask"][at : at + n] = True
        row["segment_ids"][at : at + n] = segment
        row["positions"][at : at + n] = np.arange(n)
        at += n
    return row


def pack_layout(doc_lengths: Sequence[int], seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Rows as lists of ``(document index, start, stop)`` for documents of the given token counts (rule above)."""
    seq_len = require_int("pack_layout: seq_len", seq_len, min=1)
    rows: list[list[tuple[int, int, int]]] = []
    row: list[tuple[int, int, int]] = []
    used = 0
    for doc, n in enumerate(doc_lengths):
        for start, stop in document_pieces(int(n), seq_len):
            if used + stop - start > seq_len:
                rows.append(row)
                row, used = [], 0
            row.append((doc, start, stop))
            used += stop - start
    if row:
        rows.append(row)
    return rows


def _document(tokens: Any, vocab_size: int | None) -> np.ndarray:
    """``tokens`` as a 1-D integer array, its ids checked against ``vocab_size`` when the packer knows it."""
    tokens = np.asarray(tokens)
    require(tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer),
            f"a document must be a 1-D integer token array, got {tokens.dtype} {tokens.shape}")  # fmt: skip
    if vocab_size is not None:
        check_token_ids("packed document", tokens, vocab_size)
    return tokens


def _check_packing(caller: str, seq_len: Any, pad_id: Any, vocab_size: Any) -> tuple[int, int, int | None]:
    seq_len = require_int(f"{caller}: seq_len", seq_len, min=1)
    vocab_size = require_optional_int(f"{caller}: vocab_size", vocab_size, min=1)
    pad_id = require_int(f"{caller}: pad_id", pad_id, min=0, max=None if vocab_size is None else vocab_size - 1)
    return seq_len, pad_id, vocab_size


class PackedRows:
    """Random-access rows of a precomputed ``pack_layout`` (the eval path: every row known up front).

    ``documents[i]`` is fed through ``tokenize``; the last few tokenized documents are cached, so reading the rows
    in order tokenizes each document about once even when it spans many rows. With ``vocab_size`` every token id
    (and ``pad_id``) is checked to lie in ``[0, vocab_size)``.
    """

    def __init__(
        self,
        documents: Any,  # random access: len() and [i]
        tokenize: Callable[[Any], np.ndarray],
        *,
        seq_len: int,
        pad_id: int,
        vocab_size: int | None = None,
    ):
        seq_len, pad_id, self.vocab_size = _check_packing("PackedRows", seq_len, pad_id, vocab_size)
        self._documents, self._tokenize, self.seq_len, self.pad_id = documents, tokenize, seq_len, pad_id
        self._tokens = functools.lru_cache(maxsize=8)(self._read)
        self.layout = pack_layout([len(self._tokens(i)) for i in range(len(documents))], seq_len)

    def _read(self, doc: int) -> np.ndarray:
        return _document(self._tokenize(self._documents[doc]), self.vocab_size)

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, index: SupportsIndex) -> Row:
        i = int(index)
        if not 0 <= i < len(self.layout):
            raise IndexError(f"row {i} out of range [0, {len(self.layout)})")
        pieces = [(self._tokens(doc), start, stop) for doc, start, stop in self.layout[i]]
        return build_row(pieces, self.seq_len, self.pad_id)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, vocab_size: int | None):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._vocab_size = seq_len, pad_id, vocab_size
        self._doc: np.ndarray | None = None  # the document holding the next piece
        self._doc_state: Any = None  # the parent's state before that document was read
        self._pieces: list[Piece] = []
        self._next_piece = 0

    def _read_document(self) -> None:
        state = copy.deepcopy(self._parent.get_state())
        tokens = _document(next(self._parent), self._vocab_size)  # StopIteration propagates to the caller
        self._doc, self._doc_state = tokens, state
        self._pieces, self._next_piece = document_pieces(len(tokens), self._seq_len), 0

    def __next__(self) -> Row:
        row: list[tuple[np.ndarray, int, int]] = []
        used = 0
        while True:
            if self._doc is None or self._next_piece == len(self._pieces):
                try:
                    self._read_document()
                except StopIteration:
                    self._doc = None
                    if row:
                        return build_row(row, self._seq_len, self._pad_id)
                    raise
                continue
            start, stop = self._pieces[self._next_piece]
            if used + stop - start > self._seq_len:
                return build_row(row, self._seq_len, self._pad_id)
            row.append((self._doc, start, stop))
            used += stop - start
            self._next_piece += 1

    def get_state(self) -> dict[str, Any]:
        if self._doc is not None and self._next_piece < len(self._pieces):
            return {"parent": copy.deepcopy(self._doc_state), "next_piece": self._next_piece}
        return {"parent": self._parent.get_state(), "next_piece": -1}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._pieces, self._next_piece = None, [], 0
        if state["next_piece"] >= 0:
            self._read_document()
            self._next_piece = int(state["next_piece"])


class PackIterDataset(grain.IterDataset):
    """Streams packed rows (module docstring) from a parent ``IterDataset`` of 1-D token arrays; with
    ``vocab_size`` every token id (and ``pad_id``) is checked to lie in ``[0, vocab_size)``."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, vocab_size: int | None = None):
        seq_len, pad_id, vocab_size = _check_packing("PackIterDataset", seq_len, pad_id, vocab_size)
        super().__init__(parent)
        self._seq_len, self._pad_id, self._vocab_size = seq_len, pad_id, vocab_size

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._vocab_size)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"
