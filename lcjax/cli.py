"""The ``lcjax`` command: ``train``, ``eval`` and ``generate`` on a run directory.

::

    lcjax train --config configs/mqar.py:seq=64,pairs=4 --workdir runs/mqar [--config.optim.learning_rate=1e-3 ...]
    lcjax eval --workdir runs/mqar
    lcjax generate --workdir runs/mqar --prompt "5 40 9 50 5"

``python -m lcjax.train --config ... --workdir ...`` is ``lcjax train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

_TRAIN_EPILOG = """\
config overrides (ml_collections; the config is locked, so unknown keys are an error):
  --config.num_steps=2000  --config.optim.learning_rate=1e-3  --config.model.d_model=128
  --config.model.block_pattern="('attention',)"  --config.mesh.fsdp=4 --config.sharding=fsdp_tp

The run resumes from the latest checkpoint in --workdir. It writes <workdir>/config.json, checkpoints/,
metrics.jsonl, tensorboard/ and metrics.png. SIGTERM or Ctrl-C writes a checkpoint and exits; rerun to resume.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcjax", description="Train, evaluate and sample lcjax long-context models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train (or resume) an experiment", epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the experiment of --config in --workdir, resuming from its latest checkpoint.",
    )  # fmt: skip
    t.add_argument("--config", required=True, help="experiment file with get_config(arg): FILE or FILE:ARG, "
                   "e.g. configs/mqar.py:seq=64,pairs=8 or configs/mqar.py:smoke")  # fmt: skip
    t.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, plot)")

    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run on its held-out split")
    e.add_argument("--workdir", required=True, help="run directory written by `lcjax train`")

    g = sub.add_parser(
        "generate", help="continue a prompt with the latest checkpoint of a run",
        description="Text runs (config.data.kind='text') take --prompt as text and print text; synthetic-task "
        "runs take whitespace-separated token ids and print ids.",
    )  # fmt: skip
    g.add_argument("--workdir", required=True, help="run directory written by `lcjax train`")
    g.add_argument("--prompt", required=True, help="text (byte-level runs) or token ids such as '3 140 5 200 3'")
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    return p


def train_main(argv: Sequence[str]) -> int:
    """``--config=... --workdir=... [--config.key=value ...]`` (absl / ml_collections syntax) -> train."""
    from lcjax.train import config as config_lib
    from lcjax.train import loop

    try:
        config, workdir, rest = config_lib.parse_flags(list(argv))
    except ValueError as e:
        print(f"lcjax train: error: {e}", file=sys.stderr)
        return 2
    if rest:
        print(f"lcjax train: error: unexpected arguments {rest}", file=sys.stderr)
        return 2
    _mark_absl_flags_parsed()
    try:
        result = loop.train(config, workdir)
    except ValueError as e:
        print(f"lcjax train: error: {e}", file=sys.stderr)
        return 2
    except loop.NonFiniteError as e:
        print(f"lcjax train: {e}", file=sys.stderr)
        return 1
    return 0 if result is not None else 1


def _mark_absl_flags_parsed() -> None:
    # grain worker processes (data.worker_count > 0) read absl flags; the trainer does not use the global FLAGS.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_train_argv(args: argparse.Namespace, extra: list[str]) -> list[str] | str:
    unknown = [a for a in extra if not a.lstrip("-").startswith("config.")]
    if unknown:
        return f"unrecognized arguments {unknown} (overrides look like --config.key=value)"
    return ["lcjax", f"--config={args.config}", f"--workdir={args.workdir}", *extra]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        train_argv = _to_train_argv(args, extra)
        if isinstance(train_argv, str):
            parser.error(train_argv)
        return train_main(train_argv)
    if extra:
        parser.error(f"unrecognized arguments: {extra}")

    from lcjax.train import loop

    try:
        if args.command == "eval":
            print(json.dumps(loop.evaluate_workdir(args.workdir), indent=2))
            return 0
        _, cfg = loop.load_experiment(args.workdir)
        if cfg.data.kind == "text":
            from lcjax.data import ByteTokenizer

            tok = ByteTokenizer()
            prompt = [int(t) for t in tok.encode(args.prompt, add_eos=False)]
        else:
            try:
                prompt = [int(t) for t in args.prompt.split()]
            except ValueError:
                parser.error(f"--prompt: a token-level task takes whitespace-separated ids, not {args.prompt!r}")
        _, new = loop.generate_workdir(
            args.workdir, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
        )
        print(ByteTokenizer().decode(new) if cfg.data.kind == "text" else " ".join(map(str, new)))
        return 0
    except ValueError as e:
        print(f"lcjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
