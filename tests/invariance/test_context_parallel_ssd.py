"""Context-parallel Mamba-2 == one device: the SSD state passing (outputs, final state, gradients; directly and
through ``ssd(impl="context_parallel")``), the conv halo, and the Mamba2 layer, which switches to them by itself when
the mesh shards ``act_seq`` (alone, with data and with tensor parallelism). Packed documents (seq_idx) have
boundaries both inside shards and exactly on shard boundaries."""

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax import sharding
from lcjax.layers.mamba2 import Mamba2, Mamba2Config, Mamba2State
from lcjax.ops import ssd as ssd_ops
from lcjax.ops import ssd_context_parallel as ssd_cp
from lcjax.ops.conv import causal_conv1d
from lcjax.ops.ssd_context_parallel import causal_conv1d_context_parallel, conv_halo
from tests.tolerances import F32_SHARDED

B, L, H, Pd, G, N = 2, 32, 4, 3, 2, 5
SEQ = np.asarray([[0] * 8 + [1] * 13 + [2] * 11, [0] * 16 + [1] * 16], np.int32)  # boundaries at 8, 21 and 16


def ssd_inputs(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(x=f(B, L, H, Pd), dt=(0.3 * np.exp(0.5 * f(B, L, H))).astype(np.float32), A=-np.exp(f(H)),
                B=f(B, L, G, N), C=f(B, L, G, N), D=f(H), S0=f(B, H, Pd, N), dy=f(B, L, H, Pd), dF=f(B, H, Pd, N))


def seq_mesh(n):
    return jax.make_mesh((n,), ("ctx",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])


def _grads(f, a, seq, **kw):
    """(y, final, grads wrt x, dt, A, B, C, D, S0) of loss = <y, dy> + <final, dF>."""
    def loss(x, dt, A, B_, C, D, S0):
        y, F = f(x, dt, A, B_, C, D, S0, seq, **kw)
        return jnp.sum(y * a["dy"]) + jnp.sum(F * a["dF"]), (y, F)

    names = ("x", "dt", "A", "B", "C", "D", "S0")
    (_, (y, F)), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*(a[k] for k in names))
    return [np.asarray(t) for t in (y, F, *g)]


def one_device(x, dt, A, B_, C, D, S0, seq, *, impl, with_seq, with_s0):
    return ssd_ops.ssd(x, dt, A, B_, C, chunk_size=4, D_H=D, initial_state_BHPN=S0 if with_s0 else None,
                       seq_idx_BL=seq if with_seq else None, impl=impl)


def ssd_context_parallel(*args, **kwargs):
    """The per-shard state passing (call inside shard_map), reached through the one SSD entry point."""
    return ssd_ops.ssd(*args, impl="context_parallel", **kwargs)


def sharded(x, dt, A, B_, C, D, S0, seq, *, mesh, with_seq, with_s0):
    sp, rep = P(None, "ctx"), P()

    def local(x, dt, A, B_, C, D, S0, seq):
        return ssd_context_parallel(x, dt, A, B_, C, axis_name="ctx", chunk_size=4, D_H=D,
                                    initial_state_BHPN=S0 if with_s0 else None, seq_idx_BL=seq if with_seq else None)

    return jax.shard_map(local, mesh=mesh, in_specs=(sp, sp, rep, sp, sp, rep, rep, sp), out_specs=(sp, rep),
                         check_vma=False)(x, dt, A, B_, C, D, S0, seq)


@pytest.mark.parametrize("n,with_seq,with_s0,impl", [(4, True, True, "chunked"), (8, False, False, "naive")])
def test_ssd_context_parallel_equals_one_device(n, with_seq, with_s0, impl):
    a = ssd_inputs(n)
    seq = jnp.asarray(SEQ)
    want = _grads(one_device, {k: jnp.asarray(v) for k, v in a.items()}, seq, impl=impl, with_seq=with_seq,
                  with_s0=with_s0)  # fmt: skip
    mesh = seq_mesh(n)
    sp = NamedSharding(mesh, P(None, "ctx"))
    with jax.set_mesh(mesh):
        put = {k: jax.device_put(v, sp if v.ndim >= 3 and v.shape[1] == L else NamedSharding(mesh, P()))
               for k, v in a.items()}  # fmt: skip
        got = _grads(sharded, put, jax.device_put(seq, sp), mesh=mesh, with_seq=with_seq, with_s0=with_s0)
    for name, g, w in zip(("y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dS0"), got, want):
        if name == "dS0" and not with_s0:
            continue
        np.testing.assert_allclose(g, w, **F32_SHARDED, err_msg=name)


def test_ssd_collectives_are_independent_of_length():
    a = ssd_inputs()
    mesh = seq_mesh(4)
    sp = NamedSharding(mesh, P(None, "ctx"))
    with jax.set_mesh(mesh):
        put = {k: jax.device_put(v, sp if v.ndim >= 3 and v.shape[1] == L else NamedSharding(mesh, P()))
               for k, v in a.items()}  # fmt: skip
        args = [put[k] for k in ("x", "dt", "A", "B", "C", "D", "S0")]
        jaxpr = jax.make_jaxpr(lambda *xs: sharded(*xs, jax.device_put(jnp.asarray(SEQ), sp), mesh=mesh,
                                                   with_seq=True, with_s0=True))(*args).jaxpr
    gathers = []

    def walk(j):
        for e in j.eqns:
            assert e.primitive.name != "ppermute"
            if e.primitive.name == "all_gather":
                gathers.append(e.outvars[0].aval.shape)
            for p in e.params.values():
                for sub in p if isinstance(p, list | tuple) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                        walk(sub.jaxpr if hasattr(sub, "jaxpr") else sub)

    walk(jaxpr)
    # (first, last) document ids, per-shard final states and total decays: nothing has a length axis
    assert sorted(gathers) == sorted([(4, B, 2), (4, B, H, Pd, N), (4, B, H)])


def test_conv_halo_equals_one_device_conv():
    r = np.random.default_rng(1)
    W = 4
    x = jnp.asarray(r.normal(size=(B, L, H, Pd)), jnp.float32)
    w = jnp.asarray(r.normal(size=(W, H, Pd)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(H, Pd)), jnp.float32)
    hist = jnp.asarray(r.normal(size=(B, W - 1, H, Pd)), jnp.float32)
    # shards of T = 8: boundaries 1 and 2 tokens before a shard start (the halo is partly in the old document), one
    # exactly on a shard start and one inside a shard
    seq = jnp.asarray([[0] * 15 + [1] * 9 + [2] * 8, [0] * 6 + [1] * 10 + [2] * 5 + [3] * 11], jnp.int32)
    dy = jnp.asarray(r.normal(size=x.shape), jnp.float32)
    dh = jnp.asarray(r.normal(size=hist.shape), jnp.float32)

    def loss(conv, x, w, hist):
        y, new = conv(x, w, bias, history_BWE=hist, seq_idx_BL=seq)
        return jnp.sum(y * dy) + jnp.sum(new * dh), (y, new)

    vg = lambda conv: jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)  # noqa: E731
    (_, want), g_want = vg(causal_conv1d)(causal_conv1d, x, w, hist)
    cp_conv = lambda *a, **kw: causal_conv1d_context_parallel(*a, channel_names=("act_heads", None), **kw)  # noqa: E731
    with sharding.use(sharding.make_mesh(data=2, context=4), sharding.ShardingRules.context_parallel()):
        (_, got), g_got = vg(cp_conv)(cp_conv, x, w, hist)
    for g, ww in zip((*got, *g_got), (*want, *g_want)):
        np.testing.assert_allclose(g, ww, **F32_SHARDED)


def test_bad_inputs():
    a = {k: jnp.asarray(v) for k, v in ssd_inputs().items()}
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"])
    with pytest.raises(ValueError, match="max_state_norm_H"):
        ssd_context_parallel(*args, axis_name=None, chunk_size=4, max_state_norm_H=jnp.ones(H))
    with pytest.raises(ValueError, match="seq_idx_BL"):
        ssd_context_parallel(*args, axis_name=None, chunk_size=4, seq_idx_BL=jnp.zeros((B, L - 1), jnp.int32))
    with pytest.raises(ValueError, match="axis_name"):
        ssd_context_parallel(*args, axis_name=7, chunk_size=4)
    with pytest.raises(ValueError, match="axis_name.*only impl='context_parallel'"):
        ssd_ops.ssd(*args, chunk_size=4, impl="chunked", axis_name="ctx")
    with pytest.raises(ValueError, match="max_state_norm_H"):
        ssd_ops.ssd(*args, chunk_size=4, impl="context_parallel", axis_name=None, max_state_norm_H=jnp.ones(H))
    with pytest.raises(ValueError, match="Mamba2Config.impl='context_parallel'"):
        dataclasses.replace(MIXER, impl="context_parallel")
    with pytest.raises(ValueError, match="must be >= width - 1"):
        conv_halo(a["x"][:, :2], axis_name=None, width=4)
    with sharding.use(sharding.make_mesh(context=8), sharding.ShardingRules.context_parallel()):
        with pytest.raises(ValueError, match="divisible by the context-parallel size 8"):
            causal_conv1d_context_parallel(a["x"][:, :12], jnp.ones((4, H, Pd)), channel_names=("act_heads", None))


def test_sequence_axis_rule_and_sharded_entry_checks():
    """When a mixer call runs sequence-parallel (no compile: the decision and the argument checks only)."""
    a = {k: jnp.asarray(v) for k, v in ssd_inputs().items()}
    inputs = ssd_ops.SSDInputs(a["x"][:, :12], a["dt"][:, :12], a["A"], a["B"][:, :12], a["C"][:, :12], chunk_size=4)
    assert ssd_cp.sequence_axis(40, conv_width=4) is None  # no mesh
    with sharding.use(sharding.make_mesh(context=8), sharding.ShardingRules.context_parallel()):
        assert ssd_cp.sequence_axis(40, conv_width=4) == "act_seq"
        assert ssd_cp.sequence_axis(36, conv_width=4) is None  # L not divisible by 8
        assert ssd_cp.sequence_axis(16, conv_width=4) is None  # shards of 2 < d_conv - 1
        assert ssd_cp.sequence_axis(1, conv_width=4) is None  # a decoding step
        assert ssd_cp.sequence_axis(40, conv_width=4, state_clipping=True) is None
        with pytest.raises(ValueError, match="divisible by the context-parallel size 8"):
            ssd_cp.ssd_sharded(inputs, seq="act_seq")
        with pytest.raises(ValueError, match="ssd_sharded: seq='act_batch' is not allowed"):
            ssd_cp.ssd_sharded(inputs, seq="act_batch")
        with pytest.raises(ValueError, match="ssd_sharded: impl='fast' is not allowed"):
            ssd_cp.ssd_sharded(inputs, impl="fast")
    with sharding.use(sharding.make_mesh(data=2, context=4), sharding.ShardingRules.context_parallel()):
        with pytest.raises(ValueError, match="max_state_norm_H"):
            ssd_cp.ssd_sharded(inputs._replace(max_state_norm_H=jnp.ones(H)), seq="act_seq")
    with pytest.raises(TypeError, match="conv_width"):  # the suite's beartype hook, or lcjax.checks without it
        ssd_cp.sequence_axis(40, conv_width=4.0)


# ---- the Mamba2 layer -------------------------------------------------------------------------------------------
MIXER = Mamba2Config(d_model=16, d_state=4, head_dim=8, n_groups=2, chunk_size=4)  # H = 4, E = 32
CP = sharding.ShardingRules.context_parallel()


def mixer(mesh=None, seed=0) -> Mamba2:
    """Random weights drawn by numpy into ``nnx.eval_shape``'s skeleton, placed by their logical names under a mesh."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mamba2(MIXER, rngs=nnx.Rngs(0))))
    r = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[0], "key", ""))
        if name == "A_log":
            v = np.log(r.uniform(1.0, 16.0, leaf.shape))
        elif name == "dt_bias":
            dt = np.exp(r.uniform(np.log(1e-3), np.log(1e-1), leaf.shape))
            v = dt + np.log(-np.expm1(-dt))
        else:
            v = (1.0 if name == "norm" else 0.0) + 0.3 * r.normal(size=leaf.shape)
        v = jnp.asarray(v, leaf.dtype)
        return v if mesh is None else jax.device_put(v, NamedSharding(mesh, leaf.sharding.spec))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def layer_inputs(L, seed=1):
    """x, packed document ids (boundaries at 9, 20 and L/2: inside shards and on a shard start), a random state."""
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    seq = jnp.asarray([np.repeat([0, 1, 2], [9, 11, L - 20]), np.repeat([0, 1], [L // 2, L - L // 2])], jnp.int32)
    shapes = [(2, 3, 4, 8), (2, 3, 2, 4), (2, 3, 2, 4), (2, 4, 8, 4)]  # conv_x, conv_B, conv_C, ssm
    return f(2, L, 16), seq, Mamba2State(*(f(*s) for s in shapes))


forward = jax.jit(lambda m, x, seq, state: m(x, seq_idx_BL=seq, state=state))


def per_device_dims(compiled_text: str) -> set[int]:
    """Every dimension of every per-device array shape in a compiled (SPMD-partitioned) HLO module."""
    return {int(d) for shape in re.findall(r"\[([\d,]+)\]", compiled_text) for d in shape.split(",") if d}


@pytest.mark.parametrize("mesh_shape,rules", [
    (dict(context=8), CP),
    (dict(data=2, context=4), CP),
    (dict(context=4, tensor=2), CP | sharding.ShardingRules.tp()),
])  # fmt: skip
def test_mamba2_layer_context_parallel_equals_one_device(mesh_shape, rules):
    """Outputs and the final state (SSM state and conv histories) from a random initial state, with packed
    documents. The compiled program never holds the whole sequence on one device (no per-device shape has the
    global length L = 40) and the conv halo is a collective-permute. (Gradients: the LM test, tests/
    test_context_parallel_lm.py, and the op test above.)"""
    L = 40
    x, seq, state = layer_inputs(L)
    y_1, new_1 = forward(mixer(), x, seq, state)
    mesh = sharding.make_mesh(**mesh_shape)
    with sharding.use(mesh, rules):
        m_n, seq_n = mixer(mesh), sharding.shard(seq, "act_batch", "act_seq")
        compiled = forward.lower(m_n, x, seq_n, state).compile().as_text()
        y, new = forward(m_n, x, seq_n, state)
    assert L not in per_device_dims(compiled) and "collective-permute" in compiled
    np.testing.assert_allclose(y, y_1, **F32_SHARDED)
    for name, a, b in zip(Mamba2State._fields, new, new_1):
        np.testing.assert_allclose(a, b, **F32_SHARDED, err_msg=name)


def test_mamba2_layer_gathers_when_the_sequence_cannot_be_split():
    """L = 36 on 8 context shards (not divisible) and decoding steps: the sequence is gathered (documented fallback,
    as in the attention layer) and the results equal one device."""
    L = 36
    x, seq, state = layer_inputs(L)
    m = mixer()
    y_1, new_1 = forward(m, x, seq, state)
    step = jax.jit(lambda m, x, state: m.step(x, state))
    ys_1, s_1 = step(m, x[:, 0], new_1)
    mesh = sharding.make_mesh(context=8)
    with sharding.use(mesh, CP):
        m_n = mixer(mesh)
        compiled = forward.lower(m_n, x, seq, state).compile().as_text()
        y, new = forward(m_n, x, seq, state)
        ys, s = step(m_n, x[:, 0], new)
    assert L in per_device_dims(compiled)
    for a, b in zip((y, *new, ys, *s), (y_1, *new_1, ys_1, *s_1)):
        np.testing.assert_allclose(a, b, **F32_SHARDED)
