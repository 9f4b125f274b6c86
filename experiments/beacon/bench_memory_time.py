"""Benchmark: Activation Beacon streaming vs full attention, memory and time vs context length (CPU, tiny model).

Question: when a long input is fed window by window, does the beacon state grow only as L/ratio (full attention's
KV cache grows as L) and the time grow about linearly (full attention: quadratically)?

Run (writes experiments/beacon/bench_memory_time.{json,png}):
    .venv/bin/python experiments/beacon/bench_memory_time.py            # L = 1K .. 64K, about 10 minutes
    .venv/bin/python experiments/beacon/bench_memory_time.py --quick    # smoke run (L = 512, 1K; window 128)

Method: one tiny Llama-style model (2 layers, D=64, 4 heads, 2 kv heads, head dim 16, float32, B=1). Both models
stream the same tokens in chunks of W=1024 through one jitted call per chunk with the state donated: the beacon
model (``BeaconLM``, interleave, fixed ratio) with its ``BeaconState``; full attention (the base ``LM``) with a
``KVCache`` of length L (blockwise attention; empty cache tiles are skipped). Memory: the bytes of the state /
cache after L tokens, and XLA's ``compile().memory_analysis()`` of one chunk call at that size (arguments +
outputs - aliased + temporaries). Time: the whole stream of L tokens through the compiled executable, min over
repetitions (3 up to 16K, ``--long-reps`` above; full attention once at 64K, where one stream takes minutes), the
models interleaved repetition by repetition.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lcjax.layers.beacon import BeaconConfig  # noqa: E402
from lcjax.models import beacon as beacon_lib  # noqa: E402
from lcjax.models.lm import LM, LMConfig  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def make_stream(model, init, window):
    """(compiled chunk call, function streaming all tokens) for a model whose state comes from ``init()``."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def chunk(params, state, tokens_BW):
        m = nnx.merge(graphdef, params)
        if isinstance(m, LM):
            logits, state = m(tokens_BW, cache=state)
        else:
            logits, state = m(tokens_BW, state=state)
        return logits[:, -1], state

    state = init()
    compiled = chunk.lower(params, state, jnp.zeros((1, window), jnp.int32)).compile()

    def stream(tokens_BL):  # the compiled executable itself: no compilation inside the timed region
        state = jax.tree.map(jnp.copy, init())  # distinct buffers (KVCache.init shares one zeros array for k and v)
        for lo in range(0, tokens_BL.shape[1], window):
            last, state = compiled(params, state, tokens_BL[:, lo : lo + window])
        return jax.block_until_ready(last)

    return compiled, stream, nbytes(state)


def fit_slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ratios", default="8,32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--long-reps", type=int, default=2, help="repetitions at L > 16K (full attention: 1 at L > 32K)")
    p.add_argument("--max-full-time-len", type=int, default=65536, help="longest L at which full attention is timed")
    args = p.parse_args()
    W = 128 if args.quick else 1024
    lengths = [512, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    ratios = [int(r) for r in args.ratios.split(",")]
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    lm_cfg = LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                      max_seq_len=max(lengths) + W)  # fmt: skip
    base = LM(lm_cfg, rngs=nnx.Rngs(0))
    beacons = {r: beacon_lib.add_beacons(base, BeaconConfig(window=W, ratio=r, train_ratios=(r,)), rngs=nnx.Rngs(0))
               for r in ratios}  # fmt: skip
    rows = []
    for L in lengths:
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, L)), jnp.int32)
        runs = {}
        compiled, stream, state_b = make_stream(base, lambda: base.init_cache(1, L), W)
        runs["full"] = dict(stream=stream, state_bytes=state_b, peak_bytes=peak_bytes(compiled))
        for r, m in beacons.items():
            compiled, stream, state_b = make_stream(m, lambda m=m: m.init_state(1, L), W)
            runs[f"beacon_r{r}"] = dict(stream=stream, state_bytes=state_b, peak_bytes=peak_bytes(compiled))
        times = {k: [] for k in runs}
        if L <= 4096:  # warm-up where a run is short enough for first-call effects to matter
            for run in runs.values():
                run["stream"](tokens)
        reps = args.reps if L <= 16384 else args.long_reps
        for rep in range(reps):
            for name, run in runs.items():  # interleaved: every model once per repetition
                if name == "full" and (L > args.max_full_time_len or (L > 32768 and rep > 0)):
                    continue
                t0 = time.perf_counter()
                run["stream"](tokens)
                times[name].append(time.perf_counter() - t0)
        row = {"L": L}
        for name, run in runs.items():
            row[name] = dict(state_bytes=run["state_bytes"], peak_bytes=run["peak_bytes"],
                             time_s=min(times[name]) if times[name] else None, times_s=times[name])  # fmt: skip
        rows.append(row)
        print(json.dumps({k: (v if k == "L" else {kk: vv for kk, vv in v.items() if kk != "times_s"})
                          for k, v in row.items()}), flush=True)  # fmt: skip

    names = ["full"] + [f"beacon_r{r}" for r in ratios]
    summary = {}
    for name in names:
        Ls = [row["L"] for row in rows]
        st = [row[name]["state_bytes"] for row in rows]
        tm = [(row["L"], row[name]["time_s"]) for row in rows if row[name]["time_s"]]
        summary[name] = dict(
            state_bytes_per_token_at_max=(st[-1] - st[-2]) / (Ls[-1] - Ls[-2]),
            state_slope=fit_slope(Ls, st), peak_slope=fit_slope(Ls, [row[name]["peak_bytes"] for row in rows]),
            time_slope=fit_slope(*zip(*tm)) if len(tm) > 1 else None,
            time_slope_upper_half=fit_slope(*zip(*tm[len(tm) // 2 :])) if len(tm) > 2 else None,
            # linear fits (bytes = a + b * L): b is what each extra token costs
            state_bytes_per_token=float(np.polyfit(Ls, st, 1)[0]),
            peak_bytes_per_token=float(np.polyfit(Ls, [row[name]["peak_bytes"] for row in rows], 1)[0]),
            time_us_per_token={L: 1e6 * t / L for L, t in tm},
        )  # fmt: skip
    for name in names[1:]:  # full attention / beacon, side by side at each L
        summary[name]["full_over_beacon"] = {
            row["L"]: dict(state=row["full"]["state_bytes"] / row[name]["state_bytes"],
                           peak=row["full"]["peak_bytes"] / row[name]["peak_bytes"],
                           time=row["full"]["time_s"] / row[name]["time_s"] if row["full"]["time_s"] else None)
            for row in rows
        }  # fmt: skip
    result = dict(
        question="beacon streaming vs full attention: state/peak memory and time vs L",
        model=dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab=256, dtype="float32"),
        window=W, ratios=ratios, rows=rows, summary=summary, load_average_start=load_start,
        load_average_end=os.getloadavg(), wall_s=time.perf_counter() - t_start, cpu=cpu_model(),
        versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__),
        backend=jax.default_backend(), devices=jax.device_count(),
    )  # fmt: skip
    print(json.dumps(summary, indent=1))
    suffix = "_quick" if args.quick else ""
    (OUT_DIR / f"bench_memory_time{suffix}.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    Ls = [row["L"] for row in rows]
    for name in names:
        style = dict(marker="o", label=name.replace("_r", " r="))
        axes[0].loglog(Ls, [row[name]["state_bytes"] / 2**20 for row in rows], **style)
        axes[1].loglog(Ls, [row[name]["peak_bytes"] / 2**20 for row in rows], **style)
        tm = [(row["L"], row[name]["time_s"]) for row in rows if row[name]["time_s"]]
        axes[2].loglog(*zip(*tm), **style)
    for ax, title in zip(axes, ["state / KV cache after L tokens (MiB)", "compiled peak of one chunk call (MiB)",
                                "time to stream L tokens (s)"]):  # fmt: skip
        ax.set_xlabel("context length L")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Activation Beacon streaming vs full attention (window {W}, tiny 2-layer model, CPU f32)")
    fig.tight_layout()
    fig.savefig(OUT_DIR / f"bench_memory_time{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
