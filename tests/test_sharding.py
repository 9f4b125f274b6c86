"""lcjax.sharding: mesh construction, rule presets, logical -> physical resolution, param/shard helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from lcjax import sharding
from lcjax.sharding import ShardingRules


def test_make_mesh_fills_rest_and_is_explicit():
    mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert all(t == AxisType.Explicit for t in mesh.axis_types)
    assert sharding.make_mesh(context=-1).shape["context"] == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=3), "multiply to 3"),
        (dict(data=-1, fsdp=-1), "only one axis may be -1"),
        (dict(data=3, fsdp=-1), "not divisible"),
        (dict(tensor=0), "tensor=0"),
    ],
)
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**kwargs)


def test_presets_and_combination():
    assert ShardingRules.single().to_pspec("act_batch", "embed") == P(None, None)
    assert ShardingRules.dp().to_pspec("act_batch", "act_seq") == P("data", None)
    assert ShardingRules.fsdp().to_pspec("embed", "mlp") == P("fsdp", None)
    assert ShardingRules.fsdp_tp().to_pspec("embed", "mlp") == P("fsdp", "tensor")
    combined = ShardingRules.fsdp() | ShardingRules.context_parallel()
    assert combined.to_pspec("act_batch", "act_seq", "act_embed") == P(("data", "fsdp"), "context", None)
    assert ShardingRules.from_name("fsdp+context_parallel") == combined
    assert ShardingRules(embed=("tensor", "fsdp")).embed == ("fsdp", "tensor")  # canonical mesh order


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ShardingRules(embed="model"), "unknown mesh axis 'model'"),
        (lambda: ShardingRules(embed=("fsdp", "fsdp")), "repeated"),
        (lambda: ShardingRules.fsdp_tp().to_pspec("heads", "mlp"), "both map to mesh axis 'tensor'"),
        (lambda: ShardingRules().to_pspec("hidden"), "unknown logical axis 'hidden'"),
        (lambda: ShardingRules.from_name("fsdp+zero3"), "unknown preset 'zero3'"),
    ],
)
def test_rules_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_flax_rules_cover_every_logical_axis():
    names = [name for name, _ in ShardingRules.fsdp_tp().as_flax_rules()]
    assert names == list(sharding.LOGICAL_AXES)


def test_param_without_mesh_keeps_names_only():
    p = sharding.param(jnp.ones((4, 6)), "embed", "mlp")
    assert p.get_metadata()["out_sharding"] == ("embed", "mlp")
    x = jnp.ones((2, 3))
    assert sharding.shard(x, "act_batch", None) is x


def test_param_errors():
    with pytest.raises(ValueError, match="rank 2"):
        sharding.param(jnp.ones((4, 6)), "embed")
    with pytest.raises(ValueError, match="unknown parameter axis 'act_batch'"):
        sharding.param(jnp.ones((4,)), "act_batch")
    with pytest.raises(ValueError, match="rank 2"):
        sharding.shard(jnp.ones((4, 6)), "act_batch")


def test_param_born_sharded_under_mesh_and_same_metadata_as_without():
    with sharding.use(sharding.make_mesh(fsdp=4, tensor=2), ShardingRules.fsdp_tp()):
        p = jax.jit(lambda: sharding.param(jnp.ones((8, 16)), "embed", "mlp"))()
        assert p[...].sharding.spec == P("fsdp", "tensor")
        meta_mesh = p.get_metadata()
    assert meta_mesh == sharding.param(jnp.ones((8, 16)), "embed", "mlp").get_metadata()


def test_shard_reshards_and_checks_divisibility():
    with sharding.use(sharding.make_mesh(data=2, context=4), ShardingRules.context_parallel()):
        y = jax.jit(lambda x: sharding.shard(x, "act_batch", "act_seq"))(jnp.ones((2, 8)))
        assert y.sharding.spec == P("data", "context")
        with pytest.raises(ValueError, match="'act_seq' of size 6 is not divisible"):
            sharding.shard(jnp.ones((2, 6)), "act_batch", "act_seq")


def test_read_gathers_fsdp_axes_keeps_tensor_axes():
    with sharding.use(sharding.make_mesh(fsdp=4, tensor=2), ShardingRules.fsdp_tp()):
        p = jax.jit(lambda: sharding.param(jnp.arange(128.0).reshape(8, 16), "embed", "mlp"))()
        w = jax.jit(lambda: sharding.read(p))()
        assert w.sharding.spec == P(None, "tensor")
        np.testing.assert_array_equal(np.asarray(w), np.arange(128.0).reshape(8, 16))


def test_shard_map_single_device_path_and_mesh_path():
    g = sharding.shard_map(lambda x: x + 1, in_specs=(("act_batch", "act_seq"),), out_specs=("act_batch", "act_seq"))
    np.testing.assert_array_equal(g(jnp.zeros((2, 4))), 1.0)
    with sharding.use(sharding.make_mesh(data=2, context=4), ShardingRules.context_parallel()):
        h = sharding.shard_map(
            lambda x: x + jax.lax.axis_index("context"), in_specs=(("act_batch", "act_seq"),),
            out_specs=("act_batch", "act_seq"),
        )  # fmt: skip
        out = jax.jit(h)(jnp.zeros((2, 8)))
        assert sharding.mesh_axes("act_seq") == ("context",) and sharding.axis_size("act_seq") == 4
    np.testing.assert_array_equal(np.asarray(out), np.repeat(np.arange(4.0), 2)[None].repeat(2, 0))


def test_module_built_under_mesh_is_sharded():
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.w = sharding.param(jax.random.normal(rngs.params(), (8, 4)), "embed", "heads")

    with sharding.use(sharding.make_mesh(fsdp=2, tensor=4), ShardingRules.fsdp_tp()):
        m = jax.jit(lambda: Two(nnx.Rngs(0)))()
        assert m.w[...].sharding.spec == P("fsdp", "tensor")


def test_make_mesh_rejects_bool_sizes():
    with pytest.raises(TypeError, match="make_mesh: data must be an int"):
        sharding.make_mesh(data=True)


def test_jit_keys_the_cache_on_the_active_rules():
    """A function traced under one rule set is retraced (not replayed) under another; jax.jit alone replays."""
    traces = []

    def f(x, *, scale):
        traces.append(sharding.current_rules())
        return sharding.shard(x * scale, "act_batch", "act_seq")

    ours = sharding.jit(f, static_argnames="scale")
    plain = jax.jit(f, static_argnames="scale")
    mesh = sharding.make_mesh(data=2, context=4)
    x = jnp.ones((4, 8))
    specs = {}
    for name, fn in (("ours", ours), ("plain", plain)):
        for rules in (ShardingRules.dp(), ShardingRules.context_parallel(), ShardingRules.dp()):
            with sharding.use(mesh, rules):
                specs.setdefault(name, []).append(fn(x, scale=2.0).sharding.spec)
    assert specs["ours"] == [P("data", None), P("data", "context"), P("data", None)]
    assert specs["plain"][1] == P("data", None)  # the stale trace that sharding.jit exists to prevent
    assert len(traces) == 2 + 1  # ours: dp and context_parallel once each (cache hit on the repeat); plain: once


def test_jit_as_decorator_keeps_donation_and_lower():
    @sharding.jit(donate_argnames="x")
    def g(x, y):
        return x + y

    np.testing.assert_array_equal(g(jnp.ones(3), jnp.ones(3)), 2 * np.ones(3))
    assert "add" in g.lower(jnp.ones(3), jnp.ones(3)).as_text()
