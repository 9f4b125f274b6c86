"""The ``lcjax`` command: ``train``, ``eval`` and ``generate`` on a run directory.

::

    lcjax train --config configs/mqar.py:seq=64,pairs=4 --workdir runs/mqar [--config.optim.learning_rate=1e-3 ...]
    lcjax eval --workdir runs/mqar
    lcjax generate --workdir runs/mqar --prompt "5 40 9 50 5"
    lcjax generate --gguf SmolLM2-135M-Instruct.Q4_1.gguf --prompt "The capital of France is"

``lcjax train`` is ``lcjax/train/command.py`` (also ``python -m lcjax.train``). A user error (a missing config file,
a bad variant or override, a prompt outside the vocabulary) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcjax", description="Train, evaluate and sample lcjax long-context models.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train (or resume) an experiment: lcjax train --config FILE[:ARG] --workdir DIR "
                   "[--config.key=value ...]; see lcjax train --help")  # fmt: skip

    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run on its held-out split")
    e.add_argument("--workdir", required=True, help="run directory written by `lcjax train`")

    g = sub.add_parser(
        "generate", help="continue a prompt with the latest checkpoint of a run",
        description="Text runs (config.data.kind='text') and GGUF files take --prompt as text and print text; "
        "synthetic-task runs take whitespace-separated token ids and print ids.",
    )  # fmt: skip
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory written by `lcjax train`")
    src.add_argument("--gguf", help="a Llama GGUF file (weights and tokenizer; needs `pip install lcjax[gguf]`)")
    g.add_argument("--prompt", required=True, help="text (text runs, GGUF) or token ids such as '3 140 5 200 3'")
    g.add_argument("--tokenizer", default=None, help="text runs: 'byte', a tokenizer.json or a .gguf (default: the "
                   "workdir's tokenizer.json if present, else bytes)")  # fmt: skip
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the train command parses its own flags (--config.key=value overrides)
        from lcjax.train import command

        return command.main(["lcjax train", *argv[1:]])
    parser = _parser()
    args = parser.parse_args(argv)

    from lcjax.checks import check_token_ids
    from lcjax.train import workdir as workdir_lib  # run-directory services: evaluate, load_experiment, generate

    try:
        if args.command == "eval":
            print(json.dumps(workdir_lib.evaluate_workdir(args.workdir), indent=2))
            return 0
        if args.gguf is not None:
            print(_generate_gguf(args))
            return 0
        cfg = workdir_lib.load_experiment(args.workdir)
        tokenizer = workdir_lib.workdir_tokenizer(args.workdir, cfg, args.tokenizer)
        if tokenizer is not None:
            prompt = [int(t) for t in tokenizer.encode(args.prompt, add_eos=False)]
        else:
            try:
                prompt = [int(t) for t in args.prompt.split()]
            except ValueError:
                parser.error(f"--prompt: a token-level task takes whitespace-separated ids, not {args.prompt!r}")
        check_token_ids("--prompt", prompt, cfg.model.vocab_size)
        _, new = workdir_lib.generate_workdir(
            args.workdir, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
        )
        print(tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new)))
        return 0
    except ValueError as e:
        print(f"lcjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _generate_gguf(args: argparse.Namespace) -> str:
    """The continuation (text) of ``--prompt`` by a GGUF model, tokenized by the file's own tokenizer."""
    import jax
    import numpy as np

    from lcjax.checks import require
    from lcjax.convert.gguf import llama_from_gguf
    from lcjax.data.tokenizers import HFTokenizer
    from lcjax.models.lm import generate

    require(args.tokenizer is None, "--tokenizer: a GGUF file brings its own tokenizer")
    tokenizer = HFTokenizer.from_gguf(args.gguf)
    model = llama_from_gguf(args.gguf)
    prompt = tokenizer.encode(args.prompt, add_eos=False)
    require(len(prompt) > 0, "--prompt: the prompt is empty; give at least one token")
    rng = jax.random.key(args.seed)
    new = generate(model, np.asarray([prompt], np.int32), max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, rng=rng)  # fmt: skip
    return tokenizer.decode(np.asarray(new)[0])


if __name__ == "__main__":
    sys.exit(main())
