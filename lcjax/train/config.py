"""Experiment configs: ml_collections ``ConfigDict`` files in, typed frozen dataclasses out.

An experiment file (``configs/*.py``) defines ``get_config(arg=None) -> ConfigDict``; ``arg`` is the text after the
colon of ``configs/mqar.py:seq=64,pairs=8`` and is read with ``parse_arg`` (big_vision's
``big_vision/configs/common.py`` idea: typed ``key=value`` pairs plus bare flags such as ``smoke``). Command-line
overrides (``--config.optim.learning_rate=1e-3``) are applied by ``ml_collections.config_flags`` on a locked config
(``parse_flags``), so a misspelt key fails instead of adding a field.

``ExperimentConfig.from_config(cd)`` then turns the ``ConfigDict`` into typed values once, before anything is built:
every unknown key, wrong type or out-of-range value raises ``ValueError`` naming the field (``config.optim.lr``,
``config.data.task_args.seq_len``). The ``model`` section is passed field by field to ``lcjax.models.lm.LMConfig``
(nested dataclass fields such as ``rope`` from sub-dicts, tuples from lists), so new block types plug in through
``block_pattern`` and ``LMConfig`` fields without touching the trainer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from lcjax import data as data_lib
from lcjax.models.lm import LMConfig
from lcjax.ops.context_parallel import Layout
from lcjax.sharding import ShardingRules

# ------------------------------------------------------------------------------------------------ arg parsing


def parse_arg(arg: str | None, *, lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
    """``"seq=64,pairs=8,smoke"`` -> ``ConfigDict(seq=64, pairs=8, smoke=True, <other spec defaults>)``.

    ``spec`` gives every allowed key with its default; values are converted to the default's type (``bool`` from
    ``true/false/1/0`` or a bare key, ``int``, ``float``, ``str``). Unknown keys raise ``ValueError``; ``lazy=True``
    keeps them as strings instead.
    """
    out = dict(spec)
    if arg:
        for item in (s.strip() for s in arg.split(",")):
            if not item:
                continue
            key, eq, text = item.partition("=")
            key = key.strip()
            if key not in spec:
                if not lazy:
                    raise ValueError(f"config arg: unknown key {key!r} in {arg!r}; allowed: {sorted(spec)}")
                out[key] = text if eq else True
                continue
            default = spec[key]
            if not eq:
                if not isinstance(default, bool):
                    raise ValueError(f"config arg: {key!r} needs a value ({key}=...); only bool keys may stand alone")
                out[key] = True
            else:
                out[key] = _convert(key, text.strip(), default)
    return ml_collections.ConfigDict(out)


def _convert(key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(f"config arg: {key}={text!r} is not a valid {type(default).__name__}") from None
    return text


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the Python file at ``path`` (how ``configs/default.py`` reuses ``configs/mqar.py``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    name = "lcjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg) if arg is not None else module.get_config()


# ------------------------------------------------------------------------------------------------ command line


def parse_flags(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, list[str]]:
    """Parse ``--config=FILE[:ARG] [--config.key=value ...] --workdir=DIR`` with ``ml_collections.config_flags``.

    Returns ``(config, workdir, remaining_argv)``; the config is locked (``lock_config=True``), so overriding a key
    that does not exist raises ``ValueError`` naming it, as does a value of the wrong type.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = [argv[0] if argv else "lcjax", *argv[1:]]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "experiment file with get_config(arg); FILE:ARG passes ARG", flag_values=fv, lock_config=True,
        sys_argv=argv,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots", flag_values=fv)
    try:
        rest = fv(argv)
    except (AttributeError, KeyError) as e:  # config_flags: override of a key that does not exist
        key = str(e).strip("'\"")
        overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
        named = [o for o in overrides if o.split(".")[-1] == key] or overrides
        raise ValueError(f"unknown config key {named[0] if named else key!r} (the config is locked)") from None
    except flags.Error as e:
        raise ValueError(str(e)) from None
    if fv.config is None:
        raise ValueError("--config is required (e.g. --config=configs/mqar.py:smoke)")
    if not fv.workdir:
        raise ValueError("--workdir is required")
    return fv.config, fv.workdir, list(rest[1:])


# ------------------------------------------------------------------------------------------------ typed sections


def _fail(field: str, msg: str) -> ValueError:
    """``ValueError("config.x=3 must be ...")`` for messages starting with ``=``, else ``"config.x: msg"``."""
    return ValueError(f"{field}{msg}" if msg.startswith("=") else f"{field}: {msg}")


def _int(field: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(field, f"={value} must be >= {minimum}")
    return int(value)


def _float(field: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, f"must be a number, got {value!r}")
    value = float(value)
    if value != value or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
        raise _fail(field, f"={value} must be a number {' and '.join(bounds)}")
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"must be a bool, got {value!r}")
    return value


def _str(field: str, value: Any, allowed: Sequence[str] | None = None, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, got {value!r}")
    if allowed is not None and value not in allowed:
        raise _fail(field, f"={value!r}; allowed: {list(allowed)}")
    return value


def _as_dict(field: str, value: Any) -> dict[str, Any]:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise _fail(field, f"must be a section (dict), got {value!r}")


def _check_keys(field: str, d: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in d:
        if key not in allowed:
            raise _fail(f"{field}.{key}", f"unknown key; allowed keys of {field}: {sorted(allowed)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``learning_rate * final_lr_fraction`` at ``num_steps``."""

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1  # decoupled; applied to matrices (ndim >= 2) only
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    grad_accum_steps: int = 1  # micro-batches per step (the batch is split; the update is the same as one batch)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "config.optim") -> OptimConfig:
        _check_keys(field, d, [f.name for f in dataclasses.fields(cls)])
        d = {**{f.name: f.default for f in dataclasses.fields(cls)}, **d}
        return cls(
            learning_rate=_float(f"{field}.learning_rate", d["learning_rate"], 0.0),
            warmup_steps=_int(f"{field}.warmup_steps", d["warmup_steps"], 0),
            final_lr_fraction=_float(f"{field}.final_lr_fraction", d["final_lr_fraction"], 0.0, 1.0),
            weight_decay=_float(f"{field}.weight_decay", d["weight_decay"], 0.0),
            b1=_float(f"{field}.b1", d["b1"], 0.0, 1.0),
            b2=_float(f"{field}.b2", d["b2"], 0.0, 1.0),
            eps=_float(f"{field}.eps", d["eps"], 0.0),
            grad_clip=_float(f"{field}.grad_clip", d["grad_clip"], 0.0),
            grad_accum_steps=_int(f"{field}.grad_accum_steps", d["grad_accum_steps"], 1),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh axis sizes (one may be -1: the rest of the devices) over the first ``num_devices`` devices (0 = all)."""

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1
    num_devices: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "config.mesh") -> MeshConfig:
        _check_keys(field, d, [f.name for f in dataclasses.fields(cls)])
        d = {**{f.name: f.default for f in dataclasses.fields(cls)}, **d}
        sizes = {}
        for name in ("data", "fsdp", "context", "tensor"):
            v = _int(f"{field}.{name}", d[name])
            if v < 1 and v != -1:
                raise _fail(f"{field}.{name}", f"={v} must be a positive int or -1")
            sizes[name] = v
        if sum(v == -1 for v in sizes.values()) > 1:
            raise _fail(field, f"only one axis may be -1, got {sizes}")
        return cls(**sizes, num_devices=_int(f"{field}.num_devices", d["num_devices"], 0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticDataConfig:
    """A synthetic task of ``lcjax.data`` (``task`` in ``data.TASKS``); train and held-out splits from ``seed``."""

    task: data_lib.TaskConfig
    num_train: int = 100_000
    num_validation: int = 3_000
    seed: int = 0
    data_dir: str | None = None  # None: generate in memory; else prepare/read the TFDS ArrayRecord dataset there
    worker_count: int = 0

    kind = "synthetic"

    @property
    def seq_len(self) -> int:
        return self.task.seq_len

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """Byte-level text from local files (``data.TextFileSource``): packed rows of ``seq_len``; eval on other files."""

    train_files: str
    eval_files: str
    seq_len: int
    separator: str | None = None
    seed: int = 0
    worker_count: int = 0

    kind = "text"
    vocab_size = data_lib.ByteTokenizer.vocab_size


_DATA_KEYS = {
    "synthetic": ("kind", "task", "task_args", "num_train", "num_validation", "seed", "data_dir", "worker_count"),
    "text": ("kind", "train_files", "eval_files", "seq_len", "separator", "seed", "worker_count"),
}


def data_config_from_dict(d: Mapping[str, Any], field: str = "config.data") -> SyntheticDataConfig | TextDataConfig:
    kind = _str(f"{field}.kind", d.get("kind", "synthetic"), tuple(_DATA_KEYS))
    _check_keys(field, d, _DATA_KEYS[kind])
    common = dict(
        seed=_int(f"{field}.seed", d.get("seed", 0), 0),
        worker_count=_int(f"{field}.worker_count", d.get("worker_count", 0), 0),
    )
    if kind == "text":
        for key in ("train_files", "eval_files", "seq_len"):
            if d.get(key) is None:
                raise _fail(f"{field}.{key}", "is required for data.kind='text'")
        return TextDataConfig(
            train_files=_str(f"{field}.train_files", d["train_files"]),
            eval_files=_str(f"{field}.eval_files", d["eval_files"]),
            seq_len=_int(f"{field}.seq_len", d["seq_len"], 1),
            separator=_str(f"{field}.separator", d.get("separator"), optional=True),
            **common,
        )
    task_name = _str(f"{field}.task", d.get("task", "mqar"), sorted(data_lib.TASKS))
    task_args = _as_dict(f"{field}.task_args", d.get("task_args", {}))
    allowed = [f.name for f in dataclasses.fields(data_lib.TASKS[task_name])]
    _check_keys(f"{field}.task_args", task_args, allowed)
    try:
        task = data_lib.make_task(task_name, **task_args)
    except ValueError as e:
        raise _fail(f"{field}.task_args", str(e)) from None
    return SyntheticDataConfig(
        task=task,
        num_train=_int(f"{field}.num_train", d.get("num_train", 100_000), 1),
        num_validation=_int(f"{field}.num_validation", d.get("num_validation", 3_000), 1),
        data_dir=_str(f"{field}.data_dir", d.get("data_dir"), optional=True),
        **common,
    )


def lm_config_from_dict(d: Mapping[str, Any], field: str = "config.model") -> LMConfig:
    """``LMConfig(**d)``: sub-dicts become the dataclass their field is annotated with (``rope: RopeConfig``,
    ``mamba2: Mamba2Config | None``, ...), lists become tuples, and unknown keys are refused by name."""
    return _build_dataclass(LMConfig, d, field)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type of an annotation ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _build_dataclass(cls: type, d: Mapping[str, Any], field: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    _check_keys(field, d, names)
    kw = {}
    for name, value in d.items():
        sub_cls = _dataclass_in(hints.get(name))
        if sub_cls is not None and isinstance(value, (Mapping, ml_collections.ConfigDict)):
            value = _build_dataclass(sub_cls, _as_dict(f"{field}.{name}", value), f"{field}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kw[name] = value
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise _fail(field, str(e)) from None


# ------------------------------------------------------------------------------------------------ experiment

_TOP_KEYS = (
    "seed", "model", "data", "batch_size", "eval_batch_size", "num_steps", "optim", "z_loss", "mesh", "sharding",
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "progress_bar",
    "inject_nan_at_step", "context_layout",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything one training run needs, validated. Steps count completed updates (1 .. ``num_steps``)."""

    model: LMConfig
    data: SyntheticDataConfig | TextDataConfig
    batch_size: int  # global, in sequences
    num_steps: int
    eval_batch_size: int = 0  # 0 -> batch_size
    optim: OptimConfig = OptimConfig()
    z_loss: float = 0.0  # PaLM z-loss coefficient on logsumexp^2
    mesh: MeshConfig = MeshConfig()
    sharding: str = "dp"  # lcjax.sharding.ShardingRules.from_name preset(s), e.g. "fsdp_tp"
    context_layout: str = "contiguous"  # token order over the context axis: contiguous | zigzag | striped
    seed: int = 0  # model init and the per-step RNG; data order has its own config.data.seed
    log_every: int = 50
    eval_every: int = 500  # 0 -> only at the end
    checkpoint_every: int = 500  # 0 -> only at the end (and on SIGTERM)
    keep_checkpoints: int = 3
    eval_batches: int = 0  # 0 -> the whole held-out split
    progress_bar: bool = True
    inject_nan_at_step: int = 0  # test hook: the update of this step uses a NaN learning rate (0 = off)

    @property
    def rules(self) -> ShardingRules:
        return ShardingRules.from_name(self.sharding)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> ExperimentConfig:
        d = _as_dict("config", config)
        _check_keys("config", d, _TOP_KEYS)
        for key in ("model", "data", "batch_size", "num_steps"):
            if key not in d:
                raise _fail(f"config.{key}", "is required")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        get = lambda k: d.get(k, defaults[k])  # noqa: E731
        model = lm_config_from_dict(_as_dict("config.model", d["model"]))
        data = data_config_from_dict(_as_dict("config.data", d["data"]))
        sharding = _str("config.sharding", get("sharding"))
        try:
            ShardingRules.from_name(sharding)
        except ValueError as e:
            raise _fail("config.sharding", str(e)) from None
        cfg = cls(
            model=model,
            data=data,
            batch_size=_int("config.batch_size", d["batch_size"], 1),
            num_steps=_int("config.num_steps", d["num_steps"], 1),
            eval_batch_size=_int("config.eval_batch_size", get("eval_batch_size"), 0),
            optim=OptimConfig.from_dict(_as_dict("config.optim", d.get("optim", {}))),
            z_loss=_float("config.z_loss", get("z_loss"), 0.0),
            mesh=MeshConfig.from_dict(_as_dict("config.mesh", d.get("mesh", {}))),
            sharding=sharding,
            seed=_int("config.seed", get("seed"), 0),
            log_every=_int("config.log_every", get("log_every"), 1),
            eval_every=_int("config.eval_every", get("eval_every"), 0),
            checkpoint_every=_int("config.checkpoint_every", get("checkpoint_every"), 0),
            keep_checkpoints=_int("config.keep_checkpoints", get("keep_checkpoints"), 1),
            eval_batches=_int("config.eval_batches", get("eval_batches"), 0),
            progress_bar=_bool("config.progress_bar", get("progress_bar")),
            inject_nan_at_step=_int("config.inject_nan_at_step", get("inject_nan_at_step"), 0),
            context_layout=_str("config.context_layout", get("context_layout"), [layout.value for layout in Layout]),
        )
        recurrent = sorted(set(cfg.model.block_pattern) - {"attention"})
        if cfg.context_layout != "contiguous" and recurrent:
            raise _fail(
                "config.context_layout", f"={cfg.context_layout!r}: {recurrent} blocks read the sequence in order; "
                "only 'contiguous' keeps it (attention-only models may use zigzag / striped)",
            )  # fmt: skip
        if cfg.model.vocab_size < data.vocab_size:
            raise _fail(
                "config.model.vocab_size", f"={cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({data.vocab_size} ids)",
            )  # fmt: skip
        if cfg.model.max_seq_len < data.seq_len:
            raise _fail("config.model.max_seq_len", f"={cfg.model.max_seq_len} < the data's seq_len={data.seq_len}")
        if cfg.batch_size % cfg.optim.grad_accum_steps:
            raise _fail(
                "config.batch_size", f"={cfg.batch_size} must be divisible by "
                f"config.optim.grad_accum_steps={cfg.optim.grad_accum_steps}",
            )  # fmt: skip
        return cfg

    @property
    def global_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def check_data_parallel(self, dp: int) -> None:
        """Batch sizes must split evenly over the ``dp`` data-parallel shards (per micro-batch)."""
        micro = self.batch_size // self.optim.grad_accum_steps
        if micro % dp:
            what = "" if self.optim.grad_accum_steps == 1 else f" / grad_accum_steps={self.optim.grad_accum_steps}"
            raise _fail(
                "config.batch_size", f"={self.batch_size}{what} must be divisible by the data-parallel size {dp}"
            )
        if self.global_eval_batch_size % dp:
            raise _fail(
                "config.eval_batch_size", f"={self.global_eval_batch_size} must be divisible by the data-parallel "
                f"size {dp}",
            )  # fmt: skip


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The ConfigDict as JSON (written to ``<workdir>/config.json``; ``config_from_json`` reads it back)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, ml_collections.FieldReference):
        return obj.get()
    raise TypeError(f"config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
