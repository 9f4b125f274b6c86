"""grain pipelines: batch layout, seeded shuffling, per-process sharding, exact resume (also through orbax)."""

import json
import subprocess
import sys
import textwrap

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.data import (
    BATCH_KEYS,
    MQARConfig,
    SyntheticSource,
    batched_dataset,
    packed_text_dataset,
    packed_text_eval_dataset,
    synthetic_datasets,
)

ONE = dict(process_index=0, process_count=1)


class Toy:
    """Example i has inputs == i everywhere, so batches reveal which examples they hold."""

    def __init__(self, n, L=4):
        self.n, self.L = n, L

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        return dict(
            inputs=np.full(self.L, i, np.int32), targets=np.full(self.L, i, np.int32), loss_mask=np.ones(self.L, bool)
        )


def ids(batch):
    return batch["inputs"][:, 0].tolist()


def take(ds_or_it, k):
    it = iter(ds_or_it)
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batch_layout():
    train, evald = synthetic_datasets(MQARConfig(seq_len=16, num_kv_pairs=2), global_batch_size=4, num_train=16,
                                      num_validation=6, **ONE)
    b = next(iter(train))
    assert tuple(sorted(b)) == tuple(sorted(BATCH_KEYS))
    for k in BATCH_KEYS:
        assert b[k].shape == (4, 16) and b[k].dtype == (np.bool_ if k == "loss_mask" else np.int32), k
    assert np.all(b["segment_ids"] == 1) and np.all(b["positions"] == np.arange(16))
    assert np.all(b["loss_mask"].sum(-1) == 2)
    # eval: 6 examples, batches of 4 -> the second batch carries 2 padding rows that score nothing
    e = list(evald)
    assert len(e) == 2 and e[1]["loss_mask"].sum(-1).tolist() == [2, 2, 0, 0]
    assert np.all(e[1]["segment_ids"][2:] == 0) and np.all(e[1]["inputs"][2:] == 0)
    src = SyntheticSource(MQARConfig(seq_len=16, num_kv_pairs=2), split="validation", num_examples=6)
    np.testing.assert_array_equal(e[1]["inputs"][:2], np.stack([src[4]["inputs"], src[5]["inputs"]]))


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    run = lambda seed: [ids(b) for b in take(batched_dataset(Toy(12), global_batch_size=4, shuffle=True, seed=seed,
                                                                num_epochs=None, **ONE), 9)]
    a = run(0)
    assert a == run(0) and a != run(1)
    epochs = [sum(a[3 * e : 3 * e + 3], []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) == 3  # ... and a different one each time
    unshuffled = [ids(b) for b in batched_dataset(Toy(12), global_batch_size=4, **ONE)]
    assert unshuffled == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_finite_runs_drop_or_pad_the_remainder():
    dropped = list(batched_dataset(Toy(10), global_batch_size=4, num_epochs=2, **ONE))
    assert [ids(b) for b in dropped] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    padded = list(batched_dataset(Toy(10), global_batch_size=4, drop_remainder=False, **ONE))
    assert [ids(b) for b in padded] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert padded[-1]["loss_mask"].any(-1).tolist() == [True, True, False, False]


@pytest.mark.parametrize("P", [2, 4])
def test_sharding_partitions_each_global_batch(P):
    """Process p holds rows [p*B/P, (p+1)*B/P) of every global batch: concatenated, the 1-process batches."""
    kw = dict(global_batch_size=8, shuffle=True, seed=3, num_epochs=None)
    single = take(batched_dataset(Toy(20), **kw, **ONE), 6)
    local = [take(batched_dataset(Toy(20), **kw, process_index=p, process_count=P), 6) for p in range(P)]
    assert all(b["inputs"].shape == (8 // P, 4) for b in local[0])
    merged = [{k: np.concatenate([local[p][i][k] for p in range(P)]) for k in single[0]} for i in range(6)]
    assert_batches_equal(merged, single)
    # eval (padded): every process gets the same number of batches and every example is seen exactly once
    evals = [list(batched_dataset(Toy(21), global_batch_size=8, drop_remainder=False, process_index=p,
                                  process_count=P)) for p in range(P)]
    assert len({len(e) for e in evals}) == 1
    real = [i for e in evals for b in e for i, m in zip(ids(b), b["loss_mask"].any(-1)) if m]
    assert sorted(real) == list(range(21))


def _text_docs():
    rng = np.random.default_rng(0)
    return [bytes(rng.integers(97, 123, int(rng.integers(1, 70))).astype(np.uint8)) for _ in range(30)]


PIPELINES = {
    "synthetic_train": lambda: synthetic_datasets(MQARConfig(seq_len=16, num_kv_pairs=2), global_batch_size=4,
                                                  num_train=10, num_validation=4, **ONE)[0],
    "synthetic_eval": lambda: batched_dataset(Toy(30), global_batch_size=4, drop_remainder=False, **ONE),
    "text_train": lambda: packed_text_dataset(_text_docs(), seq_len=24, global_batch_size=2, seed=1, **ONE),
    "text_eval": lambda: packed_text_eval_dataset(_text_docs(), seq_len=24, global_batch_size=2, **ONE),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_restored_iterator_continues_exactly(name):
    make = PIPELINES[name]
    reference = take(make(), 7)
    it = iter(make())
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(make())
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), reference[3:])


def test_orbax_checkpoint_round_trip(tmp_path):
    """The trainer's recipe: the grain iterator saved beside the train state in one orbax checkpoint."""
    make = PIPELINES["text_train"]
    reference = take(make(), 6)
    it = iter(make())
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(3.0)}),
                                             data=grain.checkpoint.CheckpointSave(it)))
        take(it, 2)  # the iterator moves on while the checkpoint is written
        mngr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        fresh = iter(make())
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": jnp.zeros(3)}), data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
    assert_batches_equal(take(restored["data"], 4), reference[2:])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(global_batch_size=6, process_index=0, process_count=4), "global_batch_size"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(global_batch_size=4, process_count=0, process_index=0), "process_count"),
        (dict(global_batch_size=4, num_epochs=0), "num_epochs"),
        (dict(global_batch_size=4, seed=-1), "seed"),
        (dict(global_batch_size=4, worker_count=-1), "worker_count"),
        (dict(global_batch_size=4, worker_count=2), "worker_count"),  # absl flags not parsed in pytest
        (dict(global_batch_size=16), "global_batch_size"),  # fewer examples than one batch
    ],
)
def test_bad_pipeline_arguments(kwargs, field):
    kwargs = {**ONE, **kwargs}
    with pytest.raises(ValueError, match=field):
        batched_dataset(Toy(10), **kwargs)


def test_defaults_come_from_jax():
    b = next(iter(batched_dataset(Toy(8), global_batch_size=8)))  # jax.process_index() == 0, process_count() == 1
    assert ids(b) == list(range(8))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path):
    """worker_count > 0 (grain mp_prefetch) needs parsed absl flags and a __main__ guard; its data is unchanged."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        import numpy as np
        from absl import flags
        from lcjax.data import MQARConfig, synthetic_datasets

        if __name__ == "__main__":
            flags.FLAGS.mark_as_parsed()
            kw = dict(global_batch_size=4, num_train=16, num_validation=4, process_index=0, process_count=1)
            mp, plain = (iter(synthetic_datasets(MQARConfig(seq_len=16, num_kv_pairs=2), worker_count=w, **kw)[0])
                         for w in (1, 0))
            a = [next(mp)["inputs"] for _ in range(3)]
            state = json.loads(json.dumps(mp.get_state()))
            b = [next(plain)["inputs"] for _ in range(5)]
            resumed = iter(synthetic_datasets(MQARConfig(seq_len=16, num_kv_pairs=2), worker_count=1, **kw)[0])
            resumed.set_state(state)
            a += [next(resumed)["inputs"] for _ in range(2)]
            print(all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


class _BadIds(Toy):
    def __getitem__(self, i):
        ex = super().__getitem__(i)
        ex["targets"][-1] = 99  # out of range for vocab_size=10
        return ex


def test_token_ids_are_checked_against_the_vocab():
    with pytest.raises(ValueError, match=r"batched_dataset: targets: token ids must be in \[0, vocab_size=10\)"):
        next(iter(batched_dataset(_BadIds(4), global_batch_size=2, vocab_size=10, **ONE)))
    assert ids(next(iter(batched_dataset(_BadIds(4), global_batch_size=2, **ONE)))) == [0, 1]  # no vocab: unchecked
    with pytest.raises(ValueError, match="batched_dataset: inputs"):
        next(iter(batched_dataset(Toy(12), global_batch_size=12, vocab_size=10, **ONE)))  # example 11: id 11


class _Ragged(Toy):
    def __getitem__(self, i):
        return dict(super().__getitem__(i), loss_mask=np.ones(self.L + 1, bool))


@pytest.mark.parametrize(
    "kwargs, error, field",
    [  # a bool passes an `int` annotation, so lcjax.checks catches it; other wrong types meet the suite's beartype
        # hook first (a TypeError naming the parameter too), and lcjax.checks outside the tests
        (dict(global_batch_size=True), TypeError, "batched_dataset: global_batch_size must be an int, got True"),
        (dict(global_batch_size=2, seed=True), TypeError, "batched_dataset: seed must be an int"),
        (dict(global_batch_size=2, num_epochs=True), TypeError, "batched_dataset: num_epochs must be an int"),
        (dict(global_batch_size=2.0), TypeError, "global_batch_size"),
        (dict(global_batch_size=2, shuffle="yes"), TypeError, "shuffle"),
        (dict(global_batch_size=2, drop_remainder=0), TypeError, "drop_remainder"),
        (dict(global_batch_size=2, vocab_size=0), ValueError, "batched_dataset: vocab_size=0 is out of range"),
    ],
)
def test_wrong_argument_types_raise_naming_them(kwargs, error, field):
    with pytest.raises(error, match=field):
        batched_dataset(Toy(10), **{**ONE, **kwargs})


def test_ragged_examples_raise():
    with pytest.raises(ValueError, match="must have one shape"):
        next(iter(batched_dataset(_Ragged(4), global_batch_size=2, **ONE)))
