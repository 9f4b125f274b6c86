"""Experiment: passkey retrieval beyond a small base model's trained window, with and without Activation Beacon.

Question: a tiny Llama-style LM (2 layers, D=64) trained with full attention on 64-token passkey sequences fails
when the context grows; after adding beacons (window 32) and training only the beacon parameters on 128-token
sequences, how well does it retrieve the passkey at 64..1024 tokens, at each compression ratio?

Run (writes experiments/beacon/passkey.{json,png}; the setup is ``configs/beacon.py``):
    .venv/bin/python experiments/beacon/passkey.py                 # CPU, 15 min on the shared 2-core machine
    .venv/bin/python experiments/beacon/passkey.py --quick         # smoke run (configs/beacon.py:smoke)
    .venv/bin/python experiments/beacon/passkey.py --digits 1 --variants v1 --steps 600 --workdir runs/passkey

Two tasks: a 1-digit passkey (a single-token retrieval) and the usual 4-digit one. For each, the base is pretrained
once; then each variant (v2 interleave with beacon q/k/v, v1 step-expansion with beacon q/k/v/o) gets fresh
beacons on that same base, is evaluated untrained, trained, and evaluated again. Accuracy is teacher-forced: the
fraction of passkey digits predicted exactly (chance 0.1), also split by whether the needle lies in an earlier
beacon window than the query ("far": only in compressed memory) and by digit position; 128 test examples per
length, needle at a uniform depth.

Both trainings are runs of the one trainer, ``lcjax.train.loop.train``, each in its own run directory under
``--workdir`` (default: a new temporary directory; rerunning with the same ``--workdir`` resumes or reuses them):
the base is an ordinary LM run on ``base.seq_len``-token passkey data; the beacon stage passes the ``BeaconLM`` and
``lcjax.train.beacon.BeaconLoss`` (beacon parameters only) to the same loop.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lcjax import data  # noqa: E402
from lcjax.models.beacon import add_beacons  # noqa: E402
from lcjax.models.lm import LM  # noqa: E402
from lcjax.train import config_io, loop, metrics  # noqa: E402
from lcjax.train.beacon import BeaconLoss  # noqa: E402
from lcjax.train.config import ExperimentConfig  # noqa: E402
from lcjax.train.config_io import load_config_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path(__file__).resolve().parent
VARIANTS = {
    "v2 interleave, beacon q/k/v": dict(scheme="interleave", beacon_params=("q", "k", "v")),
    "v1 step-expansion, beacon q/k/v/o": dict(scheme="step_expansion", beacon_params=("q", "k", "v", "o")),
}


# ---------------------------------------------------------------------------------------------------------------
# The study: pretrain (or convert) a base LM, add beacons, train them, evaluate beyond the base window
# ---------------------------------------------------------------------------------------------------------------
def stage_config(c, *, seq_len: int, steps: int, batch_size: int, lr: float, weight_decay: float, num_train: int,
                 seed: int) -> ExperimentConfig:  # fmt: skip
    """The ``lcjax train`` experiment of one training stage: ``c.model`` on ``seq_len``-token passkey data, AdamW
    (warmup ``steps // 20``, cosine to 0.1 lr, clip 1, b2 0.98), metrics every step, one checkpoint at the end, on
    one device with replicated arrays (``sharding="single"``: the step-expansion ``BeaconLM`` does not yet run with
    a batch sharded over ``data``).
    ``model.max_seq_len`` is raised to ``seq_len`` where the stage reads longer rows than the base's window (the
    beacon stage, whose model is passed to the loop: the base inside it keeps its trained window)."""
    model = dataclasses.replace(c.model, max_seq_len=max(c.model.max_seq_len, seq_len))
    return ExperimentConfig.from_dict(dict(
        seed=c.seed, model=model, batch_size=batch_size, eval_batch_size=8, num_steps=steps,
        data=dict(kind="synthetic", task="passkey", task_args=dict(c.data.task_args, seq_len=seq_len),
                  num_train=num_train, num_validation=8, seed=seed),
        optim=dict(learning_rate=lr, warmup_steps=max(1, steps // 20), final_lr_fraction=0.1,
                   weight_decay=weight_decay, b2=0.98, grad_clip=1.0),
        mesh=dict(num_devices=1), sharding="single", log_every=1, eval_every=0, checkpoint_every=0, keep_checkpoints=1,
    ))  # fmt: skip


def history(workdir: str) -> list[dict[str, Any]]:
    """The per-step training records of a run (``metrics.jsonl``)."""
    return [r for r in metrics.read_metrics(workdir) if r["split"] == "train"]


def copy_module(module):
    """The same module with its own copies of every array (the loop donates the model it trains)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def passkey_accuracy(
    logits_fn: Callable[[np.ndarray], jax.Array], task: data.PasskeyConfig, *, num_examples: int, batch_size: int,
    seed: int = 0, window: int | None = None,
) -> dict[str, float]:
    """Teacher-forced passkey accuracy on the test split: ``digit_accuracy`` (answer digits predicted exactly),
    ``example_accuracy`` (all digits of an example right; chance 10^-num_digits) and ``digit_accuracy_by_position``
    (per answer digit, in order).

    With ``window`` (a beacon window W), also ``digit_accuracy_far`` / ``digit_accuracy_near`` and ``far_fraction``:
    the same split by whether the needle's marker lies in an earlier window than the final query (so a beacon model
    has it only in compressed memory) or in the query's own window.
    """
    examples = [data.generate(task, i, seed=seed, split="test") for i in range(num_examples)]
    counts = dict(digits=0, right=0, examples_right=0, far_digits=0, far_right=0, far_examples=0)
    by_position = np.zeros(task.num_digits)
    for lo in range(0, num_examples, batch_size):
        chunk = examples[lo : lo + batch_size]
        inputs = np.stack([e["inputs"] for e in chunk])
        targets = np.stack([e["targets"] for e in chunk])
        mask = np.stack([e["loss_mask"] for e in chunk])
        right = (np.asarray(logits_fn(inputs)).argmax(-1) == targets) & mask
        counts["digits"] += int(mask.sum())
        counts["right"] += int(right.sum())
        counts["examples_right"] += int((right.sum(1) == mask.sum(1)).sum())
        by_position += right[:, -task.num_digits :].sum(0)  # the answers are the last num_digits positions
        if window is not None:
            needle = np.argmax(inputs == data.synthetic.PASSKEY_MARKER, axis=1)  # the first marker: the needle
            far = needle // window < (inputs.shape[1] - 1) // window
            counts["far_examples"] += int(far.sum())
            counts["far_digits"] += int(mask[far].sum())
            counts["far_right"] += int(right[far].sum())
    out = {"digit_accuracy": counts["right"] / counts["digits"],
           "example_accuracy": counts["examples_right"] / num_examples,
           "digit_accuracy_by_position": (by_position / num_examples).tolist()}  # fmt: skip
    if window is not None:
        near_digits = counts["digits"] - counts["far_digits"]
        out |= dict(
            far_fraction=counts["far_examples"] / num_examples,
            digit_accuracy_far=counts["far_right"] / counts["far_digits"] if counts["far_digits"] else None,
            digit_accuracy_near=(counts["right"] - counts["far_right"]) / near_digits if near_digits else None,
        )  # fmt: skip
    return out


def _with_max_len(model: LM, max_seq_len: int) -> LM:
    """The same weights in an ``LM`` whose ``max_seq_len`` allows longer inputs (RoPE has no learned positions)."""
    longer = nnx.eval_shape(lambda: LM(dataclasses.replace(model.cfg, max_seq_len=max_seq_len), rngs=nnx.Rngs(0)))
    nnx.update(longer, nnx.state(model))
    return longer


def _evaluate(c, fn, L: int) -> dict[str, float]:
    task = data.PasskeyConfig(seq_len=L, **c.data.task_args)
    return passkey_accuracy(fn, task, num_examples=c.eval.num_examples, batch_size=c.eval.batch_size, seed=c.seed,
                            window=int(c.beacon.window))  # fmt: skip


def build_base(c, workdir: str) -> tuple[LM, list[dict[str, Any]]]:
    """The base LM of ``config.base``: trained by ``lcjax.train.loop.train`` in ``workdir`` on ``base.seq_len``-token
    passkey data (``source="train"``) or converted from a local HF Llama checkpoint (``source="hf_dir"``).
    Returns ``(model, training history)``."""
    if c.base.source == "train":
        b = c.base
        stage = stage_config(c, seq_len=b.seq_len, steps=b.steps, batch_size=b.batch_size, lr=b.lr,
                             weight_decay=b.weight_decay, num_train=b.num_train, seed=c.seed)  # fmt: skip
        result = loop.train(stage, workdir)
        return result.model, history(workdir)
    if c.base.source == "hf_dir":
        from lcjax.convert.llama import llama_from_pretrained_dir

        return llama_from_pretrained_dir(c.base.hf_dir), []
    raise ValueError(f"config.base.source={c.base.source!r}; allowed: 'train', 'hf_dir'")


def evaluate_base(c, base: LM) -> dict[int, dict[str, float]]:
    """Passkey accuracy of the base alone (full attention) at every ``eval.lengths``, beyond its window too."""
    lengths = [int(n) for n in c.eval.lengths]
    long_base = _with_max_len(base, max(lengths + [base.cfg.max_seq_len]))
    fn = jax.jit(lambda m, x: m(x))
    return {L: _evaluate(c, lambda x: fn(long_base, x), L) for L in lengths}


def beacon_stage(c, base: LM, workdir: str) -> dict[str, Any]:
    """Add beacons (``config.beacon``) to ``base``, evaluate them untrained, train them with the one loop and
    ``BeaconLoss`` (``config.train``, on ``data.seq_len``-token passkey data) in ``workdir`` and evaluate again, at
    every ``eval.lengths`` x ``eval.ratios``. ``base`` is left as it was."""
    bcfg = c.beacon
    model = add_beacons(base, bcfg, rngs=nnx.Rngs(c.seed))
    fn = jax.jit(lambda m, x, n, r: m(x, lengths_B=n, ratios_BN=r))
    lengths, ratios = [int(n) for n in c.eval.lengths], [int(r) for r in c.eval.ratios]

    def evaluate(m, ratio, L):
        n_windows = -(-L // bcfg.window)
        return _evaluate(c, lambda x: fn(m, x, np.full(x.shape[0], L, np.int32),
                                         np.full((x.shape[0], n_windows), ratio, np.int32)), L)  # fmt: skip

    out: dict[str, Any] = {"beacon_init": {r: {L: evaluate(model, r, L) for L in lengths} for r in ratios}}
    t = c.train
    stage = stage_config(c, seq_len=c.data.seq_len, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                         weight_decay=t.weight_decay, num_train=c.data.num_train, seed=c.seed + 1)  # fmt: skip
    t0 = time.perf_counter()
    model = loop.train(stage, workdir, model=copy_module(model), objective=BeaconLoss()).model
    out["train_s"] = time.perf_counter() - t0
    out["beacon_history"] = history(workdir)
    out["beacon"] = {r: {L: evaluate(model, r, L) for L in lengths} for r in ratios}
    for r in ratios:
        print(f"beacon r={r}: " + ", ".join(f"L={L}: {v['digit_accuracy']:.3f}" for L, v in out["beacon"][r].items()))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=0, help="beacon training steps (default: the config's)")
    p.add_argument("--base-steps", type=int, default=0)
    p.add_argument("--digits", default="1,4")
    p.add_argument("--variants", default="v2,v1", help="which beacon variants to train: v2 (interleave), v1")
    p.add_argument("--out", default="", help="output name stem (default passkey / passkey_quick)")
    p.add_argument("--workdir", default="", help="run directories of the trainings (default: a new temporary one)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="beacon_passkey_"))
    print(f"run directories under {workdir}")
    load_start, t_start = os.getloadavg(), time.perf_counter()
    out = {"tasks": {}}
    for digits in [int(d) for d in args.digits.split(",")]:
        arg = ",".join(["smoke"] * args.quick + [f"steps={args.steps}"] * bool(args.steps)
                       + [f"base_steps={args.base_steps}"] * bool(args.base_steps) + [f"digits={digits}"])  # fmt: skip
        config = load_config_file(ROOT / "configs" / "beacon.py", arg)
        base, base_history = build_base(config, str(workdir / f"{digits}digits" / "base"))
        task = {"config": config_io.to_dict(config), "base_history": base_history, "base": evaluate_base(config, base)}
        print(f"== {digits} digits: base", json.dumps({L: r["digit_accuracy"] for L, r in task["base"].items()}))
        task["variants"] = {}
        for name, overrides in VARIANTS.items():
            if name.split()[0] not in args.variants.split(","):
                continue
            c = dataclasses.replace(config, beacon=dataclasses.replace(config.beacon, **overrides))
            print(f"== {digits} digits: {name}", flush=True)
            run_dir = str(workdir / f"{digits}digits" / name.split()[0])
            task["variants"][name] = beacon_stage(c, base, run_dir) | {"beacon_config": config_io.to_dict(c.beacon)}
        out["tasks"][digits] = task
    out |= dict(wall_s=time.perf_counter() - t_start, load_average_start=load_start, load_average_end=os.getloadavg(),
                versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__))
    thin(out)
    stem = args.out or ("passkey_quick" if args.quick else "passkey")
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    plot(out, OUT_DIR / f"{stem}.png")


def thin(out, every=10):
    """Keep every ``every``-th step (and the last) of the training histories, so the JSON stays small."""
    for task in out["tasks"].values():
        task["base_history"] = task["base_history"][::every] + task["base_history"][-1:]
        for res in task["variants"].values():
            res["beacon_history"] = res["beacon_history"][::every] + res["beacon_history"][-1:]


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = json.loads(json.dumps(out, default=str))["tasks"]  # string keys, as when replotting a saved JSON
    n_cols = max(len(task["variants"]) for task in tasks.values())
    fig, axes = plt.subplots(len(tasks), n_cols, figsize=(6 * n_cols, 4 * len(tasks)), sharey=True, squeeze=False)
    for row, (digits, task) in zip(axes, tasks.items()):
        c = task["config"]
        lengths = [int(n) for n in c["eval"]["lengths"]]
        for ax, (name, res) in zip(row, task["variants"].items()):
            acc = lambda byL: [byL[str(L)]["digit_accuracy"] for L in lengths]
            ax.plot(lengths, acc(task["base"]), "k-o", label="base, full attention")
            for i, r in enumerate(c["eval"]["ratios"]):
                ax.plot(lengths, acc(res["beacon"][str(r)]), "-o", color=f"C{i}", label=f"beacons trained, r={r}")
                ax.plot(lengths, acc(res["beacon_init"][str(r)]), ":", color=f"C{i}", label=f"beacons untrained, r={r}")
            ax.axvline(c["model"]["max_seq_len"], color="gray", lw=0.8, ls="--")
            ax.axhline(0.1, color="gray", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(L) for L in lengths])
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"{digits}-digit passkey: {name}", fontsize=10)
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("digit accuracy (teacher forced)")
    axes[0][0].legend(fontsize=7)
    c = next(iter(tasks.values()))["config"]
    fig.suptitle(f"Passkey retrieval: base trained on {c['model']['max_seq_len']} tokens (dashed line); beacon "
                 f"window {c['beacon']['window']}, beacons trained {c['train']['steps']} steps on "
                 f"{c['data']['seq_len']} tokens")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
