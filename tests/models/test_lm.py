"""The decoder LM: packing, cached decoding, generation, layer scan, metadata, sizes and input validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.layers.attention import AttentionConfig, KVCache
from lcjax.models import lm as lm_lib
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import rope as rope_ops
from tests.tolerances import EXACT, F32_MODULE, F32_OP

# LM-level tests use dense reference attention (cheap to compile); the blockwise default is checked against it below
# and in tests/test_attention_ops.py.
CFG = LMConfig.tiny(attn_impl="reference")
apply = jax.jit(lambda m, t, **kw: m(t, **kw))


def build(cfg: LMConfig, seed: int = 0) -> LM:
    return jax.jit(lambda: LM(cfg, rngs=nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def model():
    return build(CFG)


def tokens(shape, seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_forward_shape_dtype(model):
    logits = apply(model, tokens((2, 9)))
    assert logits.shape == (2, 9, CFG.vocab_size) and logits.dtype == jnp.float32
    bf16 = build(dataclasses.replace(CFG, dtype="bfloat16"))
    assert np.isfinite(np.asarray(apply(bf16, tokens((2, 9))))).all()


def test_default_blockwise_attention_equals_reference(model):
    blockwise = build(dataclasses.replace(CFG, attn_impl="auto"))
    toks, seg = tokens((2, 13), seed=7), jnp.asarray([[0] * 6 + [1] * 7, [0] * 13], jnp.int32)
    np.testing.assert_allclose(apply(blockwise, toks, segment_ids_BL=seg), apply(model, toks, segment_ids_BL=seg), **F32_OP)
    loss = lambda m: jnp.mean(m(toks, segment_ids_BL=seg) ** 2)
    g_b, g_r = jax.jit(jax.grad(loss))(blockwise), jax.jit(jax.grad(loss))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_OP), nnx.state(g_b), nnx.state(g_r))


def test_packed_documents_equal_separate_runs(model):
    a, b = tokens((1, 5), seed=1), tokens((1, 7), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
    out = apply(model, packed, segment_ids_BL=seg)
    np.testing.assert_allclose(out[:, :5], apply(model, a), **F32_OP)
    np.testing.assert_allclose(out[:, 5:], apply(model, b), **F32_OP)


def test_cached_decoding_equals_full_forward(model):
    toks = tokens((2, 12), seed=3)
    full = apply(model, toks)
    cache = model.init_cache(2, 16)
    logits, cache = apply(model, toks[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = apply(model, toks[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **F32_OP)
    assert int(cache.index) == 12


def test_generate_greedy_matches_argmax_loop(model):
    prompt = tokens((2, 4), seed=4)
    out = lm_lib.generate(model, prompt, max_new_tokens=5)
    seq = prompt
    for _ in range(5):
        nxt = jnp.argmax(apply(model, seq)[:, -1], axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq[:, 4:])


def test_generate_sampling(model):
    prompt = tokens((2, 4), seed=5)
    key = jax.random.key(1)
    a = lm_lib.generate(model, prompt, max_new_tokens=6, temperature=1.0, rng=key)
    b = lm_lib.generate(model, prompt, max_new_tokens=6, temperature=1.0, rng=key)
    np.testing.assert_array_equal(a, b)
    greedy = lm_lib.generate(model, prompt, max_new_tokens=6)
    top1 = lm_lib.generate(model, prompt, max_new_tokens=6, temperature=0.7, top_k=1, rng=key)
    np.testing.assert_array_equal(top1, greedy)


def _stack_params(unrolled: LM, scanned: LM) -> LM:
    """Copy an unrolled model's weights into the stacked layout of a scanned one."""
    src, dst = nnx.state(unrolled), nnx.state(scanned)
    dst["embed_tokens"], dst["norm"], dst["lm_head"] = src["embed_tokens"], src["norm"], src["lm_head"]
    layers = [src["layers"][i] for i in range(unrolled.cfg.n_layers)]
    dst["layers"][0] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    nnx.update(scanned, dst)
    return scanned


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_equals_unrolled(model, remat):
    scanned = _stack_params(model, build(dataclasses.replace(CFG, scan_layers=True, remat=remat), 1))
    toks = tokens((2, 10), seed=6)
    np.testing.assert_allclose(apply(scanned, toks), apply(model, toks), **F32_OP)

    loss = lambda m: jnp.mean(m(toks) ** 2)
    g_scan, g_unrolled = nnx.state(jax.jit(jax.grad(loss))(scanned)), nnx.state(jax.jit(jax.grad(loss))(model))
    for i in range(CFG.n_layers):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, **F32_OP), g_scan["layers"][0], g_unrolled["layers"][i])
    # cached decoding through the scan
    cache = scanned.init_cache(2, 12)
    logits, cache = apply(scanned, toks[:, :6], cache=cache)
    logits2, _ = apply(scanned, toks[:, 6:8], cache=cache)
    np.testing.assert_allclose(logits2, apply(model, toks[:, :8])[:, 6:], **F32_OP)


@pytest.mark.parametrize("scan", [False, True])
def test_metadata_rank_equals_array_rank(scan):
    import optax

    m = LM(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param)
    count = 0
    for tree in (m, opt):
        for path, var in nnx.iter_graph(tree):
            if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding") is not None:
                assert len(var.get_metadata()["out_sharding"]) == var[...].ndim, path
                count += 1
    assert count > 10
    if scan:
        assert m.layers[0].self_attn.q_proj.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_param_counts_under_eval_shape():
    assert lm_lib.param_count(LMConfig.llama3_8b()) == 8_030_261_248
    assert lm_lib.param_count(LMConfig.llama32_1b()) == 1_235_814_400
    D, F, V, H, K, P = 32, 64, 128, 4, 2, 8
    per_layer = D * H * P * 2 + D * K * P * 2 + 3 * D * F + 2 * D
    assert lm_lib.param_count(CFG) == 2 * V * D + D + 2 * per_layer
    assert lm_lib.param_count(dataclasses.replace(CFG, scan_layers=True)) == lm_lib.param_count(CFG)


def test_rope_positions_from_segments():
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(rope_ops.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2]])


def test_rope_is_relative():
    """<R(a) q, R(b) k> depends on a - b only."""
    inv, s = rope_ops.rope_frequencies(8, rope_ops.RopeConfig())
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
    dots = [
        jnp.sum(rope_ops.apply_rope(q, jnp.full((1, 1), a), inv, s) * rope_ops.apply_rope(k, jnp.full((1, 1), b), inv, s))
        for a, b in [(3, 1), (10, 8), (102, 100)]
    ]
    np.testing.assert_allclose(dots[0], dots[1], **F32_MODULE)
    np.testing.assert_allclose(dots[0], dots[2], atol=1e-4)  # f32 angle error grows with |position|


BAD_INPUTS = [
    ("n_heads", lambda: LMConfig.tiny(n_heads=4, n_kv_heads=3)),
    ("block_pattern", lambda: LMConfig.tiny(block_pattern=("transformer",))),
    ("n_layers", lambda: LMConfig.tiny(n_layers=3, block_pattern=("attention", "attention"))),
    ("vocab_size", lambda: LMConfig.tiny(vocab_size=0)),
    ("dtype", lambda: LMConfig.tiny(dtype="int8")),
    ("window", lambda: LMConfig.tiny(window=0)),
    ("mlp_dim", lambda: LMConfig.tiny(mlp_dim=0)),
    ("rope_type", lambda: rope_ops.RopeConfig(rope_type="ntk-by-parts")),
    ("head_dim", lambda: AttentionConfig(d_model=8, n_heads=2, n_kv_heads=2, head_dim=3)),
    ("max_seq_len", lambda: LM(LMConfig.tiny(max_seq_len=8), rngs=nnx.Rngs(0))(tokens((1, 9)))),
    ("do not fit a cache", lambda: KVCache.init(1, 4, 1, 2).update(*(jnp.zeros((1, 5, 1, 2)),) * 2, *(jnp.zeros((1, 5), jnp.int32),) * 2)),
    ("max_new_tokens", lambda: lm_lib.generate(LM(CFG, rngs=nnx.Rngs(0)), tokens((1, 4)), max_new_tokens=0)),
    ("exceeds max_seq_len", lambda: lm_lib.generate(LM(LMConfig.tiny(max_seq_len=8), rngs=nnx.Rngs(0)), tokens((1, 4)), max_new_tokens=5)),
    ("rng is required", lambda: lm_lib.generate(LM(CFG, rngs=nnx.Rngs(0)), tokens((1, 4)), max_new_tokens=2, temperature=1.0)),
]


@pytest.mark.parametrize("match, make", BAD_INPUTS, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_value_error(match, make):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("tokens_", [jnp.zeros((1, 4), jnp.float32), jnp.zeros((4,), jnp.int32)])
def test_bad_token_dtype_or_rank(tokens_):
    # Under the test suite's jaxtyping+beartype hook the annotation rejects these first (TypeCheckError, a
    # TypeError naming `tokens_BL`); without the hook LM.__call__ raises ValueError. Both name the argument.
    with pytest.raises((ValueError, TypeError), match="tokens"):
        LM(CFG, rngs=nnx.Rngs(0))(tokens_)


def test_kv_cache_update_writes_at_index():
    c = KVCache.init(1, 6, 1, 2)
    c = c.update(jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)), jnp.asarray([[7, 8]]), jnp.zeros((1, 2), jnp.int32))
    np.testing.assert_array_equal(c.positions_BS, [[7, 8, 0, 0, 0, 0]])
    np.testing.assert_array_equal(c.segment_ids_BS, [[0, 0, -1, -1, -1, -1]])
    np.testing.assert_allclose(c.k_BSKP[0, :, 0, 0], [1, 1, 0, 0, 0, 0], **EXACT)
