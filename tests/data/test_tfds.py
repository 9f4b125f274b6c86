"""TFDS builders: prepared ArrayRecord datasets equal the in-memory generators and open without TensorFlow."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lcjax.data import SyntheticSource, synthetic_datasets
from lcjax.data import tfds_builders as tb
from lcjax.data.synthetic import InductionHeadsConfig, MQARConfig, PasskeyConfig, SelectiveCopyingConfig

tfds.disable_progress_bar()

TASKS = [
    MQARConfig(seq_len=32, num_kv_pairs=4, vocab_size=64, random_non_queries=True),
    InductionHeadsConfig(seq_len=32),
    SelectiveCopyingConfig(seq_len=32, num_tokens=4),
    PasskeyConfig(seq_len=32, num_digits=3),
]
SIZES = dict(num_train=24, num_validation=8, seed=5)
KEYS = ("inputs", "targets", "loss_mask", "index")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    for task in TASKS:
        tb.prepare_synthetic(task, data_dir=str(path), **SIZES)
    return str(path)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_prepared_equals_in_memory(data_dir, task, split):
    src = tb.synthetic_tfds_source(task, split=split, data_dir=data_dir, prepare=False, **SIZES)
    mem = SyntheticSource(task, split=split, num_examples=SIZES[f"num_{split}"], seed=SIZES["seed"])
    assert len(src) == len(mem)
    for i in range(len(mem)):
        a, b = src[i], mem[i]
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])
            assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k


def test_split_slicing_and_name_lookup(data_dir):
    task = TASKS[0]
    name = f"lcjax_mqar/{tb.synthetic_builder_config(task, **SIZES).name}"
    src = tfds.data_source(name, split="train[:5]", data_dir=data_dir)
    assert len(src) == 5 and [int(src[i]["index"]) for i in range(5)] == list(range(5))
    mem = SyntheticSource(task, split="train", num_examples=24, seed=5)
    np.testing.assert_array_equal(src[3]["inputs"], mem[3]["inputs"])


def test_reads_in_a_fresh_process_without_lcjax_or_tensorflow(data_dir):
    """Opening by name needs only the prepared files: no lcjax import, and TensorFlow is never imported."""
    name = f"lcjax_passkey/{tb.synthetic_builder_config(TASKS[3], **SIZES).name}"
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        f"s = tfds.data_source({name!r}, split='validation', data_dir={data_dir!r})\n"
        "print(len(s), s[2]['inputs'].tolist())\n"
        "assert 'tensorflow' not in sys.modules and 'lcjax' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, inputs = out.stdout.strip().split(" ", 1)
    want = SyntheticSource(TASKS[3], split="validation", num_examples=8, seed=5)[2]["inputs"].tolist()
    assert int(n) == 8 and inputs == str(want)


def test_pipeline_from_tfds_equals_in_memory(data_dir):
    task = TASKS[1]
    kw = dict(global_batch_size=4, num_train=24, num_validation=8, seed=5, process_index=0, process_count=1)
    train_a, eval_a = synthetic_datasets(task, data_dir=data_dir, **kw)
    train_b, eval_b = synthetic_datasets(task, **kw)
    it_a, it_b = iter(train_a), iter(train_b)
    for _ in range(8):  # crosses an epoch boundary (6 batches per epoch)
        a, b = next(it_a), next(it_b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(eval_a, eval_b, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_presets_and_config_checks(tmp_path):
    for builder_cls in (tb.LcjaxMqar, tb.LcjaxInductionHeads, tb.LcjaxSelectiveCopying, tb.LcjaxPasskey):
        names = [c.name for c in builder_cls.BUILDER_CONFIGS]
        assert len(set(names)) == len(names)
        assert all(isinstance(c.task, builder_cls.TASK_TYPE) for c in builder_cls.BUILDER_CONFIGS)
    builder = tfds.builder("lcjax_mqar/mqar_L64_K4_V8192_a0.01_zeros_n100000-3000_s0", data_dir=str(tmp_path))
    assert builder.builder_config.task == MQARConfig(seq_len=64, num_kv_pairs=4)
    assert builder.info.features["inputs"].shape == (64,)
    with pytest.raises(ValueError, match="num_train"):
        tb.synthetic_builder_config(MQARConfig(), num_train=0, num_validation=1)
    with pytest.raises(ValueError, match="data_dir"):
        tb.synthetic_tfds_source(MQARConfig(), split="train", data_dir=str(tmp_path), num_train=4, num_validation=4,
                                 prepare=False)
