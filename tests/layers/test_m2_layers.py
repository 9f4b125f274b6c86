"""M2 layers: the Hyena filter, the sequence mixer's padding fix, the causal mixers, the dimension mixer, sharding.

XLA compiles dominate the run time here, so modules are built once per file (jit-built, module-scoped fixtures)
and every call goes through one jitted ``run``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import sharding
from lcjax.layers import m2_filter
from lcjax.layers import monarch_mixer as mm
from lcjax.models.m2_bert import M2Bert, M2BertConfig
from lcjax.ops import monarch
from tolerances import F32_MODULE, F32_OP, F32_SHARDED

D = 8
run = jax.jit(lambda module, x, **kw: module(x, **kw))


def build(cls, cfg, seed=0):
    """Construct under jit: one compile instead of one per eager init op."""
    return jax.jit(lambda: cls(cfg, rngs=nnx.Rngs(seed)))()


def clone(module, **cfg_changes):
    """A copy of ``module`` (same parameters) with config fields replaced."""
    out = nnx.clone(module)  # nnx.merge(*nnx.split(m)) would share the Variables
    out.cfg = dataclasses.replace(out.cfg, **cfg_changes)
    return out


def with_random_basis(mixer, seed=0):
    out = clone(mixer)
    k1, k2 = jax.random.split(jax.random.key(seed))
    out.basis_l[...] = 0.5 * jax.random.normal(k1, out.basis_l.shape)
    out.basis_r[...] = 0.5 * jax.random.normal(k2, out.basis_r.shape)
    return out


@pytest.fixture(scope="module")
def bert_mixer():
    return build(mm.M2SequenceMixer, mm.M2SequenceMixerConfig.m2_bert(D, l_max=16, filter_order=8))


@pytest.fixture(scope="module")
def causal_mixers():
    """(a) and (b) with the same draws; (b) also with a random (non-monomial) basis."""
    cfg = mm.M2SequenceMixerConfig.causal(D, 16, residual_long_conv=True, filter_order=8, segments_per_pass=3)
    a = build(mm.CausalM2Mixer, cfg)
    b = build(mm.CausalM2Mixer, dataclasses.replace(cfg, long_conv="causal_monarch"))
    return {"fft": a, "causal_monarch_zero": b, "causal_monarch": with_random_basis(b)}


def test_filter_prefix_and_validation():
    filt = build(m2_filter.HyenaFilter,
                 m2_filter.HyenaFilterConfig(d_model=D, l_max=16, emb_dim=5, order=8, bidirectional=True))  # fmt: skip
    (k16, r16), (k9, r9) = jax.jit(filt.kernels, static_argnums=0)(16), jax.jit(filt.kernels, static_argnums=0)(9)
    np.testing.assert_allclose(k9, k16[:9], **F32_OP)  # a short filter is the prefix of the long one (z[:L], t[:L])
    np.testing.assert_allclose(r9, r16[:9], **F32_OP)
    np.testing.assert_allclose(filt.z[...][:, 0], np.linspace(0, 1, 16), **F32_OP)  # z = [t, cos, sin]
    np.testing.assert_array_equal(filt.freq[...], 10.0)
    with pytest.raises(ValueError, match="l_max"):
        filt.kernels(17)
    with pytest.raises(ValueError, match="emb_dim"):
        m2_filter.HyenaFilterConfig(d_model=D, emb_dim=4)
    with pytest.raises(ValueError, match="linear_init"):
        m2_filter.HyenaFilterConfig(d_model=D, linear_init="xavier")


def test_config_validation(bert_mixer):
    with pytest.raises(ValueError, match="long_conv"):
        mm.M2SequenceMixerConfig(d_model=D, long_conv="ssm")
    with pytest.raises(ValueError, match="bidirectional"):
        mm.M2SequenceMixerConfig(d_model=D, bidirectional=True, long_conv="causal_monarch")
    with pytest.raises(ValueError, match="monarch_b2"):
        mm.M2SequenceMixerConfig.causal(D, 12, long_conv="causal_monarch", monarch_b2=5)
    with pytest.raises(ValueError, match="conv_impl"):
        mm.M2SequenceMixerConfig(d_model=D, conv_impl="cufft")
    with pytest.raises(ValueError, match="d_model"):
        mm.M2SequenceMixerConfig(d_model=0)
    with pytest.raises(ValueError, match="bidirectional"):
        mm.CausalM2Mixer(bert_mixer.cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nblocks"):
        mm.M2DimensionMixerConfig(d_model=10, d_ff=16, nblocks=4)
    with pytest.raises(ValueError, match="linear"):
        mm.M2DimensionMixerConfig(d_model=8, d_ff=16, linear="butterfly")
    with pytest.raises(ValueError, match="l_max"):
        bert_mixer(jnp.zeros((1, 17, D)))


def test_padding_fix_and_conv_impls(bert_mixer):
    x = jax.random.normal(jax.random.key(1), (2, 12, D))
    x = x.at[1, 7:].set(3.0)  # junk in the padded positions
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    alone = run(bert_mixer, x[1:, :7])[0]
    masked, plain = run(bert_mixer, x, mask_BL=mask), run(bert_mixer, x)
    np.testing.assert_allclose(masked[1, :7], alone, **F32_MODULE)  # padding does not change real tokens
    np.testing.assert_allclose(masked[0], plain[0], **F32_MODULE)
    assert np.max(np.abs(plain[1, :7] - alone)) > 1e-3  # upstream behaviour (no mask): padding leaks
    for impl in ("naive", "monarch"):  # the layer default is jnp_fft
        np.testing.assert_allclose(run(clone(bert_mixer, conv_impl=impl), x), plain, **F32_MODULE)


@pytest.mark.parametrize("variant", ["fft", "causal_monarch"])
def test_causal_mixer_is_causal(variant, causal_mixers):
    mixer = causal_mixers[variant]
    x = np.asarray(jax.random.normal(jax.random.key(2), (12, D)))
    with jax.enable_x64(True):  # the Jacobian is lower-triangular (up to float64 round-off)
        jac = jax.jit(jax.jacfwd(lambda v: mixer(v[None])[0]))(jnp.asarray(x, jnp.float64))  # (L, D, L, D)
        norm = np.abs(np.asarray(jac)).sum(axis=(1, 3))
        assert np.max(np.triu(norm, 1)) <= 1e-12 * np.max(norm)
    batch = np.repeat(x[None], 3, axis=0)
    for i, t in enumerate((0, 5, 10)):  # perturbing inputs after t never changes outputs <= t
        batch[i, t + 1 :] += 1.0
    out, base = run(mixer, batch), run(mixer, np.repeat(x[None], 3, axis=0))
    for i, t in enumerate((0, 5, 10)):
        np.testing.assert_allclose(out[i, : t + 1], base[i, : t + 1], **F32_OP)
        assert np.max(np.abs(out[i, t + 1 :] - base[i, t + 1 :])) > 1e-3


def test_causal_monarch_zero_basis_is_the_fft_form(causal_mixers):
    x = jax.random.normal(jax.random.key(1), (2, 14, D))
    a = run(causal_mixers["fft"], x)
    np.testing.assert_allclose(run(causal_mixers["causal_monarch_zero"], x), a, **F32_MODULE)  # (b) starts as (a)
    assert np.max(np.abs(run(causal_mixers["causal_monarch"], x) - a)) > 1e-3


def alone_outputs(mixer, x, docs):
    """Each ``(row, lo, hi)`` document of ``x`` run alone from position 0 (right zero-padding is exact: causal)."""
    L = x.shape[1]
    return run(mixer, jnp.stack([jnp.pad(x[r, lo:hi], ((0, L - hi + lo), (0, 0))) for r, lo, hi in docs]))


@pytest.mark.parametrize("variant", ["fft", "causal_monarch"])
def test_packed_documents_equal_separate_runs(variant, causal_mixers):
    mixer = causal_mixers[variant]
    x = jax.random.normal(jax.random.key(3), (2, 14, D))
    seg = jnp.array([[1] * 5 + [2] * 6 + [3] * 3, [0] * 3 + [7] * 8 + [0] * 3])  # 0 = padding
    y = run(mixer, x, segment_ids_BL=seg)
    docs = [(0, 0, 5), (0, 5, 11), (0, 11, 14), (1, 3, 11)]
    alone = alone_outputs(mixer, x, docs)
    for i, (row, lo, hi) in enumerate(docs):
        np.testing.assert_allclose(y[row, lo:hi], alone[i, : hi - lo], **F32_MODULE)
    np.testing.assert_array_equal(y[1, :3], 0.0)
    np.testing.assert_array_equal(y[1, 11:], 0.0)
    out = run(clone(mixer, segments_per_pass=2), x, segment_ids_BL=seg)  # three documents, two per pass
    np.testing.assert_allclose(out, y, **F32_MODULE)


@pytest.mark.parametrize("variant", ["fft", "causal_monarch"])
def test_more_documents_than_one_pass_holds(variant, causal_mixers):
    """The pipeline's layout (1, 2, 3, ... then 0 padding) with 7 documents, 2 per pass: exact, padding inert."""
    mixer = clone(causal_mixers[variant], segments_per_pass=2)
    x = jax.random.normal(jax.random.key(4), (2, 14, D))
    seg = jnp.array([[1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 7, 0, 0], [1] * 10 + [0] * 4])
    docs = [(0, 0, 2), (0, 2, 3), (0, 3, 6), (0, 6, 7), (0, 7, 9), (0, 9, 10), (0, 10, 12), (1, 0, 10)]
    y = run(mixer, x, segment_ids_BL=seg)
    junk = run(mixer, jnp.where((seg == 0)[..., None], 1e3, x), segment_ids_BL=seg)  # padding inputs never matter
    np.testing.assert_array_equal(junk, y)
    assert np.all(np.isfinite(y))
    alone = alone_outputs(mixer, x, docs)
    for i, (row, lo, hi) in enumerate(docs):
        np.testing.assert_allclose(y[row, lo:hi], alone[i, : hi - lo], **F32_MODULE)
    np.testing.assert_array_equal(y[0, 12:], 0.0)
    np.testing.assert_array_equal(y[1, 10:], 0.0)


def test_segment_ids_are_checked(causal_mixers):
    mixer, x = causal_mixers["fft"], jnp.zeros((1, 6, D))
    with pytest.raises(ValueError, match="CausalM2Mixer: segment_ids_BL: segment ids must be >= 0"):
        mixer(x, segment_ids_BL=jnp.array([[1, 1, 1, -1, -1, -1]]))
    with pytest.raises(ValueError, match="CausalM2Mixer: segment_ids_BL: row 0 reuses segment id 1 after a different"):
        mixer(x, segment_ids_BL=jnp.array([[1, 1, 2, 2, 1, 0]]))
    with pytest.raises(ValueError, match="segments_per_pass"):
        mm.M2SequenceMixerConfig.causal(D, 16, segments_per_pass=0)


def test_dimension_mixer_structure():
    cfg = mm.M2DimensionMixerConfig(d_model=16, d_ff=32)
    x = jax.random.normal(jax.random.key(4), (1, 3, 16))
    glu = build(mm.M2DimensionMixer, cfg)
    jac = jax.jit(jax.jacfwd(lambda v: glu.gated_layers(v)[0, 0, :32]))(x)[:, 0, 0, :]  # gated half vs inputs
    assert np.all(np.asarray(jac)[:, 8:] == 0) and np.any(np.asarray(jac)[:, :8] != 0)  # reads dims [0, D/2) only
    mon = build(mm.M2DimensionMixer, dataclasses.replace(cfg, linear="monarch"))
    ml = mon.gated_layers  # the paper's two-factor form: 16 -> 64, blocks of 4
    dense = monarch.monarch_to_dense(ml.w1[...], ml.w2[...])
    np.testing.assert_allclose(jax.jit(ml)(x), jnp.einsum("blo,io->bli", x, dense), **F32_OP)
    assert np.all(np.asarray(dense) != 0)  # mixes every channel (block size 4 >= 4 blocks)
    assert run(mon, x).shape == x.shape


def _loss(model, ids, mask):
    h = model(ids, attention_mask_BL=mask)
    logits = model.mlm_logits(h)
    target = jnp.sum(logits * jax.nn.one_hot(ids, logits.shape[-1]), axis=-1)  # a gather would need an out_sharding
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target) + jnp.mean(model.pooled(h, mask) ** 2)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    """One train-step's loss and gradients: unsharded vs data=2 x fsdp=2 x tensor=2 under fsdp_tp (M2-BERT, causal)."""
    cfg = M2BertConfig.tiny(n_layers=1)
    ids = jax.random.randint(jax.random.key(5), (4, 16), 0, cfg.vocab_size)
    mask = jnp.arange(16)[None, :] < jnp.array([[16], [9], [16], [12]])
    ccfg = mm.M2SequenceMixerConfig.causal(D, 16, long_conv="causal_monarch", filter_order=8)
    x = jax.random.normal(jax.random.key(6), (4, 16, D))
    step = jax.jit(jax.value_and_grad(_loss))
    cstep = jax.jit(jax.value_and_grad(lambda m, v: jnp.mean(m(v) ** 2)))
    ref = step(build(M2Bert, cfg), ids, mask), cstep(build(mm.CausalM2Mixer, ccfg), x)
    with sharding.use(sharding.make_mesh(data=2, fsdp=2, tensor=2), sharding.ShardingRules.fsdp_tp()):
        model = build(M2Bert, cfg)  # built inside jit: parameters are born sharded
        assert jax.typeof(model.layers[0].mixer.in_linear[...]).sharding.spec == jax.P("fsdp", None, "tensor")
        out = step(model, ids, mask), cstep(build(mm.CausalM2Mixer, ccfg), x)
    leaves, ref_leaves = jax.tree.leaves(out), jax.tree.leaves(ref)
    assert len(leaves) == len(ref_leaves) > 10
    for g, r in zip(leaves, ref_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), **F32_SHARDED)
