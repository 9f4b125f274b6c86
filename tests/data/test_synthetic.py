"""Synthetic task generators: every answer is recovered independently from the inputs, determinism, validation."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcjax.checks import require_int
from lcjax.data import synthetic
from lcjax.data.synthetic import (
    PASSKEY_MARKER,
    InductionHeadsConfig,
    MQARConfig,
    PasskeyConfig,
    SelectiveCopyingConfig,
    SyntheticSource,
    accuracy_counts,
    accuracy_from_counts,
    generate,
    make_task,
)

ALL_TASKS = [
    MQARConfig(seq_len=64, num_kv_pairs=8),
    MQARConfig(seq_len=32, num_kv_pairs=4, vocab_size=64, random_non_queries=True),
    InductionHeadsConfig(seq_len=64, vocab_size=16),
    SelectiveCopyingConfig(seq_len=64, num_tokens=8, vocab_size=16),
    PasskeyConfig(seq_len=64, num_digits=5),
    PasskeyConfig(seq_len=40, num_digits=3, depth=0.5, filler="repeat"),
]


def _check_layout(ex, L):
    assert set(ex) == {"inputs", "targets", "loss_mask"}
    for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.bool_)):
        assert ex[k].dtype == dtype and ex[k].shape == (L,), (k, ex[k].dtype, ex[k].shape)
    assert np.all(ex["targets"][~ex["loss_mask"]] == 0)


@settings(max_examples=25, deadline=None)
@given(
    T_half=st.integers(2, 40),
    K_frac=st.floats(0.01, 1.0),
    random_filler=st.booleans(),
    seed=st.integers(0, 2**31),
    index=st.integers(0, 10**6),
)
def test_mqar_keys_unique_and_answers_recoverable(T_half, K_frac, random_filler, seed, index):
    T = 2 * T_half
    K = max(1, int(K_frac * T // 4))
    V = 2 * K + 2 + (seed % 50)  # as small as the keys allow, so filler collides with keys often
    cfg = MQARConfig(seq_len=T, num_kv_pairs=K, vocab_size=V, random_non_queries=random_filler)
    ex = generate(cfg, index, seed=seed)
    _check_layout(ex, T)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    keys, values = x[0 : 2 * K : 2], x[1 : 2 * K : 2]
    assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all((values >= V // 2) & (values < V))
    queries = np.flatnonzero(m)
    assert len(queries) == K and np.all(queries >= 2 * K) and np.all((queries - 2 * K) % 2 == 0)
    assert sorted(x[queries].tolist()) == sorted(keys.tolist())  # each key queried exactly once
    for q in queries:  # the answer, found by scanning the context for the query key
        (j,) = np.flatnonzero(keys == x[q])
        assert y[q] == values[j]
    non_query = np.ones(T, bool)
    non_query[: 2 * K] = False
    non_query[queries] = False
    if not random_filler:
        assert np.all(x[non_query] == 0)
    assert np.all((x >= 0) & (x < V))


def test_mqar_query_offsets_follow_the_power_law():
    """With one pair, the query offset g has probability (g + 1)^(a - 1) / Z (checked at a = 0.01 and a = 1)."""
    for power_a in (0.01, 1.0):
        cfg = MQARConfig(seq_len=32, num_kv_pairs=1, vocab_size=16, power_a=power_a)
        n, num_offsets = 3000, (32 - 2) // 2
        offsets = [(np.flatnonzero(generate(cfg, i, seed=1)["loss_mask"])[0] - 2) // 2 for i in range(n)]
        freq = np.bincount(offsets, minlength=num_offsets) / n
        p = np.arange(1, num_offsets + 1, dtype=np.float64) ** (power_a - 1)
        np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)  # 3000 draws: std <= 0.009


@pytest.mark.parametrize("seed", [0, 7])
def test_induction_heads_answer(seed):
    cfg = InductionHeadsConfig(seq_len=32, vocab_size=8)
    for i in range(50):
        ex = generate(cfg, i, seed=seed)
        _check_layout(ex, 32)
        x = ex["inputs"]
        triggers = np.flatnonzero(x == 0)
        assert len(triggers) == 2 and triggers[1] == 31 and triggers[0] <= 29
        assert np.flatnonzero(ex["loss_mask"]).tolist() == [31]
        assert ex["targets"][31] == x[triggers[0] + 1] != 0


def test_selective_copying_answer():
    cfg = SelectiveCopyingConfig(seq_len=48, num_tokens=6, vocab_size=10)
    for i in range(50):
        ex = generate(cfg, i, seed=3)
        _check_layout(ex, 48)
        x, context = ex["inputs"], 48 - 6
        data = x[:context][x[:context] != 0]  # the data tokens in order, read off the noise
        assert len(data) == 6 and np.all((data >= 1) & (data <= 8))
        assert np.all(x[context:] == 9)
        assert np.flatnonzero(ex["loss_mask"]).tolist() == list(range(context, 48))
        np.testing.assert_array_equal(ex["targets"][context:], data)


@pytest.mark.parametrize("cfg", [PasskeyConfig(seq_len=64), PasskeyConfig(seq_len=30, num_digits=2, filler="repeat")])
def test_passkey_answer_recoverable(cfg):
    D, L = cfg.num_digits, cfg.seq_len
    for i in range(50):
        ex = generate(cfg, i, seed=0)
        _check_layout(ex, L)
        x = ex["inputs"]
        markers = np.flatnonzero(x == PASSKEY_MARKER)
        assert len(markers) == 2 and markers[1] == L - D
        passkey = x[markers[0] + 1 : markers[0] + 1 + D]
        assert np.all(passkey < 10)
        assert np.flatnonzero(ex["loss_mask"]).tolist() == list(range(L - D, L))
        np.testing.assert_array_equal(ex["targets"][L - D :], passkey)
        np.testing.assert_array_equal(x[L - D + 1 :], passkey[:-1])  # teacher forcing after the query
        filler = np.delete(x, np.r_[markers[0] : markers[0] + D + 1, L - D : L])
        assert np.all(filler > PASSKEY_MARKER)
        if cfg.filler == "repeat":
            period = cfg.vocab_size - PASSKEY_MARKER - 1
            np.testing.assert_array_equal(filler, PASSKEY_MARKER + 1 + np.arange(len(filler)) % period)


def test_passkey_depth_places_the_needle():
    L, D = 64, 5
    num_filler = L + 1 - 2 * (D + 1)
    for depth in (0.0, 0.25, 1.0):
        ex = generate(PasskeyConfig(seq_len=L, num_digits=D, depth=depth), 3, seed=0)
        assert np.flatnonzero(ex["inputs"] == PASSKEY_MARKER)[0] == round(depth * num_filler)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_determinism_and_independence(task):
    a = generate(task, 5, seed=11)
    for k in a:
        np.testing.assert_array_equal(a[k], generate(task, 5, seed=11)[k])
    others = (generate(task, 5, seed=12), generate(task, 6, seed=11), generate(task, 5, seed=11, split="validation"))
    for other in others:
        assert not all(np.array_equal(a[k], other[k]) for k in a)
    src = SyntheticSource(task, split="train", num_examples=10, seed=11)
    np.testing.assert_array_equal(src[5]["inputs"], a["inputs"])
    assert src[5]["index"] == 5 and len(src) == 10 and len(src.__getitems__([1, 2])) == 2
    with pytest.raises(IndexError):
        src[10]


def test_train_and_validation_do_not_overlap():
    task = MQARConfig(seq_len=16, num_kv_pairs=2, vocab_size=64)
    train = {generate(task, i, seed=0)["inputs"].tobytes() for i in range(300)}
    val = {generate(task, i, seed=0, split="validation")["inputs"].tobytes() for i in range(300)}
    assert not train & val


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MQARConfig(seq_len=63), "seq_len"),
        (lambda: MQARConfig(seq_len=-4), "seq_len"),
        (lambda: MQARConfig(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
        (lambda: MQARConfig(num_kv_pairs=4, vocab_size=9), "vocab_size"),
        (lambda: MQARConfig(power_a=0.0), "power_a"),
        (lambda: InductionHeadsConfig(vocab_size=2), "vocab_size"),
        (lambda: InductionHeadsConfig(seq_len=2), "seq_len"),
        (lambda: SelectiveCopyingConfig(seq_len=31, num_tokens=16), "seq_len"),
        (lambda: SelectiveCopyingConfig(vocab_size=2), "vocab_size"),
        (lambda: PasskeyConfig(vocab_size=11), "vocab_size"),
        (lambda: PasskeyConfig(seq_len=11, num_digits=5), "seq_len"),
        (lambda: PasskeyConfig(depth=1.5), "depth"),
        (lambda: make_task("mqar2"), "task"),
        (lambda: make_task("mqar", num_pairs=3), "num_pairs"),
        (lambda: generate(MQARConfig(), 0, seed=-1), "seed"),
        (lambda: generate(MQARConfig(), 0, seed=0, split="dev"), "split"),
        (lambda: SyntheticSource(MQARConfig(), split="train", num_examples=0), "num_examples"),
    ],
)
def test_bad_config_raises_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize("make, field", [(lambda: MQARConfig(random_non_queries=1), "random_non_queries"),
                                         (lambda: MQARConfig(seq_len=64.0), "seq_len"),
                                         (lambda: PasskeyConfig(filler="text"), "filler")])
def test_wrong_type_raises_naming_the_field(make, field):
    # ValueError from __post_init__; under the test suite's beartype hook the annotation check fires first
    # (jaxtyping.TypeCheckError, a TypeError), which names the parameter as well.
    with pytest.raises((ValueError, TypeError), match=field):
        make()
    with pytest.raises(TypeError, match="seq_len"):  # the checker the configs use (lcjax.checks): a float is no int
        require_int("MQARConfig.seq_len", 64.0, min=4)


def test_make_task_and_names():
    assert make_task("passkey", seq_len=128) == PasskeyConfig(seq_len=128)
    assert len({t.name for t in ALL_TASKS}) == len(ALL_TASKS)
    assert MQARConfig().name == "mqar_L64_K4_V8192_a0.01_zeros"


def test_accuracy_counts():
    targets = np.array([[5, 6, 7, 0], [1, 2, 3, 4], [0, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], bool)  # row 2 is eval padding
    preds = np.array([[5, 6, 1, 1], [9, 2, 0, 4], [3, 3, 3, 3]], np.int32)
    counts = jax.jit(accuracy_counts)(preds, targets, mask)
    assert {k: int(v) for k, v in counts.items()} == dict(
        answer_correct=4, answer_total=5, example_correct=1, example_total=2
    )
    assert accuracy_from_counts(counts) == dict(answer_accuracy=0.8, example_accuracy=0.5)
    with pytest.raises(ValueError, match="answer_total"):
        accuracy_from_counts(dict(answer_correct=0, answer_total=0, example_correct=0, example_total=0))


def test_generate_rejects_unknown_task():
    with pytest.raises((ValueError, TypeError), match="task"):
        synthetic.generate(object(), 0, seed=0)


@pytest.mark.parametrize("make, field", [(lambda: MQARConfig(seq_len=True), "MQARConfig.seq_len"),
                                         (lambda: PasskeyConfig(vocab_size=True), "PasskeyConfig.vocab_size"),
                                         (lambda: generate(MQARConfig(), True, seed=0), "index")])  # fmt: skip
def test_bools_are_not_ints(make, field):
    with pytest.raises(TypeError, match=field):  # bool passes an `int` annotation, so lcjax.checks must catch it
        make()


def test_generated_ids_are_checked_against_the_task_vocab(monkeypatch):
    def broken(cfg, rng):
        ex = synthetic.mqar_example(cfg, rng)
        ex["targets"][0] = cfg.vocab_size
        return ex

    monkeypatch.setitem(synthetic._GENERATORS, MQARConfig, broken)
    with pytest.raises(ValueError, match=r"generate\(mqar_.*\): targets: token ids must be in \[0, vocab_size=8192\)"):
        generate(MQARConfig(), 0, seed=0)
