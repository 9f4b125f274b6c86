"""The "m2" block type in the decoder LM: causality, packing, cached decoding / generate, hybrids, layer scan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.layers.monarch_mixer import M2SequenceMixerConfig
from lcjax.models import lm as lm_lib
from lcjax.models.lm import LM, LMConfig
from tests.models.test_lm import _stack_params
from tests.tolerances import F32_OP

apply = jax.jit(lambda m, t, **kw: m(t, **kw))


def cfg(long_conv="fft", **kw):
    base = dict(vocab_size=64, d_model=16, n_layers=2, mlp_dim=32, max_seq_len=32, block_pattern=("m2",),
                mixers={"m2": M2SequenceMixerConfig.causal(16, 32, long_conv=long_conv, segments_per_pass=2)},
                attn_impl="reference")  # fmt: skip
    return LMConfig(**(base | kw))


def build(c, seed=0):
    return jax.jit(lambda: LM(c, rngs=nnx.Rngs(seed)))()


def toks(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, shape), jnp.int32)


@pytest.mark.parametrize("long_conv", ["fft", "causal_monarch"])
def test_m2_lm_is_causal_and_packs(long_conv):
    model = build(cfg(long_conv))
    t = toks((2, 20))
    base = apply(model, t)
    perturbed = apply(model, t.at[:, 12:].set((t[:, 12:] + 7) % 64))
    np.testing.assert_allclose(perturbed[:, :12], base[:, :12], **F32_OP)
    assert not np.allclose(perturbed[:, 12:], base[:, 12:])
    seg = jnp.asarray([[1] * 9 + [2] * 11] * 2, jnp.int32)
    packed = apply(model, t, segment_ids_BL=seg)
    np.testing.assert_allclose(packed[:, :9], apply(model, t[:, :9]), **F32_OP)
    np.testing.assert_allclose(packed[:, 9:], apply(model, t[:, 9:]), **F32_OP)


@pytest.mark.parametrize("pattern", [("m2",), ("m2", "attention")], ids=["m2", "hybrid"])
def test_m2_cached_decoding_and_generate(pattern):
    model = build(cfg(block_pattern=pattern, n_layers=2, n_heads=2))
    t = toks((2, 14), seed=1)
    full = apply(model, t)
    logits, cache = apply(model, t[:, :8], cache=model.init_cache(2, 16))
    steps = [logits]
    for i in range(8, 14):
        logits, cache = apply(model, t[:, i : i + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **F32_OP)
    out = lm_lib.generate(model, t[:, :5], max_new_tokens=4)
    seq = t[:, :5]
    for _ in range(4):
        seq = jnp.concatenate([seq, jnp.argmax(apply(model, seq)[:, -1], -1).astype(jnp.int32)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq[:, 5:])


def test_m2_scan_layers_matches_unrolled():
    model = build(cfg())
    scanned = _stack_params(model, build(dataclasses.replace(cfg(), scan_layers=True), seed=1))
    t = toks((2, 12), seed=2)
    np.testing.assert_allclose(apply(scanned, t), apply(model, t), **F32_OP)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mixers={}), "M2SequenceMixerConfig is required"),
        (dict(max_seq_len=64), "l_max=32 must be >= max_seq_len=64"),
        (dict(mixers={"m2": M2SequenceMixerConfig.causal(8, 32)}), "d_model=16"),
    ],
)
def test_m2_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_m2_lm_on_pipeline_rows():
    """A packed row as ``lcjax.data`` writes it (documents 1, 2, 3, 4, then 0 padding): four documents, two per
    pass; each document's logits equal the document alone, and the padding tokens change nothing."""
    from lcjax.data.packing import build_row

    model = build(cfg())
    lengths = (6, 3, 7, 2)
    docs = [np.asarray(toks((1, n + 1), seed=10 + i))[0] for i, n in enumerate(lengths)]
    row = build_row([(d, 0, len(d) - 1) for d in docs], seq_len=24, pad_id=0)
    np.testing.assert_array_equal(row["segment_ids"], np.repeat([1, 2, 3, 4, 0], lengths + (6,)))
    inputs, seg, pos = (jnp.asarray(row[k])[None] for k in ("inputs", "segment_ids", "positions"))
    out = apply(model, inputs, segment_ids_BL=seg, positions_BL=pos)
    junk = apply(model, jnp.where(seg == 0, 63, inputs), segment_ids_BL=seg, positions_BL=pos)
    np.testing.assert_array_equal(junk[:, :18], out[:, :18])
    assert np.all(np.isfinite(np.asarray(out)))
    start = 0
    for d, n in zip(docs, lengths):
        alone = apply(model, jnp.asarray(d[:n])[None])
        np.testing.assert_allclose(out[:, start : start + n], alone, **F32_OP)
        start += n
