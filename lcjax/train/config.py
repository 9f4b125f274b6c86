"""Experiment configs: typed frozen dataclasses that check themselves (Flax gemma's ``get_config()`` style).

An experiment file (``configs/*.py``) defines ``get_config(arg=None) -> ExperimentConfig``, ``arg`` being the variant
after the colon of ``configs/mqar.py:seq=64,smoke`` (``config_io.parse_arg``). Every section checks itself in
``__post_init__``, naming fields as the command line spells them (``config.optim.b2``); a plain option carries its
default and bounds in one line (``config_io.opt``). ``to_dict``/``from_dict`` are the JSON form of
``<workdir>/config.json``; ``config_io.override`` applies ``--config.a.b=value`` through them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from lcjax import data as data_lib
from lcjax.checks import require, require_choice
from lcjax.models.lm import LMConfig
from lcjax.ops.context_parallel import Layout
from lcjax.sharding import ShardingRules
from lcjax.train import config_io
from lcjax.train.config_io import check_fields, opt


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``learning_rate * final_lr_fraction`` at ``num_steps``."""

    learning_rate: float = opt(3e-3, min=0.0)
    warmup_steps: int = opt(100, min=0)
    final_lr_fraction: float = opt(0.1, min=0.0, max=1.0)
    weight_decay: float = opt(0.1, min=0.0)  # decoupled; applied to matrices (ndim >= 2) only
    b1: float = opt(0.9, min=0.0, max=1.0)
    b2: float = opt(0.98, min=0.0, max=1.0)
    eps: float = opt(1e-8, min=0.0)
    grad_clip: float = opt(1.0, min=0.0)  # clip the global gradient norm to this; 0 = no clipping
    grad_accum_steps: int = opt(1, min=1)  # micro-batches per step (the batch is split; the update is the same)

    def __post_init__(self):
        check_fields(self, "config.optim")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh axis sizes (one may be -1: the rest of the devices) over the first ``num_devices`` devices (0 = all)."""

    data: int = opt(-1, min=-1)
    fsdp: int = opt(1, min=-1)
    context: int = opt(1, min=-1)
    tensor: int = opt(1, min=-1)
    num_devices: int = opt(0, min=0)

    def __post_init__(self):
        check_fields(self, "config.mesh")
        axes = {name: size for name, size in vars(self).items() if name != "num_devices"}
        for name, size in axes.items():
            require(size != 0, f"config.mesh.{name}=0 must be a positive int or -1 (the rest of the devices)")
        require(list(axes.values()).count(-1) <= 1, f"config.mesh: only one axis may be -1, got {axes}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticDataConfig:
    """A synthetic task of ``lcjax.data`` (``data.TASKS``); train and held-out splits drawn from ``seed``."""

    task: data_lib.TaskConfig
    num_train: int = opt(100_000, min=1)
    num_validation: int = opt(3_000, min=1)
    seed: int = opt(0, min=0)
    data_dir: str | None = None  # None: generate in memory; else prepare/read the TFDS ArrayRecord dataset there
    worker_count: int = opt(0, min=0)

    kind = "synthetic"
    seq_len = property(lambda self: self.task.seq_len)
    vocab_size = property(lambda self: self.task.vocab_size)

    def __post_init__(self):
        check_fields(self, "config.data")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """Byte-level text from local files (``data.TextFileSource``): packed rows of ``seq_len``; eval on other files."""

    train_files: str
    eval_files: str
    seq_len: int = opt(min=1)
    separator: str | None = None
    seed: int = opt(0, min=0)
    worker_count: int = opt(0, min=0)

    kind = "text"
    vocab_size = data_lib.ByteTokenizer.vocab_size

    def __post_init__(self):
        check_fields(self, "config.data")


DATA = {cls.kind: cls for cls in (SyntheticDataConfig, TextDataConfig)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything one training run needs, checked. Steps count completed updates (1 .. ``num_steps``)."""

    model: LMConfig
    data: SyntheticDataConfig | TextDataConfig
    batch_size: int = opt(min=1)  # global, in sequences
    num_steps: int = opt(min=1)
    eval_batch_size: int = opt(0, min=0)  # 0 -> batch_size
    optim: OptimConfig = OptimConfig()
    z_loss: float = opt(0.0, min=0.0)  # PaLM z-loss coefficient on logsumexp^2
    mesh: MeshConfig = MeshConfig()
    sharding: str = "dp"  # lcjax.sharding.ShardingRules.from_name preset(s), e.g. "fsdp_tp"
    context_layout: str = opt("contiguous", choices=tuple(x.value for x in Layout))  # token order over `context`
    seed: int = opt(0, min=0)  # model init and the per-step RNG; data order has its own config.data.seed
    log_every: int = opt(50, min=1)
    eval_every: int = opt(500, min=0)  # 0 -> only at the end
    checkpoint_every: int = opt(500, min=0)  # 0 -> only at the end (and on SIGTERM)
    keep_checkpoints: int = opt(3, min=1)
    eval_batches: int = opt(0, min=0)  # 0 -> the whole held-out split
    progress_bar: bool = True
    inject_nan_at_step: int = opt(0, min=0)  # test hook: the update of this step uses a NaN learning rate (0 = off)

    def __post_init__(self):
        check_fields(self, "config")
        try:
            ShardingRules.from_name(self.sharding)
        except ValueError as e:
            raise ValueError(f"config.sharding={self.sharding!r}: {e}") from None
        recurrent = sorted(set(self.model.block_pattern) - {"attention"})
        require(self.context_layout == "contiguous" or not recurrent, f"config.context_layout={self.context_layout!r}"
                f": {recurrent} blocks read the sequence in order; only 'contiguous' keeps it (attention-only models "
                "may use zigzag / striped)")  # fmt: skip
        require(self.model.vocab_size >= self.data.vocab_size, f"config.model.vocab_size={self.model.vocab_size} is "
                f"smaller than the data's vocabulary ({self.data.vocab_size} ids)")  # fmt: skip
        require(self.model.max_seq_len >= self.data.seq_len, f"config.model.max_seq_len={self.model.max_seq_len} < "
                f"the data's seq_len={self.data.seq_len}")  # fmt: skip
        require(self.batch_size % self.optim.grad_accum_steps == 0, f"config.batch_size={self.batch_size} must be "
                f"divisible by config.optim.grad_accum_steps={self.optim.grad_accum_steps}")  # fmt: skip

    @property
    def rules(self) -> ShardingRules:
        return ShardingRules.from_name(self.sharding)

    @property
    def global_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def check_data_parallel(self, dp: int) -> None:
        """Batch sizes must split evenly over the ``dp`` data-parallel shards (per micro-batch)."""
        accum = self.optim.grad_accum_steps
        per = f" / grad_accum_steps={accum}" if accum > 1 else ""
        require((self.batch_size // accum) % dp == 0, f"config.batch_size={self.batch_size}{per} must be divisible by "
                f"the data-parallel size {dp}")  # fmt: skip
        require(self.global_eval_batch_size % dp == 0, f"config.eval_batch_size={self.global_eval_batch_size} must "
                f"be divisible by the data-parallel size {dp}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars, with ``data`` as ``{kind, task: <TASKS name>, task_args: {...}, ...}``."""
        d = config_io.to_dict(self)
        if isinstance(self.data, SyntheticDataConfig):
            d["data"]["task"], d["data"]["task_args"] = self.data.task.task, d["data"]["task"]
        d["data"] = {"kind": self.data.kind, **d["data"]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
        """The config of ``to_dict``'s form, rebuilt and checked; a bad key or value raises ``ValueError`` naming it."""
        d = dict(config_io.section(d, "config"))
        if "data" in d:
            data = dict(config_io.section(d["data"], "config.data"))
            kind = require_choice("config.data.kind", data.pop("kind", None), tuple(DATA))
            if kind == "synthetic":
                task = require_choice("config.data.task", data.pop("task", None), tuple(data_lib.TASKS))
                task_args = data.pop("task_args", {})
                data["task"] = config_io.from_dict(data_lib.TASKS[task], task_args, "config.data.task_args")
            d["data"] = config_io.from_dict(DATA[kind], data, "config.data")
        return config_io.from_dict(cls, d, "config")


def config_to_json(cfg: ExperimentConfig) -> str:
    """``cfg.to_dict()`` as JSON (``<workdir>/config.json``; ``config_from_json`` reads it back)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(json.loads(text))
