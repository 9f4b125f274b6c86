"""An LM step under context parallelism (ring / all-gather attention, zigzag / striped layouts) == one device.

The batch is permuted once by ``apply_layout`` (tokens, targets, loss mask, segment ids, positions), sharded over
``data x context``, and the loss and every parameter gradient are compared with the single-device step on the
original order. The traced program is checked to really use the chosen strategy (ppermute ring vs all-gather).
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax import sharding
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import context_parallel as cp
from lcjax.ops.losses import token_cross_entropy
from tests.tolerances import F32_SHARDED

CFG = LMConfig.tiny(attn_impl="reference")  # dense one-device oracle; under context parallelism ring / all-gather run
B, L = 2, 32


def loss_fn(model, batch):
    logits = model(batch["inputs"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"])
    total, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"].astype(jnp.float32))
    return total / count


@pytest.fixture(scope="module")
def batch():
    r = np.random.default_rng(0)
    tokens = r.integers(0, CFG.vocab_size, (B, L + 1)).astype(np.int32)
    seg = np.asarray([[1] * 19 + [2] * 13, [1] * 7 + [2] * 25], np.int32)  # packed documents
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
                loss_mask=np.concatenate([seg[:, 1:] == seg[:, :-1], np.ones((B, 1), bool)], axis=1))  # fmt: skip


@pytest.fixture(scope="module")
def single_device(batch):
    model = jax.jit(lambda: LM(CFG, rngs=nnx.Rngs(0)))()
    b = {k: jnp.asarray(v) for k, v in cp.apply_layout(batch, n=1, layout="contiguous").items()}
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model, b)
    return model, float(loss), jax.tree.map(np.asarray, nnx.state(grads))


def _collectives(jaxpr, out=None):
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("ppermute", "all_gather"):
            out[eqn.primitive.name] = out.get(eqn.primitive.name, 0) + 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _collectives(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _collectives(sub, out)
    return out


@pytest.mark.parametrize("mesh_shape,strategy,layout", [
    (dict(context=8), "ring", "zigzag"),
    (dict(data=2, context=4), "ring", "striped"),
    (dict(data=2, context=4), "allgather", "zigzag"),
])  # fmt: skip
def test_lm_loss_and_grads_equal_single_device(mesh_shape, strategy, layout, batch, single_device):
    model_1, loss_1, grads_1 = single_device
    n = mesh_shape["context"]
    permuted = cp.apply_layout(batch, n=n, layout=layout)
    mesh = sharding.make_mesh(**mesh_shape)
    with sharding.use(mesh, sharding.ShardingRules.context_parallel()):
        # same weights, replicated; the strategy is a config field (LMConfig.context_impl -> AttentionConfig)
        cfg = dataclasses.replace(CFG, context_impl=strategy)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, jax.device_put(nnx.state(model_1), NamedSharding(mesh, P())))
        b = {k: jax.device_put(v, sharding.named_sharding("act_batch", "act_seq")) for k, v in permuted.items()}
        counts = _collectives(jax.make_jaxpr(jax.grad(loss_fn))(model, b).jaxpr)
        loss_n, grads_n = jax.jit(jax.value_and_grad(loss_fn))(model, b)
    if strategy == "ring":
        assert counts.get("ppermute", 0) > 0, counts
    else:
        assert counts.get("ppermute", 0) == 0 and counts.get("all_gather", 0) > 0, counts
    np.testing.assert_allclose(float(loss_n), loss_1, **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_SHARDED), nnx.state(grads_n), grads_1)


def test_config_field():
    assert LMConfig.tiny(context_impl="allgather").attention.context_impl == "allgather"
    with pytest.raises(ValueError, match="context_impl"):
        LMConfig.tiny(context_impl="ulysses").attention  # noqa: B018
