"""Activation Beacon: config validation, chunk layout, base-model invariants, streaming == one-shot, batching,
memory bookkeeping, generation, beacon-only gradients and training (JAX only; the PyTorch references are in
tests/parity/test_beacon_torch.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import data, sharding
from lcjax.layers.beacon import BeaconConfig, BeaconParam, chunk_layout
from lcjax.models import beacon as beacon_lib
from lcjax.models.lm import LM, LMConfig, sample_logits
from lcjax.train import beacon as train_lib
from lcjax.train import loop, metrics
from lcjax.train.config import ExperimentConfig, MeshConfig, OptimConfig, SyntheticDataConfig
from tests.tolerances import EXACT, F32_MODULE, F32_SHARDED

V, W = 64, 8
LM_CFG = LMConfig.tiny(vocab_size=V, max_seq_len=128)


def perturb(model, scale=0.05, seed=0):
    """Move every beacon parameter away from its copy-of-the-base init, so beacons change the function."""
    state = nnx.state(model, BeaconParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model


@pytest.fixture(scope="module")
def base():
    return LM(LM_CFG, rngs=nnx.Rngs(0))


def make(base, **kw):
    cfg = BeaconConfig(**(dict(window=W, ratio=2, train_ratios=(2, 4)) | kw))
    return perturb(beacon_lib.add_beacons(base, cfg, rngs=nnx.Rngs(1)))


def toks(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


forward = jax.jit(lambda m, t, n, r: m(t, lengths_B=n, ratios_BN=r))
feed = jax.jit(lambda m, t, n, s: m(t, lengths_B=n, state=s))
base_forward = jax.jit(lambda m, t: m(t))


def expected_entries(cfg, ratios, n_tokens):
    """Cached entries per layer after n_tokens with per-window ratios: sink + W/r_w per completed window (all W raw
    entries for ratio 0) + the current window's raw tokens (and, interleaved, its beacons)."""
    full, rest = divmod(n_tokens, cfg.window)
    mem = sum(cfg.window // r if r else cfg.window for r in ratios[:full])
    sink = cfg.sink_size if full and ratios[0] else 0  # with ratio 0 the sink tokens are part of the kept window
    r = ratios[full] if full < len(ratios) else 0
    return sink + mem + rest + (rest // r if (r and cfg.scheme == "interleave") else 0)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(stride=16), "stride"),
        (dict(stride=4), "stride"),
        (dict(ratio=3), "ratio"),
        (dict(ratio=16), "ratio"),
        (dict(train_ratios=(2, 5)), "train_ratios"),
        (dict(train_ratios=()), "train_ratios"),
        (dict(sink_size=9), "sink_size"),
        (dict(window=0), "window"),
        (dict(scheme="append"), "scheme"),
        (dict(beacon_params=("q", "mlp")), "beacon_params"),
        (dict(ratio_mix="adapt"), "ratio_mix"),
        (dict(embed_init=-1), "embed_init"),
    ],
)
def test_config_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        BeaconConfig(**(dict(window=8, ratio=2, train_ratios=(2, 4)) | kw))


def test_add_beacons_rejects_window_beyond_positions(base):
    with pytest.raises(ValueError, match="window"):
        beacon_lib.add_beacons(base, BeaconConfig(window=128, ratio=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window"):  # 64 raw + 32 beacons + sink 32 = 128 slots
        beacon_lib.add_beacons(base, BeaconConfig(window=64, ratio=2, sink_size=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="embed_init"):
        beacon_lib.add_beacons(base, BeaconConfig(window=W, ratio=2, train_ratios=(2,), embed_init=V), rngs=nnx.Rngs(0))


def test_presets_and_sizes():
    v1, v2 = BeaconConfig.v1(), BeaconConfig.v2()
    assert (v1.scheme, v1.beacon_params, v2.scheme, v2.beacon_params) == (
        "step_expansion", ("q", "k", "v", "o"), "interleave", ("q", "k", "v"))
    assert BeaconConfig.llama3().sink_size == 1
    cfg = BeaconConfig(window=1024, ratio=8, train_ratios=(2, 4, 8, 16, 32))
    assert (cfg.max_beacons(), cfg.memory_growth(), cfg.chunk_slots(1024), cfg.chunk_slots(1)) == (512, 512, 1536, 2)
    assert (cfg.max_beacons((8,)), cfg.memory_growth((0, 8)), cfg.chunk_slots(1024, (8,))) == (128, 1024, 1152)
    # upstream adapt-1024 for Llama-2 (4096 positions): (4096 - 1024) * 128 + 1024 = 394,240 tokens at ratio 128
    adapt = BeaconConfig.v1(window=1024, ratio_mix="adapt-1024")
    assert adapt.adapt_ratio(394_240 - 1024, 4096) == 128 and adapt.adapt_ratio(394_240, 4096) == 128
    assert adapt.adapt_ratio(5000, 4096) == 2 and adapt.adapt_ratio(9000, 4096) == 4


# ------------------------------------------------------------------------------------------------ layout
def naive_layout(scheme, W, r, filled, n):
    """Upstream's rule spelled out: (kind, raw index in the chunk) per slot."""
    slots = []
    for t in range(n):
        slots.append(("raw", t))
        if scheme == "interleave" and r and (filled + t + 1) % r == 0:
            slots.append(("beacon", t + 1))
    if scheme == "step_expansion" and r and filled + n == W:
        slots += [("beacon", 0)] * (W // r)
    return slots


@pytest.mark.parametrize("scheme", ["interleave", "step_expansion"])
@pytest.mark.parametrize("T", [1, 5, 8])
def test_chunk_layout_matches_naive_interleaving(scheme, T):
    cfg = BeaconConfig(window=W, ratio=0, train_ratios=(1, 2, 4, 8), scheme=scheme)
    cases = [(f, n, r) for f in range(W) for n in range(min(T, W - f) + 1) for r in cfg.ratios]
    f_B, n_B, r_B = (jnp.asarray(c, jnp.int32) for c in zip(*cases))
    lay = jax.tree.map(np.asarray, jax.jit(chunk_layout, static_argnums=(0, 1))(cfg, T, n_B, f_B, r_B))
    for b, (f, n, r) in enumerate(cases):
        want = naive_layout(scheme, W, r, f, n)
        got = [("beacon" if lay.is_beacon[b, u] else "raw", 0 if lay.is_beacon[b, u] else lay.token_index[b, u])
               for u in np.flatnonzero(lay.valid[b])]  # fmt: skip
        assert [(k, t if k == "raw" else 0) for k, t in want] == got, (f, n, r)
        raw_slots = [u for u in np.flatnonzero(lay.valid[b]) if not lay.is_beacon[b, u]]
        np.testing.assert_array_equal(lay.raw_slot[b, :n], raw_slots)
        assert lay.completes[b] == (n > 0 and f + n == W)
        if scheme == "interleave":  # valid slots form a prefix
            assert lay.valid[b, : len(want)].all() and not lay.valid[b, len(want):].any()


# ------------------------------------------------------------------------------------------------ base invariants
def test_short_inputs_and_no_compression_equal_base(base):
    """v2: fewer raw tokens than the ratio see no beacon (the first r logits always match); v1: one window matches;
    ratio 0 (no compression, with a sink) is the base model at any length."""
    L, r = 21, 4
    t = toks((3, L))
    ref = np.asarray(base_forward(base, t))
    for scheme in ("interleave", "step_expansion"):
        m = make(base, scheme=scheme, ratio=r, train_ratios=(0, 4), sink_size=1)
        ratios = np.array([[r] * 3, [r] * 3, [0] * 3], np.int32)
        lengths = np.array([r - 1, L, L], np.int32)
        out = np.asarray(forward(m, t, lengths, ratios))
        np.testing.assert_allclose(out[0, : r - 1], ref[0, : r - 1], **F32_MODULE)
        np.testing.assert_array_equal(out[0, r - 1 :], 0.0)  # padding rows
        n_same = W if scheme == "step_expansion" else r
        np.testing.assert_allclose(out[1, :n_same], ref[1, :n_same], **F32_MODULE)
        assert np.abs(out[1, n_same:] - ref[1, n_same:]).max() > 1e-3  # the beacons matter after that
        np.testing.assert_allclose(out[2], ref[2], **F32_MODULE)


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("scheme, sink", [("interleave", 1), ("step_expansion", 0)])
def test_streaming_equals_one_shot_and_memory_formula(base, scheme, sink):
    """Random chunk sizes per row (crossing window ends, empty chunks) and token by token == one-shot prefill; after
    every call the cache holds exactly the formula's entries; buffers are sized O(W + L/r)."""
    m = make(base, scheme=scheme, sink_size=sink)
    B, L = 3, 29
    t = toks((B, L), seed=1)
    ratios = np.random.default_rng(2).choice(np.array(m.cfg.ratios, np.int32), (B, -(-L // W))).astype(np.int32)
    ref = np.asarray(forward(m, t, np.full(B, L, np.int32), ratios))

    state = m.init_state(B, L, ratios_BN=ratios)
    R, M = state.layers[0].raw_k.shape[1], state.layers[0].mem_k.shape[1]
    r_min = int(ratios.min())
    assert state.ratio_set == tuple(np.unique(ratios)) and (R, M) == (W + W // r_min, (L // W) * (W // r_min))
    rng = np.random.default_rng(3)
    pos, outs, T = np.zeros(B, int), np.zeros((B, L, V), np.float32), W + 3
    while (pos < L).any():
        n = np.minimum(rng.integers(0, T + 1, B), L - pos)
        chunk = np.stack([np.pad(t[b, pos[b] : pos[b] + n[b]], (0, T - n[b])) for b in range(B)])
        logits, state = feed(m, chunk, n.astype(np.int32), state)
        for b in range(B):
            outs[b, pos[b] : pos[b] + n[b]] = logits[b, : n[b]]
        pos += n
        entries = np.asarray(state.memory_entries(sink))
        assert entries.tolist() == [expected_entries(m.cfg, ratios[b], pos[b]) for b in range(B)]
    np.testing.assert_allclose(outs, ref, **F32_MODULE)

    state = m.init_state(B, L, ratios_BN=ratios)
    step_out = []
    for i in range(L):
        logits, state = feed(m, t[:, i : i + 1], np.ones(B, np.int32), state)
        step_out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(step_out, axis=1), ref, **F32_MODULE)


def test_memory_size_formula():
    v2 = BeaconConfig(window=16, ratio=4, train_ratios=(4,), sink_size=1)
    v1 = dataclasses.replace(v2, scheme="step_expansion")
    for n in (0, 5, 16, 37):
        full, rest = divmod(n, 16)
        assert v2.memory_size(n) == full * 4 + rest + rest // 4 + (1 if full else 0) == expected_entries(v2, [4] * 3, n)
        assert v1.memory_size(n) == full * 4 + rest + (1 if full else 0) == expected_entries(v1, [4] * 3, n)
    assert v2.memory_size(37, ratio=0) == 37 == expected_entries(v2, [0] * 3, 37)


def test_batched_padded_equals_per_example(base):
    m = make(base, train_ratios=(2, 4, 8))
    lengths = np.array([5, 21, 16], np.int32)
    t = toks((3, 21), seed=4)
    ratios = np.array([[2, 2, 2], [4, 2, 8], [8, 4, 2]], np.int32)
    out = np.asarray(forward(m, t, lengths, ratios))
    for b, n in enumerate(lengths):  # alone and unpadded; the 16-token row alone but padded to 21 (same compile)
        width = 21 if n == 16 else n
        alone = np.asarray(forward(m, t[b : b + 1, :width], lengths[b : b + 1], ratios[b : b + 1, : -(-width // W)]))
        np.testing.assert_allclose(out[b, :n], alone[0, :n], **F32_MODULE)
        np.testing.assert_array_equal(out[b, n:], 0.0)


def test_capacity_and_input_checks(base):
    m = make(base, ratio=4, train_ratios=(2, 4))
    state = m.init_state(1, 4 * W + 3)  # sized for the inference ratio only: 4 windows x W/4 beacons, W + W/4 raw
    assert (state.layers[0].mem_k.shape[1], state.layers[0].raw_k.shape[1]) == (4 * W // 4, W + W // 4)
    state = m.init_state(1, 4)
    with pytest.raises(ValueError, match="capacity"):
        m(toks((1, 5)), state=state)
    with pytest.raises(ValueError, match="lengths_B"):
        m(toks((1, 5)), lengths_B=np.array([6], np.int32))
    with pytest.raises(ValueError, match="ratios_BN"):
        m.init_state(1, 9, ratios_BN=np.array([[2, 3]], np.int32))
    with pytest.raises(ValueError, match="ratios_BN"):
        m.init_state(1, 9, ratios_BN=np.array([[2]], np.int32))


def test_generate_is_teacher_forced(base):
    """Greedy tokens are the argmax of the one-shot logits of prompt + generated (right-padded prompts); sampled
    tokens are ``lm.sample_logits`` of those logits with generate's keys (``split(rng, N)``, one per token)."""
    m = make(base)
    prompt, lengths, N = toks((2, 11), seed=5), np.array([11, 6], np.int32), 7
    rng, temperature = jax.random.key(3), 0.8
    for kw in (dict(), dict(temperature=temperature, top_k=V // 2, rng=rng)):
        new = np.asarray(beacon_lib.generate(m, prompt, lengths_B=lengths, max_new_tokens=N, **kw))
        full = np.zeros((2, 11 + N), np.int32)
        for b, n in enumerate(lengths):
            full[b, :n], full[b, n : n + N] = prompt[b, :n], new[b]
        logits = np.asarray(forward(m, full, lengths + N, np.full((2, 3), 2, np.int32)))
        at_BNV = np.stack([logits[b, n - 1 : n - 1 + N] for b, n in enumerate(lengths)])
        if not kw:
            np.testing.assert_array_equal(at_BNV.argmax(-1), new)
            continue
        keys = jax.random.split(rng, N)
        want = [sample_logits(jnp.asarray(at_BNV[:, i]), keys[i], temperature=temperature, top_k=V // 2)
                for i in range(N)]  # fmt: skip
        np.testing.assert_array_equal(np.stack(want, axis=1), new)
        assert (new != at_BNV.argmax(-1)).any()  # the draws are not all greedy


# ------------------------------------------------------------------------------------------------ training
_grads = jax.jit(jax.grad(lambda m, b: train_lib.beacon_loss(m, b)[0]))


def _is_beacon(path):
    return any(str(p).startswith("beacon") for p in path)


def _dead(path):
    """The last layer's beacon q/o only produce beacon hidden states nothing reads: their gradient is always 0."""
    return path[:2] == ("beacon_layers", LM_CFG.n_layers - 1) and path[-1] in ("q_proj", "o_proj")


def assert_beacon_only_grads(grads):
    for path, g in nnx.state(grads, nnx.Param).flat_state():
        g = np.asarray(g[...])
        if _is_beacon(path):
            assert (np.abs(g).max() > 0) != _dead(path), path
        else:
            np.testing.assert_array_equal(g, 0.0, err_msg=str(path))


def test_gradients_only_on_beacon_params_and_through_memory(base):
    """v1 (interleave: the slow sharding test and the torch test): every base gradient is exactly 0; raw tokens
    never see their own window's beacons, so a loss on window 1 gives zero beacon gradients, and a loss on window 2
    reaches them only through window 1's beacon memory."""
    B, L = 2, 24
    t = toks((B, L + 1), seed=6)
    m = make(base, scheme="step_expansion", beacon_params=("q", "k", "v", "o"))
    for lo, hi, nonzero in ((0, L, True), (0, W, False), (W, 2 * W, True)):
        mask = np.zeros((B, L), bool)
        mask[:, lo:hi] = True
        grads = _grads(m, dict(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=mask))
        if hi == L:
            assert_beacon_only_grads(grads)
        flat = nnx.state(grads, BeaconParam).flat_state()
        assert all((np.abs(np.asarray(g[...])).max() > 0) == (nonzero and not _dead(p)) for p, g in flat)


def test_loss_is_mean_cross_entropy_of_raw_tokens(base):
    m = make(base)
    t = toks((2, 20), seed=7)
    mask = np.random.default_rng(8).random((2, 19)) < 0.5
    batch = dict(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=mask)
    loss, metrics = jax.jit(train_lib.beacon_loss)(m, batch)
    logits = np.asarray(forward(m, t[:, :-1], np.full(2, 19, np.int32), np.full((2, 3), 2, np.int32)), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, t[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(loss, nll[mask].mean(), **F32_MODULE)
    assert metrics["tokens"] == mask.sum()


def _copy(module):
    """Own copies of every array: the trainer donates the model, and ``make`` shares the module-wide ``base``."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def beacon_run_config(steps=3):
    """A ``lcjax train`` experiment on 24-token passkey rows; ``model`` describes the base (``LM_CFG``)."""
    task = data.PasskeyConfig(seq_len=24, num_digits=2, vocab_size=V)
    return ExperimentConfig(
        model=LM_CFG, data=SyntheticDataConfig(task=task, num_train=16, num_validation=2), batch_size=2,
        eval_batch_size=2, num_steps=steps, optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0),
        mesh=MeshConfig(num_devices=1), log_every=1, eval_every=0, checkpoint_every=0, progress_bar=False,
    )  # fmt: skip


def test_training_changes_beacon_params_only(base, tmp_path):
    """Beacon-only training is the one trainer (``lcjax.train.loop.train``) with ``BeaconLoss``: the beacon
    parameters move, every base parameter stays bitwise, and weight decay never reaches a base weight."""
    m = _copy(make(base, train_ratios=(2, 4, 8), ratio_mix="step_random"))
    before = {p: np.array(v[...]) for p, v in nnx.state(m, nnx.Param).flat_state()}
    result = loop.train(beacon_run_config(), str(tmp_path), model=m, objective=train_lib.BeaconLoss())
    history = [r for r in metrics.read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert np.isfinite(result.eval["loss"])
    for path, v in nnx.state(result.model, nnx.Param).flat_state():
        if _is_beacon(path):
            assert not np.array_equal(np.asarray(v[...]), before[path]), path
        else:
            np.testing.assert_allclose(np.asarray(v[...]), before[path], **EXACT, err_msg=str(path))


def test_beacon_objective_is_the_beacon_loss_at_ratios_drawn_from_the_step_key(base):
    """What the loop's step differentiates: ``BeaconLoss`` = ``beacon_loss`` at ``sample_ratios(key)`` (training)
    and at ``BeaconConfig.ratio`` (evaluation, ``rng=None``), as a (sum, count) pair."""
    m = make(base, train_ratios=(2, 4), ratio_mix="step_random")
    t = toks((2, 21), seed=11)
    batch = dict(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=np.ones((2, 20), bool),
                 segment_ids=np.ones((2, 20), np.int32))  # fmt: skip
    key = jax.random.key(3)
    objective = jax.jit(lambda m, b, k: train_lib.BeaconLoss()(m, b, k))
    total, count = objective(m, batch, key)
    ratios = train_lib.sample_ratios(m.cfg, key, jnp.full((2,), 20, jnp.int32), 3)
    assert count == 40 and len(set(np.asarray(ratios).ravel().tolist())) > 1
    np.testing.assert_allclose(total / count, jax.jit(train_lib.beacon_loss)(m, batch, ratios)[0], **F32_MODULE)
    logits = jax.jit(lambda m, b: train_lib.BeaconLoss().logits(m, b, None))(m, batch)
    np.testing.assert_allclose(logits, forward(m, t[:, :-1], np.full(2, 20, np.int32), np.full((2, 3), 2, np.int32)),
                               **EXACT)  # fmt: skip


def test_sample_ratios_mixes():
    key = jax.random.key(0)
    lengths = jnp.array([100, 5000, 9000], jnp.int32)
    cfg = BeaconConfig(window=1024, ratio=8, train_ratios=(2, 4, 4, 8))
    r = np.asarray(train_lib.sample_ratios(cfg, key, lengths, 64))
    assert r.shape == (3, 64) and set(np.unique(r)) == {2, 4, 8} and (r == 4).mean() > (r == 8).mean()
    inst = np.asarray(train_lib.sample_ratios(dataclasses.replace(cfg, ratio_mix="instance_random"), key, lengths, 5))
    assert (inst == inst[:, :1]).all()
    seq = np.asarray(train_lib.sample_ratios(dataclasses.replace(cfg, ratio_mix="sequence"), key, lengths, 6))
    assert seq[0].tolist() == [2, 4, 4, 8, 2, 4]
    adapt = dataclasses.replace(cfg, train_ratios=(2, 4, 8, 16), ratio_mix="adapt-1024")
    got = np.asarray(train_lib.sample_ratios(adapt, key, lengths, 2, max_positions=4096))[:, 0]
    assert got.tolist() == [adapt.adapt_ratio(int(n), 4096) for n in lengths] == [2, 2, 4]
    with pytest.raises(ValueError, match="max_positions"):
        train_lib.sample_ratios(adapt, key, lengths, 2)


@pytest.mark.slow  # two SPMD compiles of a beacon forward + backward (about 20-25 s on 2 shared cores)
def test_sharded_loss_and_grads_equal_single_device():
    """Interleave, padded batch: base gradients are exactly 0 and beacon ones not; fsdp_tp on 8 devices (batch over
    fsdp, heads/vocab over tensor): beacon params are born sharded like the base ones, and the loss and every
    gradient equal the single-device ones."""
    cfg = BeaconConfig(window=W, ratio=2, train_ratios=(2, 4), beacon_params=("q", "k", "v", "o"))
    build = jax.jit(lambda: beacon_lib.add_beacons(LM(LM_CFG, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    t = toks((8, 18), seed=10)
    lengths = np.array([17, 17, 12, 17, 5, 17, 17, 9], np.int32)
    batch = dict(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=np.ones((8, 17), bool),
                 segment_ids=(np.arange(17)[None] < lengths[:, None]).astype(np.int32))  # fmt: skip
    value_and_grad = jax.jit(jax.value_and_grad(lambda m, b: train_lib.beacon_loss(m, b)[0]))
    loss_1, grads_1 = value_and_grad(build(), batch)
    assert_beacon_only_grads(grads_1)
    with sharding.use(sharding.make_mesh(fsdp=4, tensor=2), sharding.ShardingRules.fsdp_tp()):
        m = build()
        for var in (m.beacon_layers[0].q_proj, m.beacon_layers[1].o_proj, m.beacon_embed_tokens):
            assert var[...].sharding.spec == sharding.current_rules().to_pspec(*var.get_metadata()["out_sharding"])
        loss_n, grads_n = value_and_grad(m, batch)
    np.testing.assert_allclose(loss_n, loss_1, **F32_SHARDED)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F32_SHARDED),
                 nnx.state(grads_n, nnx.Param), nnx.state(grads_1, nnx.Param))  # fmt: skip


@pytest.mark.parametrize("scheme", ["interleave", "step_expansion"])
def test_forward_with_the_batch_sharded_equals_one_device(base, scheme):
    """Both schemes run with the batch sharded over ``data`` on an Explicit mesh (step-expansion once raised a
    ShardingTypeError in its position/mask selects) and give the single-device logits."""
    m = make(base, scheme=scheme)
    t = toks((8, 19), seed=3)
    lengths = np.array([19, 7, 19, 12, 19, 19, 3, 19], np.int32)
    ratios = np.full((8, 3), 2, np.int32)
    want = np.asarray(forward(m, t, lengths, ratios))
    with sharding.use(sharding.make_mesh(data=8), sharding.ShardingRules.dp()):
        got = np.asarray(forward(m, t, lengths, ratios))
    valid = np.arange(19)[None] < lengths[:, None]
    np.testing.assert_allclose(got[valid], want[valid], **F32_SHARDED)
