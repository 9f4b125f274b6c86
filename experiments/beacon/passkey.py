"""Experiment: passkey retrieval beyond a small base model's trained window, with and without Activation Beacon.

Question: a tiny Llama-style LM trained with full attention on 64-token passkey sequences fails when the context
grows; after adding beacons and training only the beacon parameters on 128-token sequences, how well does it
retrieve the passkey at 64..512 tokens, with each compression ratio?

Run (writes experiments/beacon/passkey.{json,png}; the setup is ``configs/beacon.py``):
    .venv/bin/python experiments/beacon/passkey.py                 # CPU, tens of minutes on a shared machine
    .venv/bin/python experiments/beacon/passkey.py --quick         # smoke run (configs/beacon.py:smoke)

The base is pretrained once; then each variant (v2 interleave with beacon q/k/v, v1 step-expansion with beacon
q/k/v/o) gets fresh beacons on that same base, is evaluated untrained, trained, and evaluated again.
Accuracy is teacher-forced: the fraction of the 4 passkey digits predicted exactly (chance 0.1), and of examples
with all digits right (chance 1e-4), on 128 test examples per length with the needle at a uniform depth.
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
    args = p.parse_args()
    arg = ",".join(["smoke"] * args.quick + [f"steps={args.steps}"] * bool(args.steps)
                   + [f"base_steps={args.base_steps}"] * bool(args.base_steps))  # fmt: skip
    config = load_config_file(ROOT / "configs" / "beacon.py", arg or None)
    load_start, t_start = os.getloadavg(), time.perf_counter()

    base, history = beacon_train.build_base(config)
    out = {"config": config.to_dict(), "base_history": history, "base": beacon_train.evaluate_base(config, base)}
    print("base", json.dumps(out["base"]), flush=True)
    out["variants"] = {}
    for name, overrides in VARIANTS.items():
        c = config.copy_and_resolve_references()
        c.beacon.update(overrides)
        print(f"== {name}", flush=True)
        out["variants"][name] = beacon_train.beacon_stage(c, base) | {"beacon_config": c.beacon.to_dict()}
    out |= dict(wall_s=time.perf_counter() - t_start, load_average_start=load_start, load_average_end=os.getloadavg(),
                versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__))
    suffix = "_quick" if args.quick else ""
    (OUT_DIR / f"passkey{suffix}.json").write_text(json.dumps(out, indent=1, default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(n) for n in config.eval.lengths]
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(6 * len(VARIANTS), 4.2), sharey=True)
    for ax, (name, res) in zip(axes, out["variants"].items()):
        ax.plot(lengths, [out["base"][L]["digit_accuracy"] for L in lengths], "k-o", label="base, full attention")
        for i, r in enumerate(config.eval.ratios):
            color = f"C{i}"
            ax.plot(lengths, [res["beacon"][r][L]["digit_accuracy"] for L in lengths], "-o", color=color,
                    label=f"beacons trained, r={r}")  # fmt: skip
            ax.plot(lengths, [res["beacon_init"][r][L]["digit_accuracy"] for L in lengths], ":", color=color,
                    label=f"beacons untrained, r={r}")  # fmt: skip
        ax.axvline(config.model.max_seq_len, color="gray", lw=0.8, ls="--")
        ax.axhline(0.1, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("passkey digit accuracy (teacher forced)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Passkey retrieval: base trained on {config.model.max_seq_len} tokens (dashed line), beacon window "
                 f"{config.beacon.window}, beacons trained {config.train.steps} steps on {config.data.seq_len} tokens")
    fig.tight_layout()
    fig.savefig(OUT_DIR / f"passkey{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
