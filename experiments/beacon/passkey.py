"""Experiment: passkey retrieval beyond a small base model's trained window, with and without Activation Beacon.

Question: a tiny Llama-style LM (2 layers, D=64) trained with full attention on 64-token passkey sequences fails
when the context grows; after adding beacons (window 32) and training only the beacon parameters on 128-token
sequences, how well does it retrieve the passkey at 64..1024 tokens, at each compression ratio?

Run (writes experiments/beacon/passkey.{json,png}; the setup is ``configs/beacon.py``):
    .venv/bin/python experiments/beacon/passkey.py                 # CPU, 15 min on the shared 2-core machine
    .venv/bin/python experiments/beacon/passkey.py --quick         # smoke run (configs/beacon.py:smoke)

Two tasks: a 1-digit passkey (a single-token retrieval) and the usual 4-digit one. For each, the base is pretrained
once; then each variant (v2 interleave with beacon q/k/v, v1 step-expansion with beacon q/k/v/o) gets fresh
beacons on that same base, is evaluated untrained, trained, and evaluated again. Accuracy is teacher-forced: the
fraction of passkey digits predicted exactly (chance 0.1), also split by whether the needle lies in an earlier
beacon window than the query ("far": only in compressed memory) and by digit position; 128 test examples per
length, needle at a uniform depth.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jaxlib

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lcjax.train import beacon as beacon_train  # noqa: E402
from lcjax.train.config import load_config_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path(__file__).resolve().parent
VARIANTS = {
    "v2 interleave, beacon q/k/v": dict(scheme="interleave", beacon_params=["q", "k", "v"]),
    "v1 step-expansion, beacon q/k/v/o": dict(scheme="step_expansion", beacon_params=["q", "k", "v", "o"]),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=0, help="beacon training steps (default: the config's)")
    p.add_argument("--base-steps", type=int, default=0)
    p.add_argument("--digits", default="1,4")
    p.add_argument("--variants", default="v2,v1", help="which beacon variants to train: v2 (interleave), v1")
    p.add_argument("--out", default="", help="output name stem (default passkey / passkey_quick)")
    args = p.parse_args()
    load_start, t_start = os.getloadavg(), time.perf_counter()
    out = {"tasks": {}}
    for digits in [int(d) for d in args.digits.split(",")]:
        arg = ",".join(["smoke"] * args.quick + [f"steps={args.steps}"] * bool(args.steps)
                       + [f"base_steps={args.base_steps}"] * bool(args.base_steps) + [f"digits={digits}"])  # fmt: skip
        config = load_config_file(ROOT / "configs" / "beacon.py", arg)
        base, history = beacon_train.build_base(config)
        task = {"config": config.to_dict(), "base_history": history, "base": beacon_train.evaluate_base(config, base)}
        print(f"== {digits} digits: base", json.dumps({L: r["digit_accuracy"] for L, r in task["base"].items()}))
        task["variants"] = {}
        for name, overrides in VARIANTS.items():
            if name.split()[0] not in args.variants.split(","):
                continue
            c = config.copy_and_resolve_references()
            c.beacon.update(overrides)
            print(f"== {digits} digits: {name}", flush=True)
            task["variants"][name] = beacon_train.beacon_stage(c, base) | {"beacon_config": c.beacon.to_dict()}
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
