"""Perplexity by position: per-token negative log-likelihood of one long sequence, averaged in position buckets.

The context-extension diagnostic of "Extending Context Window of Large Language Models via Positional Interpolation"
(Chen et al. 2023, §3.2, perplexity at growing evaluation lengths) and of "LongRoPE"/"YaRN": a model that uses its
context has NLL falling (or flat) with position; one that breaks past its training length has NLL rising there.

``token_nll(model, tokens)`` runs ONE forward over ``tokens`` (the first ``max_len`` when given) and returns
``nll[i] = -log p(tokens[i + 1] | tokens[: i + 1])``, the NLL of the token at position ``i + 1``.
``perplexity_by_position`` buckets those by the predicted token's position: bucket ``j`` holds positions
``edges[j] <= p < edges[j + 1]`` (``buckets`` is a bucket width or the edges), and reports the mean NLL (nats), its
perplexity ``exp(mean)`` and the count per bucket (NaN for an empty bucket). ``model`` is anything mapping int32
tokens ``[1, L]`` to logits ``[1, L, V]``: an ``lcjax.models.lm.LM`` or a function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.checks import require, require_int, require_optional_int


@dataclass(frozen=True)
class PositionPerplexity:
    """Per-bucket mean NLL (nats) and perplexity over predicted-token positions ``[edges[j], edges[j + 1])``."""

    edges: tuple[int, ...]
    mean_nll: tuple[float, ...]
    perplexity: tuple[float, ...]
    counts: tuple[int, ...]
    overall_nll: float

    def as_dict(self) -> dict:
        return dict(edges=list(self.edges), mean_nll=list(self.mean_nll), perplexity=list(self.perplexity),
                    counts=list(self.counts), overall_nll=self.overall_nll)  # fmt: skip


@jax.jit
def _nll_from_logits(logits_LV, tokens_L):
    logp = jax.nn.log_softmax(logits_LV[:-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens_L[1:, None], axis=-1)[:, 0]


def token_nll(model: Callable, tokens: Any, *, max_len: int | None = None) -> np.ndarray:
    """``nll[i] = -log p(tokens[i + 1] | tokens[:i + 1])`` (float32, length ``L - 1``) from one forward of ``model``."""
    tokens_L = np.asarray(tokens)
    require(tokens_L.ndim == 1 and np.issubdtype(tokens_L.dtype, np.integer),
            f"token_nll: tokens must be a 1-D integer sequence, got {tokens_L.dtype}{tokens_L.shape}")  # fmt: skip
    max_len = require_optional_int("token_nll: max_len", max_len, min=2)
    if max_len is not None:
        tokens_L = tokens_L[:max_len]
    require(tokens_L.size >= 2, f"token_nll: tokens must hold at least 2 tokens, got {tokens_L.size}")
    tokens_L = tokens_L.astype(np.int32)
    logits = model(jnp.asarray(tokens_L)[None])
    logits_LV = (logits[0] if isinstance(logits, tuple) else logits)[0]
    require(logits_LV.shape[0] == tokens_L.size, f"token_nll: model returned logits of shape {logits_LV.shape} for "
                                                 f"{tokens_L.size} tokens")  # fmt: skip
    return np.asarray(_nll_from_logits(logits_LV, jnp.asarray(tokens_L)))


def bucket_edges(buckets: int | Sequence[int], length: int) -> tuple[int, ...]:
    """Edges from a bucket width (``0, w, 2w, ..., length``) or from given increasing edges (checked)."""
    if isinstance(buckets, (int, np.integer)) and not isinstance(buckets, bool):
        width = require_int("buckets", buckets, min=1)
        return tuple(range(0, length, width)) + (length,)
    edges = tuple(int(e) for e in buckets)
    require(len(edges) >= 2 and all(a < b for a, b in zip(edges, edges[1:])) and edges[0] >= 0,
            f"buckets must be a width >= 1 or >= 2 strictly increasing edges >= 0, got {buckets!r}")  # fmt: skip
    return edges


def perplexity_by_position(model: Callable, tokens: Any, *, buckets: int | Sequence[int],
                           max_len: int | None = None) -> PositionPerplexity:  # fmt: skip
    """NLL of ``tokens`` under ``model`` (one forward), bucketed by the predicted token's position."""
    nll = token_nll(model, tokens, max_len=max_len)
    return bucket_nll(nll, buckets)


def bucket_nll(nll: np.ndarray, buckets: int | Sequence[int]) -> PositionPerplexity:
    """Bucket per-token NLLs (``nll[i]`` at position ``i + 1``) by position."""
    nll = np.asarray(nll, np.float64)
    edges = bucket_edges(buckets, nll.size + 1)
    pos = np.arange(1, nll.size + 1)
    means, ppls, counts = [], [], []
    for lo, hi in zip(edges, edges[1:]):
        sel = nll[(pos >= lo) & (pos < hi)]
        m = float(sel.mean()) if sel.size else math.nan
        means.append(m)
        ppls.append(math.exp(m) if sel.size else math.nan)
        counts.append(int(sel.size))
    return PositionPerplexity(edges=edges, mean_nll=tuple(means), perplexity=tuple(ppls), counts=tuple(counts),
                              overall_nll=float(nll.mean()))  # fmt: skip
