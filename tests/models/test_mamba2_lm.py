"""The LM with "mamba2" blocks: config, preset sizes, hybrids end to end, O(1) decoding, layer scan, sharding."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from lcjax import sharding
from lcjax.layers.mamba2 import Mamba2Config, Mamba2State
from lcjax.models import lm as lm_lib
from lcjax.models.lm import LM, LMConfig
from lcjax.ops.losses import token_cross_entropy
from tolerances import F32_MODULE, F32_OP, F32_SHARDED

MIXER = Mamba2Config(d_model=16, d_state=4, head_dim=4, n_groups=2, chunk_size=4)  # 8 heads
HYBRID = LMConfig(vocab_size=48, d_model=16, n_layers=3, n_heads=2, mlp_dim=24, block_pattern=("mamba2", "mamba2",
                  "attention"), mixers={"mamba2": MIXER}, attn_impl="reference")  # fmt: skip
apply = jax.jit(lambda m, t, **kw: m(t, **kw))


def build(cfg: LMConfig, seed: int = 0, mesh=None) -> LM:
    """An LM with random weights drawn by numpy into ``nnx.eval_shape``'s skeleton (no init to compile).

    A = U(1, 16), softplus(dt_bias) log-uniform in [1e-3, 1e-1], D ~ N(0, 1), norm weights 1 + 0.1·N(0, 1), the rest
    N(0, 0.25²). Under a mesh each array is placed by its parameter's logical names.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        if name == "A_log":
            v = np.log(rng.uniform(1.0, 16.0, leaf.shape))
        elif name == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), leaf.shape))
            v = dt + np.log(-np.expm1(-dt))
        elif name == "D":
            v = rng.normal(size=leaf.shape)
        elif name == "norm" or (name == "weight" and "norm" in parent):
            v = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            v = 0.25 * rng.normal(size=leaf.shape)
        v = jnp.asarray(v, leaf.dtype)
        return v if mesh is None else jax.device_put(v, NamedSharding(mesh, leaf.sharding.spec))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def hybrid():
    return build(HYBRID)


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, HYBRID.vocab_size, shape), jnp.int32)


def test_config_validation():
    with pytest.raises(ValueError, match="mamba2"):
        dataclasses.replace(HYBRID, mixers={})
    with pytest.raises(ValueError, match=r"mixers\['mamba2'\].d_model"):
        dataclasses.replace(HYBRID, mixers={"mamba2": dataclasses.replace(MIXER, d_model=32)})
    with pytest.raises(ValueError, match="mamba2_preset"):
        LMConfig.mamba2_preset("1b")
    assert "mamba2" in lm_lib.BLOCK_TYPES


# Per layer: in_proj D·(2E + 2GN + H), conv (E + 2GN)·(W + 1), dt_bias/A_log/D 3H, gated norm E, out_proj E·D,
# block norm D; plus the tied embedding V·D and norm_f D (vocabulary 50288).
PRESET_COUNTS = {"130m": 128_989_632, "370m": 368_346_624, "780m": 780_161_280, "1.3b": 1_343_757_312,
                 "2.7b": 2_702_599_680}  # fmt: skip


@pytest.mark.parametrize("name", PRESET_COUNTS)
def test_preset_parameter_counts_under_eval_shape(name):
    cfg = LMConfig.mamba2_preset(name, scan_layers=True)  # one stacked block: cheap to trace
    m = cfg.mixers["mamba2"]
    D, E, H, N, G, W = m.d_model, m.d_inner, m.num_heads, m.d_state, m.n_groups, m.d_conv
    per_layer = D * (2 * E + 2 * G * N + H) + (E + 2 * G * N) * (W + 1) + 3 * H + E + E * D + D
    assert lm_lib.param_count(cfg) == PRESET_COUNTS[name] == 50_288 * D + D + cfg.n_layers * per_layer
    if name == "130m":
        assert lm_lib.param_count(dataclasses.replace(cfg, scan_layers=False)) == PRESET_COUNTS[name]


def test_hybrid_cached_decoding_equals_full_forward(hybrid):
    toks = tokens((2, 13), seed=1)
    full = apply(hybrid, toks)
    cache = hybrid.init_cache(2, 16)
    logits, cache = apply(hybrid, toks[:, :5], cache=cache)  # prefill
    out = [logits]
    for t in range(5, 9):  # one token at a time
        logits, cache = apply(hybrid, toks[:, t : t + 1], cache=cache)
        out.append(logits)
    logits, cache = apply(hybrid, toks[:, 9:], cache=cache)  # several tokens from the carried states
    out.append(logits)
    np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, **F32_MODULE)
    assert int(cache.index) == 13
    assert isinstance(cache.layers[0], Mamba2State) and cache.layers[2].k_BSKP.shape[1] == 16


def test_hybrid_generate_is_greedy(hybrid):
    """Each generated token is the argmax of the full (causal) forward over the prompt and the tokens before it."""
    prompt = tokens((2, 9), seed=2)
    out = lm_lib.generate(hybrid, prompt, max_new_tokens=4)
    logits = apply(hybrid, jnp.concatenate([prompt, out], axis=1))  # the same (2, 13) shape as above
    np.testing.assert_array_equal(out, jnp.argmax(logits[:, 8:12], axis=-1))


def test_packed_documents_equal_separate_runs(hybrid):
    a, b = tokens((1, 6), seed=3), tokens((1, 7), seed=4)
    seg = jnp.asarray([[0] * 6 + [1] * 7], jnp.int32)
    out = apply(hybrid, jnp.concatenate([a, b], axis=1), segment_ids_BL=seg)
    np.testing.assert_allclose(out[:, :6], apply(hybrid, a), **F32_MODULE)
    np.testing.assert_allclose(out[:, 6:], apply(hybrid, b), **F32_MODULE)


def test_decoding_step_is_recurrent_and_constant_size():
    """A cached one-token call runs ``Mamba2.step``: no scan (the chunked SSD scans over chunks), no length axis."""
    cfg = dataclasses.replace(HYBRID, n_layers=2, block_pattern=("mamba2",))
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))  # tracing only
    small, large = model.init_cache(2, 8), model.init_cache(2, 4096)
    assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
    count = lambda jaxpr: sum(1 for e in jaxpr.eqns if e.primitive.name == "scan") + sum(
        count(sub) for e in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(e.params))
    step = jax.make_jaxpr(lambda m, t, c: m(t, cache=c))(model, tokens((2, 1)), small).jaxpr
    prefill = jax.make_jaxpr(lambda m, t, c: m(t, cache=c))(model, tokens((2, 9)), small).jaxpr
    assert count(step) == 0 and count(prefill) >= cfg.n_layers


def _stack(unrolled: LM, scanned: LM) -> LM:
    """Copy an unrolled model's weights into the stacked layout of a scanned one (pattern position j, period i)."""
    src, dst = nnx.state(unrolled), nnx.state(scanned)
    for name in ("embed_tokens", "norm", "lm_head"):
        dst[name] = src[name]
    period = len(unrolled.cfg.block_pattern)
    for j in range(period):
        layers = [src["layers"][i] for i in range(j, unrolled.cfg.n_layers, period)]
        dst["layers"][j] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    nnx.update(scanned, dst)
    return scanned


def test_scan_layers_equals_unrolled():
    cfg = dataclasses.replace(HYBRID, n_layers=4, block_pattern=("mamba2", "attention"))  # two periods
    unrolled = build(cfg)
    scanned = _stack(unrolled, build(dataclasses.replace(cfg, scan_layers=True), 1))
    toks = tokens((2, 9), seed=5)
    ref = apply(unrolled, toks)
    np.testing.assert_allclose(apply(scanned, toks), ref, **F32_OP)
    cache = scanned.init_cache(2, 12)
    _, cache = apply(scanned, toks[:, :6], cache=cache)
    step, cache = apply(scanned, toks[:, 6:7], cache=cache)
    np.testing.assert_allclose(step, ref[:, 6:7], **F32_OP)  # causal: position 6 sees tokens 0..6 only


def test_train_step_sharded_equals_unsharded():
    """fsdp x tensor: heads over ``tensor``, batch and the ``embed`` axis over ``fsdp``; loss and every gradient."""
    mixer = dataclasses.replace(MIXER, n_groups=1)  # G = 1 < 2 head shards
    cfg = dataclasses.replace(HYBRID, n_layers=2, block_pattern=("mamba2",), mixers={"mamba2": mixer})
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 11)), jnp.int32)
    seg = jnp.asarray(np.repeat([[0] * 6 + [1] * 5], 4, axis=0), jnp.int32)

    def loss_and_grads():
        def loss_fn(model):
            total, count = token_cross_entropy(model(toks[:, :-1], segment_ids_BL=seg[:, :-1]), toks[:, 1:],
                                               (seg[:, :-1] == seg[:, 1:]).astype(jnp.float32))  # fmt: skip
            return total / count

        model = build(cfg, mesh=jax.sharding.get_mesh() if sharding.mesh_active() else None)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model)
        return model, float(loss), jax.tree.map(np.asarray, nnx.state(grads))

    _, loss_1, grads_1 = loss_and_grads()
    with sharding.use(sharding.make_mesh(fsdp=4, tensor=2), sharding.ShardingRules.fsdp_tp()):
        model, loss_n, grads_n = loss_and_grads()
        spec = jax.typeof(model.layers[0].mixer.in_proj["x"][...]).sharding.spec
        assert tuple(spec) == ("fsdp", "tensor", None)
    np.testing.assert_allclose(loss_n, loss_1, **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_SHARDED), grads_n, grads_1)
