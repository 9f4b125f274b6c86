"""One train step (loss and every gradient) on 1 device equals the same step on 8 devices, for each rule preset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import sharding
from lcjax.models.lm import LM, LMConfig
from lcjax.ops.losses import token_cross_entropy
from tests.tolerances import F32_SHARDED

MESHES = {
    "dp": dict(data=8),
    "fsdp": dict(data=2, fsdp=4),
    "fsdp_tp": dict(fsdp=4, tensor=2),
    "context_parallel": dict(data=2, context=4),
    "fsdp_tp+context_parallel": dict(fsdp=2, context=2, tensor=2),
}


def loss_and_grads(cfg: LMConfig, batch):
    def loss_fn(model):
        logits = model(batch["inputs"], segment_ids_BL=batch["segment_ids"])
        total, count = token_cross_entropy(logits, batch["targets"], batch["weights"])
        return total / count

    model = jax.jit(lambda: LM(cfg, rngs=nnx.Rngs(0)))()
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model)
    return float(loss), jax.tree.map(np.asarray, nnx.state(grads)), model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 17)).astype(np.int32)
    seg = np.repeat(np.array([[0] * 10 + [1] * 7]), 8, axis=0).astype(np.int32)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg[:, :-1],
                 weights=(seg[:, :-1] == seg[:, 1:]).astype(np.float32))  # fmt: skip
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def single_device(batch):
    """Single-device loss and gradients, computed once per layer layout."""
    cache = {}

    def get(cfg):
        if cfg not in cache:
            cache[cfg] = loss_and_grads(cfg, batch)[:2]
        return cache[cfg]

    return get


CASES = [(preset, False) for preset in MESHES] + [("fsdp_tp+context_parallel", True), ("fsdp", True)]


@pytest.mark.parametrize("preset, scan", CASES, ids=[f"{p}-{'scan' if s else 'unrolled'}" for p, s in CASES])
def test_train_step_is_sharding_invariant(preset, scan, batch, single_device):
    cfg = LMConfig.tiny(attn_impl="reference", scan_layers=scan)
    loss_1, grads_1 = single_device(cfg)
    with sharding.use(sharding.make_mesh(**MESHES[preset]), sharding.ShardingRules.from_name(preset)):
        loss_n, grads_n, model = loss_and_grads(cfg, batch)
        # parameters really are sharded as the rules say
        q = model.layers[0].self_attn.q_proj
        names = q.get_metadata()["out_sharding"]
        assert q[...].sharding.spec == sharding.current_rules().to_pspec(*names)
    np.testing.assert_allclose(loss_n, loss_1, **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_SHARDED), grads_n, grads_1)


@pytest.mark.parametrize("pattern", [("attention",), ("attention", "m2")], ids=["attention", "hybrid-m2"])
def test_generate_under_a_mesh_equals_one_device(pattern):
    from lcjax.layers.monarch_mixer import M2SequenceMixerConfig
    from lcjax.models.lm import generate

    extra = dict(mixers={"m2": M2SequenceMixerConfig.causal(32, 256)}) if "m2" in pattern else {}
    cfg = LMConfig.tiny(attn_impl="reference", block_pattern=pattern, **extra)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, 128, (4, 5)), jnp.int32)
    ref = generate(jax.jit(lambda: LM(cfg, rngs=nnx.Rngs(0)))(), prompt, max_new_tokens=4)
    with sharding.use(sharding.make_mesh(fsdp=4, tensor=2), sharding.ShardingRules.fsdp_tp()):
        out = generate(jax.jit(lambda: LM(cfg, rngs=nnx.Rngs(0)))(), prompt, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
