"""TFDS builders (ArrayRecord, no TensorFlow needed) that freeze the synthetic tasks of ``synthetic.py`` on disk.

One builder per task, registered on import as ``lcjax_mqar``, ``lcjax_induction_heads``, ``lcjax_selective_copying``
and ``lcjax_passkey``. A builder config holds the task config, the seed and the split sizes; its name is derived
from them (``mqar_L64_K4_V8192_a0.01_zeros_n100000-3000_s0``), so every setting gets its own directory under
``data_dir/<builder>/<config>/<version>``. Examples are written in index order (``disable_shuffling``): record ``i``
of a split equals ``synthetic.generate(task, i, seed=seed, split=split)``, the same data as ``SyntheticSource``.

Usage::

    task = MQARConfig(seq_len=64, num_kv_pairs=4)
    prepare_synthetic(task, data_dir="/data/tfds", num_train=100_000, num_validation=3_000)   # once
    src = synthetic_tfds_source(task, split="validation", data_dir="/data/tfds", num_train=100_000,
                                num_validation=3_000)                    # grain-ready random access
    # or, in any process, by name (needs only the files): tfds.data_source("lcjax_mqar/<config name>", ...)

Notes (tensorflow-datasets 4.9.10 without TensorFlow): ``_info`` returns ``tfds.core.DatasetInfo(builder=self,
...)`` (``dataset_info_from_configs`` fails outside a dataset package); only ``file_format="array_record"`` prepares
without TensorFlow, and such datasets are read with ``tfds.data_source`` / ``builder.as_data_source()``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lcjax.checks import require_int
from lcjax.data import synthetic
from lcjax.data.synthetic import (
    InductionHeadsConfig,
    MQARConfig,
    PasskeyConfig,
    SelectiveCopyingConfig,
    TaskConfig,
)

VERSION = "1.0.0"  # bump whenever a generator in synthetic.py changes what it writes


@dataclasses.dataclass(kw_only=True)
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """A task config plus the seed and split sizes; ``name`` is set by ``synthetic_builder_config``."""

    task: Any = None
    seed: int = 0
    num_train: int = 0
    num_validation: int = 0


def synthetic_builder_config(
    task: TaskConfig, *, num_train: int, num_validation: int, seed: int = 0
) -> SyntheticBuilderConfig:
    """The builder config of ``task`` with ``num_train`` / ``num_validation`` examples drawn with ``seed``."""
    if type(task) not in synthetic.TASKS.values():
        raise TypeError(f"synthetic_builder_config: task must be a task config of lcjax.data.synthetic, got "
                        f"{type(task).__name__}")  # fmt: skip
    num_train = require_int("synthetic_builder_config: num_train", num_train, min=1)
    num_validation = require_int("synthetic_builder_config: num_validation", num_validation, min=1)
    seed = require_int("synthetic_builder_config: seed", seed, min=0)
    return SyntheticBuilderConfig(
        name=f"{task.name}_n{num_train}-{num_validation}_s{seed}",
        version=VERSION,
        description=f"{task!r}, seed={seed}, train={num_train}, validation={num_validation}",
        task=task,
        seed=int(seed),
        num_train=int(num_train),
        num_validation=int(num_validation),
    )


class _SyntheticTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body of the four task builders: features from the task's ``seq_len``, examples from ``generate``."""

    VERSION = tfds.core.Version(VERSION)
    TASK_TYPE: type

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves the code path of a builder inside a package through `importlib_resources`, which it
        # does not depend on (ModuleNotFoundError on prepare); the file of the class is what it falls back to anyway.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if not isinstance(cfg.task, self.TASK_TYPE):
            raise ValueError(f"{type(self).__name__} needs a {self.TASK_TYPE.__name__} task, got {cfg.task!r}")
        L = cfg.task.seq_len
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"lcjax synthetic task {cfg.task!r} (lcjax/data/synthetic.py), seed {cfg.seed}.",
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(L,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(L,), dtype=np.int32),
                    "loss_mask": tfds.features.Tensor(shape=(L,), dtype=np.bool_),
                    "index": np.int64,
                }
            ),
            disable_shuffling=True,  # record i == example i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        for i in range(num_examples):
            yield i, dict(synthetic.generate(cfg.task, i, seed=cfg.seed, split=split), index=i)


def _presets(tasks: list[TaskConfig], num_train: int, num_validation: int) -> list[SyntheticBuilderConfig]:
    return [synthetic_builder_config(t, num_train=num_train, num_validation=num_validation) for t in tasks]


class LcjaxMqar(_SyntheticTaskBuilder):
    """MQAR; presets: the Zoology Figure 2 cells (V=8192, zero filler, 100k train / 3k validation)."""

    TASK_TYPE = MQARConfig
    BUILDER_CONFIGS = _presets(
        [MQARConfig(seq_len=T, num_kv_pairs=K) for T, K in ((64, 4), (128, 8), (256, 16), (512, 64))], 100_000, 3_000
    )


class LcjaxInductionHeads(_SyntheticTaskBuilder):
    """Induction heads; preset: Mamba's training length 256, vocab 16."""

    TASK_TYPE = InductionHeadsConfig
    BUILDER_CONFIGS = _presets([InductionHeadsConfig(seq_len=256, vocab_size=16)], 100_000, 1_000)


class LcjaxSelectiveCopying(_SyntheticTaskBuilder):
    """Selective copying; presets: a CPU length 256 and Mamba's 4096 (16 data tokens, vocab 16)."""

    TASK_TYPE = SelectiveCopyingConfig
    BUILDER_CONFIGS = _presets([SelectiveCopyingConfig(seq_len=L) for L in (256, 4096)], 100_000, 1_000)


class LcjaxPasskey(_SyntheticTaskBuilder):
    """Token-level passkey retrieval; presets: lengths 256 and 1024, 5 digits, uniform depth."""

    TASK_TYPE = PasskeyConfig
    BUILDER_CONFIGS = _presets([PasskeyConfig(seq_len=L) for L in (256, 1024)], 100_000, 1_000)


_BUILDERS: dict[type, type[_SyntheticTaskBuilder]] = {
    MQARConfig: LcjaxMqar,
    InductionHeadsConfig: LcjaxInductionHeads,
    SelectiveCopyingConfig: LcjaxSelectiveCopying,
    PasskeyConfig: LcjaxPasskey,
}


def synthetic_builder(
    task: TaskConfig, *, data_dir: str, num_train: int, num_validation: int, seed: int = 0
) -> _SyntheticTaskBuilder:
    """The (not yet prepared) TFDS builder of ``task`` rooted at ``data_dir``."""
    config = synthetic_builder_config(task, num_train=num_train, num_validation=num_validation, seed=seed)
    return _BUILDERS[type(task)](config=config, data_dir=data_dir, file_format="array_record")


def prepare_synthetic(
    task: TaskConfig, *, data_dir: str, num_train: int, num_validation: int, seed: int = 0
) -> _SyntheticTaskBuilder:
    """Writes the train and validation splits of ``task`` to ``data_dir`` (a no-op when already prepared)."""
    builder = synthetic_builder(task, data_dir=data_dir, num_train=num_train, num_validation=num_validation, seed=seed)
    builder.download_and_prepare(file_format="array_record")
    return builder


def synthetic_tfds_source(
    task: TaskConfig,
    *,
    split: str,
    data_dir: str,
    num_train: int,
    num_validation: int,
    seed: int = 0,
    prepare: bool = True,
):
    """Random-access source (``len``, ``[i]``) over a prepared split; prepares it first unless ``prepare=False``.

    ``split`` accepts TFDS slicing (``"train[:1000]"``). Records are dicts of NumPy arrays: ``inputs``, ``targets``
    (int32 [L]), ``loss_mask`` (bool [L]) and ``index`` (int64).
    """
    builder = synthetic_builder(task, data_dir=data_dir, num_train=num_train, num_validation=num_validation, seed=seed)
    if prepare:
        builder.download_and_prepare(file_format="array_record")
    elif not builder.is_prepared():
        raise ValueError(f"data_dir={data_dir!r} holds no prepared {builder.name}/{builder.builder_config.name}")
    return builder.as_data_source(split=split)
