"""The decoder LM: packing, cached decoding, generation, layer scan, metadata, sizes and input validation."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from lcjax import checks
from lcjax.layers.attention import AttentionConfig, KVCache
from lcjax.models import blocks
from lcjax.models import lm as lm_lib
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import attention as attention_ops
from lcjax.ops import losses as losses_lib
from lcjax.ops import rope as rope_ops
from tests.tolerances import EXACT, F32_MODULE, F32_OP

# LM-level tests use dense reference attention (cheap to compile); the blockwise default is checked against it below
# and in tests/ops/test_attention_ops.py.
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


def test_default_blockwise_attention_equals_reference(model, monkeypatch):
    """At a length above ``DENSE_MAX_QUERY_LEN`` ``attn_impl="auto"`` runs the blockwise kernel (asserted by a spy on
    ``attention_ops.blockwise_checked``, the dispatcher's blockwise path), and it agrees with the dense reference,
    values and gradients."""
    calls = []
    real = attention_ops.blockwise_checked
    monkeypatch.setattr(attention_ops, "blockwise_checked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    L = attention_ops.DENSE_MAX_QUERY_LEN + 4
    assert attention_ops.resolve_impl("auto", q_len=L, kv_len=L, head_dim=CFG.head_dim, dtype=jnp.float32,
                                      segment_ids=True) is attention_ops.Impl.BLOCKWISE  # fmt: skip
    auto = build(dataclasses.replace(CFG, attn_impl="auto"))
    toks, seg = tokens((2, L), seed=7), jnp.asarray([[1] * 9 + [2] * (L - 9), [1] * L], jnp.int32)
    run = lambda m: jax.jit(lambda m: m(toks, segment_ids_BL=seg))(m)  # fresh traces, so the spy sees them
    out_ref = run(model)
    assert not calls, "the reference model must not run the blockwise kernel"
    out_auto = run(auto)
    assert len(calls) == CFG.n_layers, "attn_impl='auto' must select the blockwise kernel at this length"
    np.testing.assert_allclose(out_auto, out_ref, **F32_OP)
    loss = lambda m: jnp.mean(m(toks, segment_ids_BL=seg) ** 2)
    g_b, g_r = jax.jit(jax.grad(loss))(auto), jax.jit(jax.grad(loss))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_OP), nnx.state(g_b), nnx.state(g_r))


def test_packed_documents_equal_separate_runs(model):
    a, b = tokens((1, 5), seed=1), tokens((1, 7), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
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
_TINY = LM(CFG, rngs=nnx.Rngs(0))  # eager calls below fail in validation, before any compute
_IDS = jnp.asarray([[1, 2, 3]], jnp.int32)
_V = CFG.vocab_size
BAD_INPUTS += [
    (r"LM: tokens_BL: token ids must be in \[0, vocab_size=128\)", lambda: _TINY(_IDS.at[0, 1].set(_V))),
    (r"LM: tokens_BL: token ids must be in \[0, vocab_size=128\)", lambda: _TINY(_IDS.at[0, 1].set(-1))),
    (r"generate: prompt: token ids must be in \[0, vocab_size=128\)",
     lambda: lm_lib.generate(_TINY, _IDS.at[0, 0].set(_V + 5), max_new_tokens=2)),
    (r"token_cross_entropy: targets .*token ids must be in \[0, vocab_size=128\)",
     lambda: losses_lib.token_cross_entropy(jnp.zeros((1, 3, _V)), _IDS.at[0, 2].set(_V))),
    (r"token_cross_entropy: targets .*token ids must be in \[0, vocab_size=128\)",
     lambda: losses_lib.token_cross_entropy(jnp.zeros((1, 3, _V)), _IDS.at[0, 0].set(-3), jnp.ones((1, 3)))),
    ("generate: temperature=nan must be a finite number",
     lambda: lm_lib.generate(_TINY, _IDS, max_new_tokens=2, temperature=float("nan"), rng=jax.random.key(0))),
    ("LM: tokens_BL must hold at least one token per row", lambda: _TINY(jnp.zeros((1, 0), jnp.int32))),
    ("generate: prompt must hold at least one token per row",
     lambda: lm_lib.generate(_TINY, jnp.zeros((1, 0), jnp.int32), max_new_tokens=2)),
    (r"LM: segment_ids_BL must be >= 0 \(0 = padding", lambda: _TINY(_IDS, segment_ids_BL=jnp.asarray([[1, 1, -1]]))),
    ("generate: top_k=0 is out of range", lambda: lm_lib.generate(_TINY, _IDS, max_new_tokens=2, top_k=0)),
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


def _unhooked_config(**kw) -> LMConfig:
    """``LMConfig.tiny(**kw)`` past the test suite's beartype hook, so LMConfig's own checks are what raises."""
    cfg = object.__new__(LMConfig)
    base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=256)
    inspect.unwrap(LMConfig.__init__)(cfg, **(base | kw))
    return cfg


def _sampling_args(**kw):
    base = dict(max_new_tokens=2, temperature=0.0, top_k=None, rng=None, vocab_size=_V)
    return inspect.unwrap(lm_lib.check_sampling_args)(**(base | kw))


BAD_TYPES = [
    (r"LMConfig.vocab_size must be an int, got True \(bool\)", lambda: _unhooked_config(vocab_size=True)),
    (r"LMConfig.tie_embeddings must be a bool \(True or False\), got 'no' \(str\)",
     lambda: _unhooked_config(tie_embeddings="no")),
    ("LMConfig.rope must be a RopeConfig", lambda: _unhooked_config(rope={"theta": 1.0})),
    (r"LMConfig.mixers\['mamba2'\] must be a Mamba2Config", lambda: LMConfig.tiny(mixers={"mamba2": 3})),
    ("LMConfig.vocab_size", lambda: LMConfig.tiny(vocab_size=True)),  # through the hook as well
    ("tie_embeddings", lambda: LMConfig.tiny(tie_embeddings="no")),
    (r"generate: max_new_tokens must be an int, got 2.0 \(float\)", lambda: _sampling_args(max_new_tokens=2.0)),
    ("max_new_tokens", lambda: lm_lib.generate(_TINY, _IDS, max_new_tokens=2.0)),
    (r"generate: top_k must be an int, got True \(bool\)",
     lambda: lm_lib.generate(_TINY, _IDS, max_new_tokens=2, top_k=True)),
]


@pytest.mark.parametrize("match, make", BAD_TYPES, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD_TYPES)])
def test_bad_types_raise_type_error(match, make):
    # The suite's beartype hook may reject an annotated value first (also a TypeError); the exact-message cases call
    # past it (inspect.unwrap), as a user without the hook would.
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("prompt", [jnp.zeros((4,), jnp.int32), jnp.zeros((1, 4), jnp.float32)])
def test_bad_prompt_rank_or_dtype(prompt):
    # A ValueError from generate, or the beartype hook's TypeError naming prompt_BL (see test_bad_token_dtype_or_rank).
    with pytest.raises((ValueError, TypeError), match="prompt"):
        lm_lib.generate(_TINY, prompt, max_new_tokens=2)


def test_token_ids_checked_under_jit_with_checkify():
    """Under a plain jit a bad id passes (clamped by the gather); ``checks.checkify`` stages the check in."""
    bad = _IDS.at[0, 2].set(_V)
    plain = jax.jit(lambda m, t: m(t))
    np.testing.assert_allclose(plain(_TINY, bad)[0, 2], plain(_TINY, _IDS.at[0, 2].set(_V - 1))[0, 2], **F32_OP)
    checked = jax.jit(checks.checkify(lambda m, t: m(t)))
    err, _ = checked(_TINY, _IDS)
    err.throw()  # good ids: no error
    err, _ = checked(_TINY, bad)
    message = r"LM: tokens_BL: token ids must be in \[0, vocab_size=128\); got min 1, max 128"
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        err.throw()


def test_default_segment_ids_are_one_document(model):
    t = tokens((2, 6), seed=9)
    np.testing.assert_allclose(apply(model, t), apply(model, t, segment_ids_BL=jnp.ones((2, 6), jnp.int32)), **EXACT)


def test_kv_cache_update_writes_at_index():
    c = KVCache.init(1, 6, 1, 2)
    c = c.update(jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)), jnp.asarray([[7, 8]]), jnp.zeros((1, 2), jnp.int32))
    np.testing.assert_array_equal(c.positions_BS, [[7, 8, 0, 0, 0, 0]])
    np.testing.assert_array_equal(c.segment_ids_BS, [[0, 0, -1, -1, -1, -1]])
    np.testing.assert_allclose(c.k_BSKP[0, :, 0, 0], [1, 1, 0, 0, 0, 0], **EXACT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaleConfig:
    d_model: int


class _ScaleBlock(nnx.Module):
    """A toy block type (``x * w``): what a new block file holds, registered by one line in ``BLOCKS``."""

    mixer_config = _ScaleConfig

    @staticmethod
    def check(dims, mixer, *, max_seq_len, name):
        checks.require(mixer.d_model == dims.d_model, f"{name}.d_model must equal d_model={dims.d_model}")

    def __init__(self, dims, mixer, *, rngs):
        self.w = nnx.Param(jnp.ones((mixer.d_model,), jnp.dtype(dims.param_dtype)))

    def __call__(self, x_BLD, *, positions_BL, segment_ids_BL, cache=None):
        return x_BLD * self.w[...][None, None], cache

    def init_cache(self, batch, length, dtype=jnp.float32):
        return None


def test_a_new_block_type_is_one_registry_line(monkeypatch):
    monkeypatch.setitem(blocks.BLOCKS, "scale", _ScaleBlock)
    cfg = LMConfig.tiny(block_pattern=("attention", "scale"), mixers={"scale": {"d_model": 32}})
    assert cfg.mixers == {"scale": _ScaleConfig(d_model=32)} and hash(cfg) == hash(dataclasses.replace(cfg))
    assert lm_lib.param_count(cfg) == lm_lib.param_count(dataclasses.replace(CFG, n_layers=1)) + 32  # + w
    out = build(dataclasses.replace(cfg, attn_impl="reference"))(tokens((1, 5)))
    assert out.shape == (1, 5, CFG.vocab_size)
    with pytest.raises(ValueError, match=r"LMConfig.mixers\['scale'\].d_model must equal d_model=32"):
        LMConfig.tiny(block_pattern=("scale",), mixers={"scale": _ScaleConfig(d_model=8)})
    with pytest.raises(ValueError, match=r"LMConfig.mixers\['scale'\]: a _ScaleConfig is required"):
        LMConfig.tiny(block_pattern=("scale",))
