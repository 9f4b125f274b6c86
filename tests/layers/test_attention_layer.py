"""lcjax.layers.attention: the layer's input and mesh checks (its math is tested in tests/ops and tests/models)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lcjax import sharding
from lcjax.layers.attention import Attention, AttentionConfig

CFG = AttentionConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, impl="reference")


def test_wrong_input_width_names_d_model():
    layer = Attention(CFG, rngs=nnx.Rngs(0))
    message = "Attention: x_BLD must be [batch, length, AttentionConfig.d_model=16], got shape (1, 3, 12)"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(jnp.zeros((1, 3, 12)))


def test_negative_segment_ids_are_refused():
    layer = Attention(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Attention: segment_ids_BL: segment ids must be >= 0"):
        layer(jnp.zeros((1, 3, 16)), segment_ids_BL=jnp.asarray([[1, 1, -1]]))


@pytest.mark.parametrize(
    "cfg, field, n",
    [(CFG, "n_kv_heads", 2), (AttentionConfig(d_model=16, n_heads=6, n_kv_heads=2, head_dim=8), "n_heads", 6)],
)
def test_heads_not_divisible_by_the_tensor_axis(cfg, field, n):
    message = f"AttentionConfig.{field}={n} must be divisible by the size 4 of the mesh axes ('tensor',)"
    with sharding.use(sharding.make_mesh(data=2, tensor=4), sharding.ShardingRules.tp()):
        with pytest.raises(ValueError, match=re.escape(message)):
            jax.jit(lambda: Attention(cfg, rngs=nnx.Rngs(0)))()
    layer = Attention(cfg, rngs=nnx.Rngs(0))  # built without a mesh, called under one
    with sharding.use(sharding.make_mesh(data=2, tensor=4), sharding.ShardingRules.tp()):
        with pytest.raises(ValueError, match=re.escape(message)):
            layer(jnp.zeros((2, 3, 16)))


def test_ring_cache_equals_full_cache_when_the_window_wraps():
    """A window-4 layer decoded through a RingKVCache of 4 slots (chunks shorter and longer than the window, two
    documents) equals the uncached full-sequence call."""
    import numpy as np

    from lcjax.layers.attention import KVCache, RingKVCache
    from tests.tolerances import F32_MODULE

    cfg = AttentionConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, window=4, impl="reference")
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 15, 16))
    seg = jnp.asarray([[1] * 9 + [2] * 6, [1] * 15], jnp.int32)
    pos = jnp.where(seg == 2, jnp.arange(15) - 9, jnp.arange(15))
    full, _ = layer(x, positions_BL=pos, segment_ids_BL=seg)
    cache = layer.init_cache(2, 15)
    assert isinstance(cache, RingKVCache) and cache.k_BSKP.shape == (2, 4, 2, 8)
    outs = []
    for lo, hi in [(0, 3), (3, 9), (9, 10), (10, 11), (11, 15)]:
        y, cache = layer(x[:, lo:hi], positions_BL=pos[:, lo:hi], segment_ids_BL=seg[:, lo:hi], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **F32_MODULE)
    assert int(cache.index) == 15 and cache.positions_BS[0].tolist() == [3, 4, 5, 2]  # token t in slot t mod 4
    assert isinstance(layer.init_cache(2, 4), KVCache)


def test_qk_norm_normalises_each_head_before_rope():
    cfg = AttentionConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True, impl="reference")
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    assert layer.q_norm.weight.shape == (8,) and layer.k_norm.weight.shape == (8,)
    q, k, _ = layer.project_qkv(jax.random.normal(jax.random.key(2), (1, 3, 16)), jnp.zeros((1, 3), jnp.int32))
    for a in (q, k):  # position 0: RoPE is the identity, so the rms over the head dim is 1 (weights are ones)
        assert jnp.allclose(jnp.sqrt(jnp.mean(a * a, axis=-1)), 1.0, atol=1e-3)
    with pytest.raises(TypeError, match="qk_norm"):  # typeguard (tests) or lcjax.checks: either names it
        AttentionConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=1)
