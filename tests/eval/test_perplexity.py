"""lcjax.eval.perplexity against a naive float64 NumPy computation from the same logits of a tiny random LM."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from lcjax.eval import perplexity as ppl
from lcjax.models.lm import LM, LMConfig
from tests.tolerances import F32_OP

V, L = 64, 200


@pytest.fixture(scope="module")
def model_and_tokens():
    model = LM(LMConfig.tiny(vocab_size=V, max_seq_len=256), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, V, size=L)
    return model, tokens


def _naive_nll(logits_LV, tokens):
    x = np.asarray(logits_LV, np.float64)
    logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return logz[:-1] - x[np.arange(len(tokens) - 1), tokens[1:]]


def test_token_nll_and_buckets_match_numpy(model_and_tokens):
    model, tokens = model_and_tokens
    logits_LV = np.asarray(model(tokens[None].astype(np.int32)))[0]
    ref = _naive_nll(logits_LV, tokens)
    nll = ppl.token_nll(model, tokens)
    np.testing.assert_allclose(nll, ref, **F32_OP)
    out = ppl.perplexity_by_position(model, tokens, buckets=64)
    assert out.edges == (0, 64, 128, 192, 200) and out.counts == (63, 64, 64, 8)
    pos = np.arange(1, L)
    for j, (lo, hi) in enumerate(zip(out.edges, out.edges[1:])):
        m = ref[(pos >= lo) & (pos < hi)].mean()
        np.testing.assert_allclose(out.mean_nll[j], m, **F32_OP)
        np.testing.assert_allclose(out.perplexity[j], math.exp(m), **F32_OP)
    np.testing.assert_allclose(out.overall_nll, ref.mean(), **F32_OP)
    assert set(out.as_dict()) == {"edges", "mean_nll", "perplexity", "counts", "overall_nll"}


def test_edges_max_len_and_function_model(model_and_tokens):
    model, tokens = model_and_tokens
    fn = jax.jit(lambda t: model(t))  # any tokens [1, L] -> logits [1, L, V] function
    out = ppl.perplexity_by_position(fn, tokens, buckets=[0, 10, 100, 300], max_len=150)
    ref = _naive_nll(np.asarray(model(tokens[None, :150].astype(np.int32)))[0], tokens[:150])
    assert out.counts == (9, 90, 50) and out.edges == (0, 10, 100, 300)
    np.testing.assert_allclose(out.mean_nll[2], ref[99:].mean(), **F32_OP)
    empty = ppl.perplexity_by_position(fn, tokens[:20], buckets=[0, 10, 50, 60])
    assert empty.counts[2] == 0 and math.isnan(empty.mean_nll[2]) and math.isnan(empty.perplexity[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(buckets=0), "buckets"),
    (dict(buckets=[10, 5]), "buckets"),
    (dict(buckets=8, max_len=1), "max_len"),
    (dict(buckets=8, tokens=[3]), "at least 2 tokens"),
    (dict(buckets=8, tokens=[[1, 2]]), "1-D integer"),
])  # fmt: skip
def test_bad_inputs(model_and_tokens, kwargs, match):
    model, tokens = model_and_tokens
    kw = dict(tokens=tokens) | kwargs
    with pytest.raises(ValueError, match=match):
        ppl.perplexity_by_position(model, kw.pop("tokens"), **kw)
