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
