"""lcjax.layers.mamba2: config validation, init, decoding == forward, packing, long-context options, sharding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from lcjax import sharding
from lcjax.layers.mamba2 import LongContextConfig, LongContextStat, Mamba2, Mamba2Config
from tolerances import EXACT, F32_MODULE, F32_SHARDED

TINY = Mamba2Config(d_model=16, d_state=4, head_dim=8, n_groups=2, chunk_size=4)  # H = 4, E = 32


def make_mixer(cfg=TINY, seed=0, mesh=None):
    """A mixer with random weights drawn by numpy into ``nnx.eval_shape``'s skeleton.

    Building for real compiles one threefry kernel per parameter shape (seconds per config on 8 CPU devices);
    the upstream init itself is tested once, in ``test_init_matches_upstream_recipe``. Non-trivial D and norm
    weights (upstream inits them to ones), A = U(1, 16), softplus(dt_bias) in [1e-3, 1e-1].
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mamba2(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", "")) for k in path).strip("/")
        shape = leaf.shape
        if name == "A_log":
            v = np.log(rng.uniform(1.0, 16.0, shape))
        elif name == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            v = dt + np.log(-np.expm1(-dt))
        elif name == "D":
            v = rng.normal(size=shape)
        elif name == "norm":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "state_norm_max":
            v = np.full(shape, np.inf)
        elif name.startswith("longmamba"):
            v = np.zeros(shape)
        elif name == "out_proj":
            v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name.startswith(("in_proj/", "conv1d/")):
            v = rng.normal(size=shape) / np.sqrt(shape[0])
        else:  # biases
            v = 0.1 * rng.normal(size=shape)
        v = jnp.asarray(v, leaf.dtype)
        return v if mesh is None else jax.device_put(v, NamedSharding(mesh, leaf.sharding.spec))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


forward = jax.jit(lambda m, x, seq, state: m(x, seq_idx_BL=seq, state=state))
step = jax.jit(lambda m, x, state: m.step(x, state))


def inputs(rng, Bsz=2, L=11, D=16):
    return jnp.asarray(rng.normal(size=(Bsz, L, D)), jnp.float32)


@pytest.mark.parametrize(
    "field,kwargs,error",
    [("head_dim", dict(head_dim=12), ValueError), ("n_groups", dict(n_groups=3), ValueError),
     ("chunk_size", dict(chunk_size=0), ValueError), ("d_model", dict(d_model=-1), ValueError),
     ("dt_limit", dict(dt_limit=(0.1, 0.1)), ValueError), ("dt_min", dict(dt_min=0.0), ValueError),
     ("A_init_range", dict(A_init_range=(0.0, 2.0)), ValueError), ("impl", dict(impl="fast"), ValueError),
     ("norm_eps", dict(norm_eps=0.0), ValueError),
     # a wrong Python type is a TypeError (lcjax.checks; for "no" the suite's beartype hook fires first)
     ("d_state", dict(d_state=True), TypeError), ("rmsnorm", dict(rmsnorm="no"), TypeError),
     ("norm_eps", dict(norm_eps=float("nan")), ValueError)],
)  # fmt: skip
def test_config_validation(field, kwargs, error):
    with pytest.raises(error, match=field):
        dataclasses.replace(TINY, **kwargs)
    with pytest.raises(ValueError, match="decay_mult"):
        LongContextConfig(decay_mult=1.5)
    with pytest.raises(ValueError, match="longmamba_lengths"):
        LongContextConfig(longmamba_lengths=())


def test_presets_and_shapes():
    cfg = Mamba2Config.preset("780m")
    assert (cfg.d_inner, cfg.num_heads, cfg.conv_dim) == (3072, 48, 3328)  # HF in_proj rows 6448 = 2·3072+256+48
    abstract = nnx.eval_shape(lambda: Mamba2(cfg, rngs=nnx.Rngs(0)))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n_params == 6448 * 1536 + 3328 * 4 + 3328 + 3 * 48 + 3072 + 1536 * 3072
    with pytest.raises(ValueError, match="preset"):
        Mamba2Config.preset("1b")


def test_init_matches_upstream_recipe():
    cfg = dataclasses.replace(TINY, d_model=64, head_dim=4)  # 32 heads for the statistics
    m = Mamba2(cfg, rngs=nnx.Rngs(3))
    dt = jax.nn.softplus(m.dt_bias[...])
    assert bool(jnp.all(dt >= cfg.dt_min * (1 - 1e-5))) and bool(jnp.all(dt <= cfg.dt_max * (1 + 1e-5)))
    A = jnp.exp(m.A_log[...])
    assert m.A_log.dtype == jnp.float32 and bool(jnp.all((A >= 1.0) & (A <= 16.0)))
    np.testing.assert_array_equal(m.D[...], 1.0)
    np.testing.assert_array_equal(m.norm[...], 1.0)
    bound = 1 / math.sqrt(cfg.d_model)
    assert float(jnp.max(jnp.abs(m.in_proj["z"][...]))) <= bound and float(jnp.max(jnp.abs(m.conv1d["x"][...]))) <= 0.5
    names = sharding.logical_metadata(m)
    assert names["in_proj"]["x"] == ("embed", "heads", "head_dim")
    assert names["out_proj"] == ("heads", "head_dim", "embed")
    assert names["conv1d"]["B"] == ("conv", None, "ssm_state") and names["A_log"] == ("heads",)
    assert not nnx.state(m, LongContextStat)  # no statistics unless an option needs them


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_forward_equals_step_decoding(rng, impl):
    m = make_mixer(dataclasses.replace(TINY, impl=impl))
    x = inputs(rng)
    y, final = forward(m, x, None, None)
    state = m.init_state(2)
    ys = []
    for t in range(x.shape[1]):
        y_t, state = step(m, x[:, t], state)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, axis=1), y, **F32_MODULE)
    for a, b in zip(state, final):
        np.testing.assert_allclose(a, b, **F32_MODULE)


def test_prefill_then_continue_equals_full(rng):
    m = make_mixer()
    x = inputs(rng, L=13)
    y, final = forward(m, x, None, None)
    y1, s = forward(m, x[:, :2], None, None)  # shorter than the conv kernel
    y2, s = forward(m, x[:, 2:9], None, s)  # multi-token continuation (chunked, initial state + conv history)
    y3, s = step(m, x[:, 9], s)
    y4, s = forward(m, x[:, 10:], None, s)
    np.testing.assert_allclose(jnp.concatenate([y1, y2, y3[:, None], y4], axis=1), y, **F32_MODULE)
    for a, b in zip(s, final):
        np.testing.assert_allclose(a, b, **F32_MODULE)


def test_packed_equals_separate_runs(rng):
    m = make_mixer()
    lengths = (3, 6, 5)
    x = inputs(rng, Bsz=1, L=sum(lengths))
    seq = jnp.asarray([np.repeat([0, 1, 2], lengths)], jnp.int32)
    prefix = forward(m, inputs(rng, Bsz=1, L=5), None, None)[1]  # a carried state feeds the first document
    y, state = forward(m, x, seq, prefix)
    start = 0
    for i, n in enumerate(lengths):
        y_i, s_i = forward(m, x[:, start : start + n], None, prefix if i == 0 else None)
        np.testing.assert_allclose(y[:, start : start + n], y_i, **F32_MODULE)
        start += n
    for a, b in zip(state, s_i):  # conv history and SSM state of the last document only
        np.testing.assert_allclose(a, b, **F32_MODULE)


def test_padding_run_is_its_own_document(rng):
    """Segment ids [1, 1, 2, 0, 0]: the padding run (0) is a run of its own, so doc 2's output is that of doc 2 run
    alone and does not depend on the padding (nor does the padding see doc 2's state: its output is the padding run
    alone). A padding run first, [0, 0, 1, 1, 1], does not leak into the document after it either."""
    m = make_mixer()
    x = inputs(rng, Bsz=2, L=5)
    seq = jnp.asarray([[1, 1, 2, 0, 0], [0, 0, 1, 1, 1]], jnp.int32)
    y, _ = forward(m, x, seq, None)
    other_padding = x.at[0, 3:].set(7.0).at[1, :2].set(-3.0)
    y_other, _ = forward(m, other_padding, seq, None)
    alone = lambda b, sl: forward(m, x[b : b + 1, sl], None, None)[0][0]  # noqa: E731
    np.testing.assert_allclose(y[0, 2:3], alone(0, slice(2, 3)), **F32_MODULE)  # doc 2 == doc 2 alone
    np.testing.assert_allclose(y_other[0, :3], y[0, :3], **EXACT)  # docs 1, 2 do not depend on the padding
    np.testing.assert_allclose(y[0, 3:], alone(0, slice(3, 5)), **F32_MODULE)  # padding: its own run
    np.testing.assert_allclose(y[1, 2:], alone(1, slice(2, 5)), **F32_MODULE)
    np.testing.assert_allclose(y_other[1, 2:], y[1, 2:], **F32_MODULE)


def test_bad_call_inputs_raise(rng):
    m = make_mixer()
    with pytest.raises(ValueError, match="d_model"):
        m(jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match="seq_idx_BL"):
        m(jnp.zeros((1, 3, 16)), seq_idx_BL=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="Mamba2: seq_idx_BL: segment ids must be >= 0"):
        m(jnp.zeros((1, 3, 16)), seq_idx_BL=jnp.asarray([[1, -1, -1]], jnp.int32))
    with pytest.raises(ValueError, match="calibrate_long_context"):
        m.calibrate_long_context(jnp.zeros((1, 3, 16)))


# ---- long-context options -----------------------------------------------------------------------------------------
def with_long_context(**kw):
    return dataclasses.replace(TINY, long_context=LongContextConfig(**kw))


def copy_params(src, dst):
    nnx.update(dst, nnx.state(src, nnx.Param))
    return dst


def test_long_context_options_off_are_bit_identical(rng):
    """Enabled but uncalibrated (τ = inf, no global heads) and neutral knobs: exactly the plain mixer."""
    base = make_mixer()
    neutral = copy_params(base, make_mixer(with_long_context(state_norm=True, longmamba=True, longmamba_min_len=1), 9))
    x = inputs(rng, L=9)
    y0, s0 = forward(base, x, None, None)
    y1, s1 = forward(neutral, x, None, None)
    np.testing.assert_allclose(y1, y0, **EXACT)
    for a, b in zip(s1, s0):
        np.testing.assert_allclose(a, b, **EXACT)
    ys0, _ = step(base, x[:, 0], s0)
    ys1, _ = step(neutral, x[:, 0], s1)
    np.testing.assert_allclose(ys1, ys0, **EXACT)


def test_stuffed_mamba_knobs(rng):
    base = make_mixer()
    x = inputs(rng, L=9)
    a, v = 0.5, 1.3  # A <- a·A is A_log + ln a; dt_bias <- v·dt_bias
    knobs = copy_params(base, make_mixer(with_long_context(a_mult=a, dt_bias_mult=v), 5))
    edited = copy_params(base, make_mixer(seed=5))
    edited.A_log.set_value(base.A_log[...] + math.log(a))
    edited.dt_bias.set_value(base.dt_bias[...] * v)
    np.testing.assert_allclose(forward(knobs, x, None, None)[0], forward(edited, x, None, None)[0], **F32_MODULE)


def test_state_norm_calibration_and_clipping(rng):
    cfg = with_long_context(state_norm=True, state_norm_chunk=2, decay_mult=0.99, b_mult=0.7)
    m = copy_params(make_mixer(), make_mixer(cfg, 5))
    x_cal = inputs(rng, Bsz=1, L=4)
    m.calibrate_long_context(x_cal)
    ref = forward(m, x_cal, None, None)[1].ssm  # nothing clipped yet at calibration: τ was inf
    tau = m.state_norm_max[...]
    assert bool(jnp.all(jnp.isfinite(tau)))
    x = inputs(rng, Bsz=2, L=15) * 3.0
    y_c, s_c = forward(m, x, None, None)
    m_naive = copy_params(m, make_mixer(dataclasses.replace(cfg, impl="naive"), 5))
    m_naive.state_norm_max.set_value(tau)
    y_n, s_n = forward(m_naive, x, None, None)
    np.testing.assert_allclose(y_c, y_n, **F32_MODULE)
    np.testing.assert_allclose(s_c.ssm, s_n.ssm, **F32_MODULE)
    norms = jnp.sqrt(jnp.sum(s_c.ssm**2, axis=(2, 3)))
    assert bool(jnp.all(norms <= tau[None] * (1 + 1e-5)))
    assert float(jnp.max(jnp.abs(jnp.sqrt(jnp.sum(ref**2, axis=(2, 3)))[0] - tau))) < 1e-5


def test_longmamba_filters_global_heads_only(rng):
    cfg = with_long_context(longmamba=True, longmamba_lengths=(4, 16, 32), longmamba_min_len=12, longmamba_c=0.5)
    base = make_mixer()
    m = copy_params(base, make_mixer(cfg, 5))
    m.calibrate_long_context(inputs(rng, Bsz=2, L=8))
    theta = m.longmamba_threshold[...]
    np.testing.assert_array_equal(theta[0], 0.0)  # 4 <= the calibration length: no filtering
    assert bool(jnp.all(theta[1:] > 0))
    m.longmamba_decay.set_value(jnp.asarray([0.9, 0.1, 0.9, 0.1]))  # heads 0, 2 global; 1, 3 local
    x = inputs(rng, Bsz=2, L=14)
    _, s_base = forward(base, x, None, None)
    _, s_lm = forward(m, x, None, None)
    np.testing.assert_array_equal(s_lm.ssm[:, 1::2], s_base.ssm[:, 1::2])  # local heads: bit-identical
    assert float(jnp.max(jnp.abs(s_lm.ssm[:, ::2] - s_base.ssm[:, ::2]))) > 1e-4
    short = inputs(rng, Bsz=2, L=11)  # below longmamba_min_len: the plain mixer
    np.testing.assert_allclose(forward(m, short, None, None)[0], forward(base, short, None, None)[0], **EXACT)


# ---- sharding -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_groups,grads", [(2, True), (8, False)])
def test_sharded_equals_unsharded(rng, n_groups, grads):
    """fsdp x tensor mesh: G = 2 < 4 head shards (each group repeated per shard) and G = 8 (groups sharded)."""
    cfg = Mamba2Config(d_model=32, d_state=4, head_dim=8, n_groups=n_groups, chunk_size=4)  # 8 heads
    m = make_mixer(cfg)
    x = inputs(rng, Bsz=2, L=7, D=32)
    seq = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [0] * 7], jnp.int32)
    loss = lambda m, x: jnp.sum(jnp.sin(m(x, seq_idx_BL=seq)[0]))
    y_ref, s_ref = forward(m, x, seq, None)
    g_ref = jax.jit(jax.grad(loss))(m, x) if grads else None
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    with sharding.use(mesh, sharding.ShardingRules.fsdp_tp()):
        m_sh = make_mixer(cfg, mesh=mesh)  # the same weights, placed by the parameters' logical names
        assert "tensor" in str(jax.typeof(m_sh.in_proj["x"][...]).sharding.spec)
        y, s = forward(m_sh, x, seq, None)
        g = jax.jit(jax.grad(loss))(m_sh, x) if grads else None
    np.testing.assert_allclose(y, y_ref, **F32_SHARDED)
    np.testing.assert_allclose(s.ssm, s_ref.ssm, **F32_SHARDED)
    if grads:
        for a, b in zip(jax.tree.leaves(nnx.state(g)), jax.tree.leaves(nnx.state(g_ref))):
            np.testing.assert_allclose(a, b, **F32_SHARDED)
