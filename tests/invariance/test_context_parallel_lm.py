"""An LM step under context parallelism (ring / all-gather attention, zigzag / striped layouts) == one device.

The batch is permuted once by ``apply_layout`` (tokens, targets, loss mask, segment ids, positions), sharded over
``data x context``, and the loss and every parameter gradient are compared with the single-device step on the
original order. The traced program is checked to really use the chosen strategy (ppermute ring vs all-gather).
A Mamba-2 LM (contiguous layout; sequence-parallel SSD and conv halo) is checked the same way, and its
``generate`` under a mesh equals one device.
"""

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax import sharding
from lcjax.layers.mamba2 import Mamba2Config
from lcjax.models.lm import LM, LMConfig, generate
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


# ---- Mamba-2 LM ---------------------------------------------------------------------------------------------------
M2_CFG = LMConfig(vocab_size=48, d_model=16, n_layers=1, block_pattern=("mamba2",), max_seq_len=64,
                  mixers={"mamba2": Mamba2Config(d_model=16, d_state=4, head_dim=8, n_groups=2, chunk_size=4)})  # fmt: skip
M2_L = 40  # no model dimension is 40, so a gathered sequence would show in the compiled per-device shapes


@pytest.fixture(scope="module")
def m2_batch():
    r = np.random.default_rng(1)
    tokens = r.integers(0, M2_CFG.vocab_size, (B, M2_L + 1)).astype(np.int32)
    seg = np.asarray([[1] * 17 + [2] * 23, [1] * 20 + [2] * 20], np.int32)  # inside a shard / on a shard start
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
                 loss_mask=np.concatenate([seg[:, 1:] == seg[:, :-1], np.ones((B, 1), bool)], axis=1))  # fmt: skip
    return cp.apply_layout(batch, n=1, layout="contiguous")  # recurrent blocks need the contiguous layout


@pytest.fixture(scope="module")
def m2_single_device(m2_batch):
    model = jax.jit(lambda: LM(M2_CFG, rngs=nnx.Rngs(0)))()
    b = {k: jnp.asarray(v) for k, v in m2_batch.items()}
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model, b)
    return model, float(loss), jax.tree.map(np.asarray, nnx.state(grads))


@pytest.mark.parametrize("mesh_shape", [dict(context=8), dict(data=2, context=4)])
def test_mamba2_lm_loss_and_grads_equal_single_device(mesh_shape, m2_batch, m2_single_device):
    model_1, loss_1, grads_1 = m2_single_device
    mesh = sharding.make_mesh(**mesh_shape)
    with sharding.use(mesh, sharding.ShardingRules.context_parallel()):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(M2_CFG, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, jax.device_put(nnx.state(model_1), NamedSharding(mesh, P())))
        b = {k: jax.device_put(v, sharding.named_sharding("act_batch", "act_seq")) for k, v in m2_batch.items()}
        compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(model, b).compile()
        loss_n, grads_n = compiled(model, b)
    hlo = compiled.as_text()
    dims = {int(d) for shape in re.findall(r"\[([\d,]+)\]", hlo) for d in shape.split(",") if d}
    assert M2_L not in dims and "collective-permute" in hlo  # sequence never gathered; conv halo passed
    np.testing.assert_allclose(float(loss_n), loss_1, **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_SHARDED), nnx.state(grads_n), grads_1)


MESHES = [(dict(fsdp=4, tensor=2), "fsdp_tp"), (dict(data=2, context=4), "dp+context_parallel")]


@pytest.mark.parametrize("axes,rules", MESHES)
def test_mamba2_lm_generate_under_a_mesh_equals_one_device(m2_single_device, axes, rules):
    """Cached prefill (chunked SSD from the carried state) then one recurrent step per token; under context
    parallelism ``generate`` replicates the sequence (one-token steps cannot be split)."""
    model_1 = m2_single_device[0]
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, M2_CFG.vocab_size, (4, 8)), jnp.int32)
    ref = generate(model_1, prompt, max_new_tokens=4)
    mesh = sharding.make_mesh(**axes)
    with sharding.use(mesh, sharding.ShardingRules.from_name(rules)):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(M2_CFG, rngs=nnx.Rngs(0))))
        place = lambda v, a: jax.device_put(v, NamedSharding(mesh, a.sharding.spec))  # noqa: E731
        state = jax.tree.map(place, nnx.state(model_1), abstract)
        out = generate(nnx.merge(graphdef, state), prompt, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
