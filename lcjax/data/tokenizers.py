"""One tokenizer interface for the text pipeline and ``lcjax generate``: the byte tokenizer or a Hugging Face one.

``Tokenizer`` is a structural Protocol: ``encode(text, *, add_bos, add_eos) -> int32 ids``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``. Two implementations:

- ``ByteTokenizer`` (``lcjax.data.text``): UTF-8 bytes plus PAD/BOS/EOS, the default of every text run.
- ``HFTokenizer``: a ``tokenizers.Tokenizer`` (the Rust library behind transformers' fast tokenizers), built from a
  ``tokenizer.json`` (``HFTokenizer.from_file``) or from a GGUF file's ``tokenizer.ggml.*`` metadata through
  transformers' GGUF reader (``HFTokenizer.from_gguf``). Special tokens are added only as asked (``add_bos`` /
  ``add_eos``), never by the wrapped tokenizer's post-processor, so both implementations mean the same thing by them.

``load_tokenizer(spec)`` picks one: ``"byte"``, a ``tokenizer.json`` path, or a ``.gguf`` path.
Reference: huggingface/tokenizers 0.23 (``Tokenizer.from_file``, ``encode(add_special_tokens=False)``); transformers
5.23.0 ``integrations/ggml.py`` (GGUF tokenizer metadata -> a fast tokenizer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lcjax.checks import check_token_ids, require, require_bool, require_optional_int
from lcjax.data.text import ByteTokenizer
from lcjax.typing import Int


@runtime_checkable
class Tokenizer(Protocol):
    """What the text pipeline and ``lcjax generate`` need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str | bytes, *, add_bos: bool = ..., add_eos: bool = ...) -> Int[np.ndarray, "L"]: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the ``Tokenizer`` interface.

    ``encode`` returns the model's ids for the text (``bytes`` are read as UTF-8), with ``bos_id`` / ``eos_id``
    around them when ``add_bos`` / ``add_eos`` (defaults set per instance: a GGUF file says whether its model expects
    BOS). ``pad_id`` (only ever under ``loss_mask = False`` in packed rows) defaults to the pad, else EOS, else 0.
    """

    def __init__(
        self, tokenizer: Any, *, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
        add_bos: bool = False, add_eos: bool = False, vocab_size: int | None = None,
    ):  # fmt: skip
        if hasattr(tokenizer, "backend_tokenizer"):  # a transformers fast tokenizer
            tokenizer = tokenizer.backend_tokenizer
        require(callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None)),
                f"HFTokenizer: tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")  # fmt: skip
        self.tokenizer = tokenizer
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        # The model's vocabulary; the tokenizer may know a few more special tokens than the model has rows (a GGUF
        # file's GPT-2 tokenizer adds <|endoftext|>); encode checks that the ids it returns fit.
        self._vocab_size = require_optional_int("HFTokenizer: vocab_size", vocab_size, min=1) or n
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            require_optional_int(f"HFTokenizer: {name}", v, min=0, max=self._vocab_size - 1)
        self._bos_id, self._eos_id = bos_id, eos_id
        self._pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_bos = require_bool("HFTokenizer: add_bos", add_bos)
        self.add_eos = require_bool("HFTokenizer: add_eos", add_eos)
        require(not add_bos or bos_id is not None, "HFTokenizer: add_bos=True needs a bos_id")
        require(not add_eos or eos_id is not None, "HFTokenizer: add_eos=True needs an eos_id")

    vocab_size = property(lambda self: self._vocab_size)
    bos_id = property(lambda self: self._bos_id)
    eos_id = property(lambda self: self._eos_id)
    pad_id = property(lambda self: self._pad_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
                  pad_token: str | None = None, **kwargs) -> HFTokenizer:  # fmt: skip
        """From a ``tokenizer.json``; special tokens are named by their text (e.g. ``eos_token="</s>"``), by default
        as the ``tokenizer_config.json`` next to it (an HF checkpoint directory) names them."""
        from tokenizers import Tokenizer as RustTokenizer

        path = os.fspath(path)
        require(os.path.isfile(path), f"HFTokenizer.from_file: {path!r} is not a file")
        tok = RustTokenizer.from_file(path)
        side = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(side):
            with open(side) as f:
                named = json.load(f)
            content = lambda t: t.get("content") if isinstance(t, dict) else t
            bos_token = bos_token if bos_token is not None else content(named.get("bos_token"))
            eos_token = eos_token if eos_token is not None else content(named.get("eos_token"))
            pad_token = pad_token if pad_token is not None else content(named.get("pad_token"))

        def token_id(name: str, token: str | None) -> int | None:
            if token is None:
                return None
            i = tok.token_to_id(token)
            require(i is not None, f"HFTokenizer.from_file: {name}={token!r} is not in the vocabulary of {path}")
            return i

        ids = dict(bos_id=token_id("bos_token", bos_token), eos_id=token_id("eos_token", eos_token),
                   pad_id=token_id("pad_token", pad_token))  # fmt: skip
        return cls(tok, **(ids | kwargs))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, **kwargs) -> HFTokenizer:
        """From a GGUF file's tokenizer metadata (transformers builds the fast tokenizer; needs ``gguf``)."""
        from transformers import AutoTokenizer

        from lcjax.convert.gguf import gguf_metadata

        path = os.fspath(path)
        meta = gguf_metadata(path)
        require("tokenizer.ggml.tokens" in meta, f"HFTokenizer.from_gguf: {path} has no tokenizer.ggml.tokens")
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
        get = lambda key: None if meta.get(key) is None else int(meta[key])
        defaults = dict(bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
                        pad_id=get("tokenizer.ggml.padding_token_id"),
                        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                        vocab_size=len(meta["tokenizer.ggml.tokens"]))  # fmt: skip
        return cls(hf, **(defaults | kwargs))

    def encode(
        self, text: str | bytes, *, add_bos: bool | None = None, add_eos: bool | None = None
    ) -> Int[np.ndarray, "L"]:
        """The ids of ``text`` as int32, with BOS / EOS as asked (``None``: this tokenizer's defaults)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode: text must be str or bytes, got {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        require(not add_bos or self.bos_id is not None, "HFTokenizer.encode: add_bos=True but bos_id is None")
        require(not add_eos or self.eos_id is not None, "HFTokenizer.encode: add_eos=True but eos_id is None")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = np.asarray([self.bos_id] * add_bos + ids + [self.eos_id] * add_eos, np.int32)
        check_token_ids("HFTokenizer.encode", ids, self.vocab_size)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids`` (special tokens dropped)."""
        ids = np.asarray(ids)
        require(ids.ndim == 1, f"HFTokenizer.decode: ids must be 1-D, got shape {ids.shape}")
        check_token_ids("HFTokenizer.decode: ids", ids, self.vocab_size)
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"HFTokenizer({type(self.tokenizer.model).__name__}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")  # fmt: skip


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> ``ByteTokenizer()``; a ``.gguf`` path -> ``HFTokenizer.from_gguf``; any other path ->
    ``HFTokenizer.from_file`` (a ``tokenizer.json``)."""
    spec = os.fspath(spec)
    if spec == "byte":
        return ByteTokenizer()
    require(os.path.isfile(spec), f"tokenizer: {spec!r} is neither 'byte' nor a tokenizer.json / .gguf file")
    return HFTokenizer.from_gguf(spec) if spec.endswith(".gguf") else HFTokenizer.from_file(spec)
