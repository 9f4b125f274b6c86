"""Attention vs Mamba-2 vs causal Monarch Mixer LMs on MQAR at equal width and depth, through the normal trainer.

Question: at CPU scale, on the `make train` task (MQAR, T=64, K=4, V=64), how fast does each sequence mixer learn
associative recall, at the same d_model, depth, batch and step budget, at each of a few peak learning rates
(the best rate differs by mixer: at 1e-3 the Mamba-2 LM stays on the 1/K plateau for 1500 steps)?

    python experiments/compare_mixers.py                       # 4 models x lr 1e-3, 1e-2, 1 seed (~25 min, 2 cores)
    python experiments/compare_mixers.py --models m2,m2_monarch --lrs 0.003 --seeds 0,1 --steps 1500
    python experiments/compare_mixers.py --quick               # smoke: a few steps each, writes to a temp dir

Writes ``experiments/mixers/compare_mqar.json`` and ``.png`` (held-out answer accuracy vs step, one curve per model
and seed) and prints a table; ``experiments/mixers/README.md`` records a run. Each run is ``lcjax.train.train`` on
``configs/mqar.py:model=<name>,...`` with one device, so checkpoints, metrics and evaluation are the trainer's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from lcjax.models.lm import param_count  # noqa: E402
from lcjax.train import loop, metrics  # noqa: E402
from lcjax.train.config_io import load_config_file, override  # noqa: E402

MQAR = os.path.join(ROOT, "configs", "mqar.py")
OUT = os.path.join(ROOT, "experiments", "mixers")


def run(model: str, seed: int, lr: float, steps: int, workdir: str, quick: bool) -> dict:
    variant = f"model={model},lr={lr}" + (",smoke" if quick else f",steps={steps}")
    c = override(load_config_file(MQAR, variant), {"seed": seed, "progress_bar": False, "mesh.num_devices": 1})
    n_params = param_count(c.model)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = loop.train(c, workdir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    evals = [r for r in metrics.read_metrics(workdir) if r["split"] == "eval"]
    return dict(
        model=model, seed=seed, lr=lr, params=n_params, wall_s=wall, cpu_s=cpu, final=result.eval,
        curve=[(r["step"], r["answer_accuracy"]) for r in evals],
    )


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in results})
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 4.0), squeeze=False, sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in results))}
    for ax, lr in zip(axes[0], lrs):
        for r in (r for r in results if r["lr"] == lr):
            steps, acc = zip(*r["curve"])
            ax.plot(steps, acc, marker="o", color=colors[r["model"]],
                    label=f"{r['model']} (seed {r['seed']}, {r['params'] / 1e3:.0f}k params)")  # fmt: skip
        ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="training step", ylim=(0, 1.02), title=f"peak lr {lr:g}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out answer accuracy")
    fig.suptitle("MQAR T=64 K=4 V=64, d_model 64, 2 layers, batch 32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="attention,mamba2,m2,m2_monarch")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lrs", default="0.001,0.01", help="peak learning rates; every model runs at each")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="smoke variants, a temp output dir")
    p.add_argument("--append", action="store_true", help="add to the results already in compare_mqar.json")
    args = p.parse_args()
    out = tempfile.mkdtemp() if args.quick else OUT
    os.makedirs(out, exist_ok=True)
    results, runs = [], []
    if args.append:
        with open(os.path.join(out, "compare_mqar.json")) as f:
            previous = json.load(f)
        results, runs = previous["results"], previous["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for lr, seed in ((float(x), int(s)) for x in args.lrs.split(",") for s in args.seeds.split(",")):
                r = run(model, seed, lr, args.steps, os.path.join(tmp, f"{model}_{lr}_{seed}"), args.quick)
                results.append(r)
                print(f"{model:>11} lr {lr:g} seed {seed}: {r['params']:>7,} params, final answer accuracy "
                      f"{r['final']['answer_accuracy']:.3f}, {r['wall_s']:.0f} s wall / {r['cpu_s']:.0f} s CPU",
                      flush=True)  # fmt: skip
    meta = dict(cpu=platform.processor() or platform.machine(), jax=jax.__version__, load_avg=os.getloadavg(),
                devices=str(jax.devices()[0]), steps=args.steps)  # fmt: skip
    runs.append(dict(meta, command=" ".join(["python"] + sys.argv)))
    with open(os.path.join(out, "compare_mqar.json"), "w") as f:
        json.dump(dict(runs=runs, results=results), f, indent=1)
    plot(results, os.path.join(out, "compare_mqar.png"))
    print(f"wrote {out}/compare_mqar.json and .png")


if __name__ == "__main__":
    main()
