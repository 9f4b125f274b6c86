"""The train command, ``lcjax train`` and ``python -m lcjax.train``: arguments -> ``ExperimentConfig`` -> ``loop.train``.

    python -m lcjax.train --config configs/mqar.py:smoke --workdir /tmp/run [--config.optim.learning_rate=1e-3 ...]

``--config FILE[:ARG]`` is the experiment file and its variant (``config_io.load_config_file``), every
``--config.<key>=<value>`` an override (``config_io.override``; a misspelt key is named) and ``--name value`` the same
as ``--name=value``. A user error (a missing file, a bad variant, override or value) prints one line on stderr and
returns exit status 2; a non-finite loss returns 1. ``lcjax/cli.py`` hands ``lcjax train ...`` to ``main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lcjax.checks import require
from lcjax.train import loop
from lcjax.train.config import ExperimentConfig
from lcjax.train.config_io import load_config_file, override

EPILOG = """\
config overrides (each names a key of the experiment's config; an unknown key is an error naming it):
  --config.num_steps=2000  --config.optim.learning_rate=1e-3  --config.model.d_model=128
  --config.model.block_pattern="('attention',)"  --config.model.mixers.mamba2.d_state=32
  --config.mesh.fsdp=4 --config.sharding=fsdp_tp

The run resumes from the latest checkpoint in --workdir. It writes <workdir>/config.json, checkpoints/,
metrics.jsonl, tensorboard/ and metrics.png. SIGTERM or Ctrl-C writes a checkpoint and exits; rerun to resume.
"""


def _help(prog: str) -> None:
    p = argparse.ArgumentParser(
        prog=prog, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the experiment of --config in --workdir, resuming from its latest checkpoint.",
    )  # fmt: skip
    p.add_argument("--config", required=True, help="experiment file with get_config(arg): FILE or FILE:ARG, "
                   "e.g. configs/mqar.py:seq=64,pairs=8 or configs/mqar.py:smoke")  # fmt: skip
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, plot)")
    p.parse_args(["--help"])  # prints the help and exits with 0


def parse_flags(argv: Sequence[str]) -> tuple[ExperimentConfig, str, list[str]]:
    """``[prog, --config=FILE[:ARG], --workdir=DIR, --config.key=value ...]`` -> ``(config, workdir, rest)``;
    ``rest`` holds the arguments that are none of these flags."""
    flags, overrides, rest, args = {}, {}, [], list(argv[1:])
    while args:
        arg = args.pop(0)
        name, eq, value = arg.removeprefix("--").partition("=")
        if not (arg.startswith("--") and (name in ("config", "workdir") or name.startswith("config."))):
            rest.append(arg)
            continue
        if not eq:
            require(bool(args) and not args[0].startswith("--"), f"--{name} needs a value (--{name}=...)")
            value = args.pop(0)
        if name.startswith("config."):
            overrides[name.removeprefix("config.")] = value
        else:
            flags[name] = value
    require("config" in flags, "--config is required (e.g. --config=configs/mqar.py:smoke)")
    require(bool(flags.get("workdir")), "--workdir is required")
    path, _, variant = flags["config"].partition(":")
    cfg = load_config_file(path, variant or None)
    require(isinstance(cfg, ExperimentConfig), f"config file {path!r}: get_config() returned a "
                                               f"{type(cfg).__name__}, not an lcjax.train.config.ExperimentConfig")
    return override(cfg, overrides, from_text=True), flags["workdir"], rest


def main(argv: Sequence[str]) -> int:
    """``[prog, --config=..., --workdir=..., --config.key=value ...]`` -> train; the exit status."""
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        _help(argv[0])
    try:
        cfg, workdir, rest = parse_flags(argv)
        require(not rest, f"unrecognized arguments {rest} (overrides look like --config.key=value)")
    except (TypeError, ValueError) as e:  # TypeError: a config file that builds a section with a wrong type
        return _error(e)
    _mark_absl_flags_parsed()
    try:
        result = loop.train(cfg, workdir)
    except ValueError as e:
        return _error(e)
    except loop.NonFiniteError as e:
        print(f"lcjax train: {e}", file=sys.stderr)
        return 1
    return 0 if result is not None else 1


def _error(e: Exception) -> int:
    print(f"lcjax train: error: {e}", file=sys.stderr)
    return 2


def _mark_absl_flags_parsed() -> None:
    # grain worker processes (data.worker_count > 0) read absl flags; the trainer does not use the global FLAGS.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
