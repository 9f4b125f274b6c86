"""An imported HF Bamba hybrid (Mamba-2 + attention layers, each with an MLP) under context parallelism == one device.

The tiny random ``BambaForCausalLM`` of ``tests/parity/test_bamba_torch.py`` is loaded with ``lcjax.convert.bamba``;
its logits, loss and every parameter gradient on packed documents under a ``data x context`` mesh with
``ShardingRules.context_parallel()`` (state-passing SSD with a conv halo for the Mamba layers, ring attention for
the attention layer) equal the single-device step, and the sequence is never gathered (no per-device shape holds it).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax import sharding
from lcjax.convert.bamba import bamba_from_hf
from lcjax.models.lm import LM
from lcjax.ops.losses import token_cross_entropy
from tests.parity.test_bamba_torch import hf_model
from tests.tolerances import F32_SHARDED

pytestmark = [pytest.mark.torch, pytest.mark.slow]

B, L = 2, 40  # no model dimension is 40, so a gathered sequence would show in the compiled per-device shapes


def loss_and_logits(model, batch):
    logits = model(batch["inputs"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"])
    total, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"].astype(jnp.float32))
    return total / count, logits


def test_imported_bamba_under_context_parallelism_equals_one_device():
    model_1 = bamba_from_hf(hf_model())
    assert set(model_1.cfg.layer_types()) == {"attention", "mamba2_mlp"}
    r = np.random.default_rng(0)
    tokens = r.integers(0, model_1.cfg.vocab_size, (B, L + 1)).astype(np.int32)
    seg = np.asarray([[1] * 17 + [2] * 23, [1] * 20 + [2] * 20], np.int32)  # inside a shard / on a shard start
    starts = [[0] * 17 + [17] * 23, [0] * 20 + [20] * 20]  # positions restart in every document
    # (given explicitly: the LM's default, positions_from_segments, does not trace on a sequence-sharded array)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=np.arange(L) - starts,
                 loss_mask=np.concatenate([seg[:, 1:] == seg[:, :-1], np.ones((B, 1), bool)], axis=1))  # fmt: skip
    step = jax.value_and_grad(loss_and_logits, has_aux=True)
    (loss_1, logits_1), grads_1 = jax.jit(step)(model_1, {k: jnp.asarray(v) for k, v in batch.items()})

    mesh = sharding.make_mesh(data=2, context=4)
    with sharding.use(mesh, sharding.ShardingRules.context_parallel()):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: LM(model_1.cfg, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, jax.device_put(nnx.state(model_1), NamedSharding(mesh, P())))
        b = {k: jax.device_put(v, sharding.named_sharding("act_batch", "act_seq")) for k, v in batch.items()}
        compiled = jax.jit(step).lower(model, b).compile()
        (loss_n, logits_n), grads_n = compiled(model, b)
    hlo = compiled.as_text()
    dims = {int(d) for shape in re.findall(r"\[([\d,]+)\]", hlo) for d in shape.split(",") if d}
    assert L not in dims and "collective-permute" in hlo  # sequence never gathered; ring K/V and conv halo passed
    np.testing.assert_allclose(np.asarray(logits_n), np.asarray(logits_1), **F32_SHARDED)
    np.testing.assert_allclose(float(loss_n), float(loss_1), **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_SHARDED), nnx.state(grads_n),
                 jax.tree.map(np.asarray, nnx.state(grads_1)))  # fmt: skip
