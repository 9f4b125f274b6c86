"""Benchmark: Monarch Mixer on CPU — mixer time/memory vs L against blockwise attention, Monarch GEMM efficiency,
and the Monarch vs jnp.fft convolution paths.

Questions. (1) Does the M2 sequence mixer scale near-linearly in L (log-log time slope <= 1.1 at large L) where
attention is quadratic, and with what peak memory? (2) What fraction of this machine's measured matmul rate do
``monarch_matmul`` and ``monarch_fft`` reach? (3) How do the Monarch-DFT and jnp.fft convolution paths compare?

Run (writes experiments/m2/bench_m2.{json,png} and experiments/m2/README.md):
    .venv/bin/python experiments/bench_m2.py             # full: L = 1K .. 32K, ~15 min on a loaded 2-core box
    .venv/bin/python experiments/bench_m2.py --quick     # smoke run, ~1 min of compiles (tiny sizes, temp dir)

Method. float32, B = 1, D = 256. Threads: one by default (``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``; the box is shared), ``--threads 2`` uses both cores. Every function is
``jax.jit(f).lower(...).compile()``d first; time = min over N calls of the process CPU time (one XLA thread:
robust to the preemption that makes wall-clock times swing several-fold on this shared box; wall times are in the
JSON), the variants of one length interleaved call by call; memory = ``memory_analysis()`` temp + argument
bytes. Attention baseline = a causal attention layer of the same width (q/k/v/o projections +
``lcjax.ops.attention.blockwise_attention``, H = 4, P = 64, block 512). Slopes: least squares on log-log over
L >= 4K, 95% CI from 1000 bootstrap resamples of the per-call times. The small causal-M2 vs attention vs Mamba-2
MQAR comparison needs the decoder LM and is not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _set_threads(argv) -> int:
    threads = 2 if "--threads" in argv and argv[argv.index("--threads") + 1] == "2" else 1
    if threads == 1 and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return threads


THREADS = _set_threads(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcjax.layers import monarch_mixer as mm  # noqa: E402
from lcjax.ops import attention as attn_ops  # noqa: E402
from lcjax.ops import fftconv, monarch  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "m2"
D, H, P = 256, 4, 64


# ---- harness -----------------------------------------------------------------------------------------------------
def compile_fn(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)
    return (lambda: compiled(*args)), peak


WALL: dict[str, list[float]] = {}  # wall-clock samples, keyed like the CPU-time results (kept in the JSON)


def time_interleaved(calls: dict, n: int) -> dict[str, list[float]]:
    """n per-call **process CPU times** of every entry; each round calls every entry once, in order (A/B
    interleaving). With one XLA thread, CPU time is the compute time even when other jobs preempt this process
    (wall-clock time on this shared box swings several-fold; it is recorded in ``WALL`` too)."""
    out = {name: [] for name in calls}
    if n >= 3:  # one warm-up each (with n = 2 the min absorbs a slow first call; spares 2 min of 32K attention)
        for name, call in calls.items():
            jax.block_until_ready(call())
    for _ in range(n):
        for name, call in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(call())
            out[name].append(time.process_time() - c0)
            WALL.setdefault(name, []).append(time.perf_counter() - t0)
    return out


def slope_ci(Ls, times_per_L, rng, boots=1000):
    """log-log least-squares slope of min time vs L, with a bootstrap 95% CI over the per-call samples."""
    x = np.log(np.asarray(Ls, float))
    point = float(np.polyfit(x, np.log([min(t) for t in times_per_L]), 1)[0])
    draws = []
    for _ in range(boots):
        y = [np.min(rng.choice(t, size=len(t), replace=True)) for t in times_per_L]
        draws.append(np.polyfit(x, np.log(y), 1)[0])
    return {"slope": point, "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}


def build(cls, cfg):
    return jax.jit(lambda: cls(cfg, rngs=nnx.Rngs(0)))()


# ---- (1) mixers vs attention ---------------------------------------------------------------------------------------
class AttentionLayer(nnx.Module):
    """q/k/v/o projections around blockwise attention: the attention block an M2 mixer replaces."""

    def __init__(self, *, rngs: nnx.Rngs):
        w = jax.random.normal(rngs.params(), (4, D, H * P)) / np.sqrt(D)
        self.qkv, self.o = nnx.Param(w[:3]), nnx.Param(w[3].T)

    def __call__(self, x_BLD):
        B, L, _ = x_BLD.shape
        q, k, v = (jnp.einsum("bld,de->ble", x_BLD, w).reshape(B, L, H, P) for w in self.qkv[...])
        y = attn_ops.blockwise_attention(q, k, v, causal=True, block_q=512, block_kv=512)
        return jnp.einsum("ble,ed->bld", y.reshape(B, L, H * P), self.o[...])


def mixer_variants(L: int) -> dict:
    return {
        "m2_bert (bidirectional)": build(mm.M2SequenceMixer, mm.M2SequenceMixerConfig.m2_bert(D, l_max=L)),
        "m2_causal_fft (a)": build(mm.CausalM2Mixer, mm.M2SequenceMixerConfig.causal(D, L)),
        "m2_causal_monarch (b)": build(mm.CausalM2Mixer,
                                       mm.M2SequenceMixerConfig.causal(D, L, long_conv="causal_monarch")),
        "attention (blockwise, causal)": jax.jit(lambda: AttentionLayer(rngs=nnx.Rngs(0)))(),
    }  # fmt: skip


def bench_mixers(lengths, reps, attn_bwd_max, rng) -> dict:
    rows = []
    for L in lengths:
        x = jnp.asarray(rng.standard_normal((1, L, D)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((1, L, D)), jnp.float32)
        calls, mem = {}, {}
        for name, module in mixer_variants(L).items():
            calls[f"{name}/fwd"], mem[f"{name}/fwd"] = compile_fn(lambda m, v: m(v), module, x)
            if not name.startswith("attention") or L <= attn_bwd_max:
                grad = jax.grad(lambda m, v, gg: jnp.sum(m(v) * gg), argnums=(0, 1))
                calls[f"{name}/fwd_bwd"], mem[f"{name}/fwd_bwd"] = compile_fn(grad, module, x, g)
        n = reps(L)
        WALL.clear()
        times = time_interleaved(calls, n)
        rows.append({"L": L, "times_s": times, "wall_s": dict(WALL), "peak_bytes": mem, "reps": n})
        print(json.dumps({"L": L, "min_cpu_s": {k: round(min(v), 4) for k, v in times.items()}}), flush=True)
    return {"rows": rows}


# ---- (2) Monarch GEMM efficiency -------------------------------------------------------------------------------------
def bench_throughput(cases_mm, cases_fft, reps, rng) -> dict:
    """The 2048³ f32 matmul is timed in the same interleaved rounds as every case (the box's load drifts)."""
    out = {"monarch_matmul": [], "monarch_fft": []}
    a = jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32)
    peak_call = compile_fn(lambda x, y: x @ y, a, a)[0]
    peak_flops = 2 * 2048**3
    peaks = []
    for n, rows in cases_mm:
        b = int(np.sqrt(n))
        w1 = jnp.asarray(rng.standard_normal((b, b, b)), jnp.float32)
        w2 = jnp.asarray(rng.standard_normal((b, b, b)), jnp.float32)
        x = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
        flat = jnp.asarray(rng.standard_normal((rows * b, b)), jnp.float32)  # the factors' GEMM shape, unbatched
        calls = {"monarch": compile_fn(monarch.monarch_matmul, x, w1, w2)[0],
                 "gemm_same_shape": compile_fn(lambda u, w: u @ w, flat, w1[0])[0], "matmul_2048": peak_call}
        times = {k: min(v) for k, v in time_interleaved(calls, reps).items()}
        flops = rows * monarch.monarch_flops(w1.shape, w2.shape)
        peak = peak_flops / times["matmul_2048"] / 1e9
        peaks.append(peak)
        row = {"n": n, "block": b, "rows": rows, "gflop": flops / 1e9, "matmul_2048_gflops": peak,
               "monarch_gflops": flops / times["monarch"] / 1e9,
               "gemm_same_shape_gflops": flops / 2 / times["gemm_same_shape"] / 1e9}  # fmt: skip
        row["fraction_of_peak"] = row["monarch_gflops"] / peak
        row["gemm_same_shape_fraction"] = row["gemm_same_shape_gflops"] / peak
        out["monarch_matmul"].append(row)
        print(json.dumps({"monarch_matmul": {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}}),
              flush=True)
    for n, rows in cases_fft:
        x = jnp.asarray(rng.standard_normal((rows, n)) + 1j * rng.standard_normal((rows, n)), jnp.complex64)
        calls = {"monarch_fft": compile_fn(monarch.monarch_fft, x)[0], "jnp.fft.fft": compile_fn(jnp.fft.fft, x)[0],
                 "matmul_2048": peak_call}
        times = {k: min(v) for k, v in time_interleaved(calls, reps).items()}
        flops = rows * monarch.dft_flops(n)
        peak = peak_flops / times["matmul_2048"] / 1e9
        peaks.append(peak)
        row = {"n": n, "b1": monarch.default_b1(n), "rows": rows, "gflop": flops / 1e9, "matmul_2048_gflops": peak,
               "monarch_gflops": flops / times["monarch_fft"] / 1e9,
               "time_ratio_monarch_over_jnp_fft": times["monarch_fft"] / times["jnp.fft.fft"]}  # fmt: skip
        row["fraction_of_peak"] = row["monarch_gflops"] / peak
        out["monarch_fft"].append(row)
        print(json.dumps({"monarch_fft": {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}}),
              flush=True)
    out["peak"] = {"shape": "2048x2048 @ 2048x2048", "gflops": float(np.median(peaks)), "per_case": peaks}
    return out


# ---- (3) convolution paths ------------------------------------------------------------------------------------------
def bench_convs(lengths, reps, naive_max, rng, channels=D) -> dict:
    rows = []
    for L in lengths:
        u = jnp.asarray(rng.standard_normal((1, L, channels)), jnp.float32)
        k, kr = (jnp.asarray(rng.standard_normal((L, channels)) / np.sqrt(L), jnp.float32) for _ in range(2))
        h, b2 = fftconv.causal_monarch_shape(L)
        bl, br = jnp.zeros((b2, h, h)), jnp.zeros((b2, b2))
        calls, mem = {}, {}
        impls = ("jnp_fft", "monarch") + (("naive",) if L <= naive_max else ())
        for impl in impls:
            f = lambda uu, kk, rr, impl=impl: fftconv.fftconv(uu, kk, k_rev_LD=rr, impl=impl)
            calls[f"bidirectional/{impl}"], mem[f"bidirectional/{impl}"] = compile_fn(f, u, k, kr)
            calls[f"causal/{impl}"], mem[f"causal/{impl}"] = compile_fn(
                lambda uu, kk, impl=impl: fftconv.fftconv(uu, kk, impl=impl), u, k)
        calls["causal_monarch (b)/jnp_fft"], mem["causal_monarch (b)/jnp_fft"] = compile_fn(
            fftconv.causal_monarch_conv, u, k, bl, br)
        n = reps(L)
        WALL.clear()
        times = time_interleaved(calls, n)
        rows.append({"L": L, "times_s": times, "wall_s": dict(WALL), "peak_bytes": mem, "reps": n})
        print(json.dumps({"conv L": L, "min_cpu_s": {k: round(min(v), 4) for k, v in times.items()}}), flush=True)
    return {"rows": rows, "channels": channels}


# ---- report ---------------------------------------------------------------------------------------------------------
def fits(section: dict, key_filter, min_L: int, rng) -> dict:
    rows = section["rows"]
    names = sorted({k for r in rows for k in r["times_s"] if key_filter(k)})
    out = {}
    for name in names:
        pts = [(r["L"], r["times_s"][name]) for r in rows if name in r["times_s"] and r["L"] >= min_L]
        if len(pts) >= 2:
            out[name] = slope_ci([p[0] for p in pts], [p[1] for p in pts], rng)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    mix = results["mixers"]["rows"]
    names = sorted({k for r in mix for k in r["times_s"]})
    for name in names:
        pts = [(r["L"], min(r["times_s"][name])) for r in mix if name in r["times_s"]]
        style = "--" if "fwd_bwd" in name else "-"
        axes[0].plot(*zip(*pts), style + "o", label=name, ms=3)
        mpts = [(r["L"], r["peak_bytes"][name] / 2**20) for r in mix if name in r["peak_bytes"]]
        axes[1].plot(*zip(*mpts), style + "o", label=name, ms=3)
    conv = results["convs"]["rows"]
    for name in sorted({k for r in conv for k in r["times_s"]}):
        pts = [(r["L"], min(r["times_s"][name])) for r in conv if name in r["times_s"]]
        axes[2].plot(*zip(*pts), "-o", label=name, ms=3)
    thr = results["throughput"]
    axes[3].plot([r["n"] for r in thr["monarch_matmul"]], [r["fraction_of_peak"] for r in thr["monarch_matmul"]], "-o",
                 label="monarch_matmul")  # fmt: skip
    axes[3].plot([r["n"] for r in thr["monarch_fft"]], [r["fraction_of_peak"] for r in thr["monarch_fft"]], "-s",
                 label="monarch_fft (complex GEMMs)")  # fmt: skip
    axes[3].axhline(1.0, color="gray", lw=0.8)
    axes[3].set_ylim(bottom=0)
    titles = [("mixer CPU time (min of N)", "seconds", True), ("compiled peak memory", "MiB", True),
              (f"long conv, {results['convs']['channels']} channels", "seconds", True),
              (f"fraction of matmul rate ({thr['peak']['gflops']:.0f} GFLOP/s)", "fraction", False)]  # fmt: skip
    for ax, (title, ylabel, logy) in zip(axes, titles):
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("n (transform size)" if "fraction" in title else "sequence length L")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"lcjax Monarch Mixer on CPU ({THREADS} thread(s)), float32, B=1, D={D}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ms(t):
    return f"{1e3 * min(t):,.1f}"


def write_readme(results: dict, path: Path) -> None:
    env, mix, conv, thr = results["environment"], results["mixers"], results["convs"], results["throughput"]
    fit_mix, fit_conv = results["fits"]["mixers"], results["fits"]["convs"]
    names = ["m2_bert (bidirectional)", "m2_causal_fft (a)", "m2_causal_monarch (b)", "attention (blockwise, causal)"]
    lines = [
        "# Monarch Mixer on CPU: mixer scaling vs attention, Monarch GEMM efficiency, convolution paths", "",
        "**Questions.** (1) Does the M2 sequence mixer scale near-linearly in L (log-log slope of time <= 1.1 at large"
        " L) where attention is quadratic, and with what peak memory? (2) What fraction of the machine's measured"
        " matmul rate do `monarch_matmul` and `monarch_fft` reach? (3) Monarch-DFT vs jnp.fft convolution paths.", "",
        "**Command.** `.venv/bin/python experiments/bench_m2.py` (writes `bench_m2.json`, `bench_m2.png` and this"
        " README; `--quick` is a compile-bound one-minute smoke run into a temp dir).", "",
        f"**Setup.** float32, B=1, D={D}. Mixers: `M2SequenceMixer` with the M2-BERT preset (bidirectional, residual"
        " long conv, emb 5, order 128, l_max = L), `CausalM2Mixer` (a) causal FFT conv and (b) causal Monarch"
        " (module defaults: emb 3, order 16); all with the jnp_fft inner FFT. Attention baseline: a causal"
        f" attention *layer* of the same width (q/k/v/o projections + `blockwise_attention`, H={H}, P={P}, block"
        " 512) — `lcjax.ops.attention.blockwise_attention` existed at run time. Time: min over N calls of the"
        " compiled function's *process CPU time* (one XLA thread, so CPU time = compute time even while other jobs"
        " preempt us; wall-clock samples are in the JSON), variants of one length interleaved call by call."
        " Memory: `memory_analysis()` temp + argument bytes. Slopes: least squares on log-log over L >= 4K with 95%"
        " bootstrap CIs.", "",
        f"**Machine.** {env['cpu_model']}, {env['cpu_count']} cores shared with other engineers' jobs (load average"
        f" {env['loadavg_start']} at the start, {env['loadavg_end']} at the end), {THREADS} XLA thread(s)."
        f" Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, numpy {env['numpy']}. Wall time"
        f" {results['wall_s']:.0f} s. Absolute times are noisy; ratios come from interleaved runs.", "",
        "## (1) Sequence mixers vs attention (forward CPU time, ms; fwd+bwd in the JSON and the plot)", "",
        "| L | " + " | ".join(names) + " | attention / m2_causal_fft |", "|---:|" + "---:|" * (len(names) + 1),
    ]  # fmt: skip
    for r in mix["rows"]:
        t = r["times_s"]
        cells = [_ms(t[f"{n}/fwd"]) for n in names]
        ratio = min(t[f"{names[3]}/fwd"]) / min(t[f"{names[1]}/fwd"])
        lines.append(f"| {r['L']:,} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    lines += ["", "Peak memory (MiB, forward / fwd+bwd):", "", "| L | " + " | ".join(names) + " |",
              "|---:|" + "---:|" * len(names)]  # fmt: skip
    for r in mix["rows"]:
        m = r["peak_bytes"]
        bwd = lambda n: f"{m[n + '/fwd_bwd'] / 2**20:,.0f}" if n + "/fwd_bwd" in m else "—"
        cell = lambda n: f"{m[n + '/fwd'] / 2**20:,.0f} / " + bwd(n)
        lines.append(f"| {r['L']:,} | " + " | ".join(cell(n) for n in names) + " |")
    lines += ["", "Log-log time slopes over L >= 4K (95% CI):", ""]
    for name, f in fit_mix.items():
        lines.append(f"- {name}: **{f['slope']:.2f}** [{f['ci95'][0]:.2f}, {f['ci95'][1]:.2f}]")
    lines += ["", "## (2) Monarch GEMMs as a fraction of the measured f32 matmul rate (2048³ `jnp.matmul`, timed in"
              f" the same interleaved rounds as each case; median {thr['peak']['gflops']:.1f} GFLOP/s)", "",
              "| n | block | rows | GFLOP | matmul 2048³ GFLOP/s (same rounds) | monarch_matmul GFLOP/s |"
              " fraction | one dense GEMM of the factors' shape: fraction |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in thr["monarch_matmul"]:
        lines.append(f"| {r['n']:,} | {r['block']} | {r['rows']:,} | {r['gflop']:.2f} | {r['matmul_2048_gflops']:.1f} |"
                     f" {r['monarch_gflops']:.1f} | **{r['fraction_of_peak']:.2f}** |"
                     f" {r['gemm_same_shape_fraction']:.2f} |")  # fmt: skip
    lines += ["", "| n | b1 | rows | real GFLOP | matmul 2048³ GFLOP/s | monarch_fft GFLOP/s | fraction |"
              " time monarch_fft / jnp.fft |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in thr["monarch_fft"]:
        lines.append(f"| {r['n']:,} | {r['b1']} | {r['rows']:,} | {r['gflop']:.2f} | {r['matmul_2048_gflops']:.1f} |"
                     f" {r['monarch_gflops']:.1f} | **{r['fraction_of_peak']:.2f}** |"
                     f" {r['time_ratio_monarch_over_jnp_fft']:.1f}x |")  # fmt: skip
    cnames = sorted({k for r in conv["rows"] for k in r["times_s"]})
    lines += ["", f"## (3) Long convolution paths ({conv['channels']} channels, forward CPU time, ms)", "",
              "| L | " + " | ".join(cnames) + " |", "|---:|" + "---:|" * len(cnames)]
    for r in conv["rows"]:
        lines.append(f"| {r['L']:,} | " + " | ".join(_ms(r["times_s"][n]) if n in r["times_s"] else "—"
                                                   for n in cnames) + " |")  # fmt: skip
    lines += ["", "Slopes over L >= 4K: " + ", ".join(f"{n} {f['slope']:.2f}" for n, f in fit_conv.items()), "",
              "![results](bench_m2.png)", "", "## Conclusion", "", results.get("conclusion", ""), "",
              "Not run here: the small MQAR comparison of the causal M2 LM against attention and Mamba-2 at equal size"
              " — it needs the decoder `LM` (lcjax/models/lm.py) with the `m2` block registered."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def conclusion(results: dict) -> str:
    fm = results["fits"]["mixers"]
    mix = results["mixers"]["rows"][-1]
    t = mix["times_s"]
    att, a = min(t["attention (blockwise, causal)/fwd"]), min(t["m2_causal_fft (a)/fwd"])
    best_mm = max(results["throughput"]["monarch_matmul"], key=lambda r: r["n"])
    best_fft = max(results["throughput"]["monarch_fft"], key=lambda r: r["n"])
    s = lambda n: fm[n]["slope"] if n in fm else float("nan")
    fc = results["fits"]["convs"]
    mem = mix["peak_bytes"]
    mib = lambda n: mem[n] / 2**20
    return (
        f"At L = {mix['L']:,} the causal M2 mixer (a) takes {1e3 * a:,.0f} ms forward against {1e3 * att:,.0f} ms for a"
        f" blockwise-attention layer of the same width ({att / a:.0f}x). Forward time slopes over L >= 4K: M2-BERT"
        f" mixer {s('m2_bert (bidirectional)/fwd'):.2f}, causal (a) {s('m2_causal_fft (a)/fwd'):.2f}, causal Monarch"
        f" (b) {s('m2_causal_monarch (b)/fwd'):.2f}, attention {s('attention (blockwise, causal)/fwd'):.2f}. Only the"
        f" M2-BERT mixer meets the <= 1.1 target; (a) misses it slightly because the single-core jnp.fft itself grows"
        f" with slope {fc.get('causal/jnp_fft', {}).get('slope', float('nan')):.2f} here (its 2L-point, 256-channel"
        " transforms leave the caches), and (b) adds the basis factors A, A⁻¹, which are Monarch GEMMs of O(L^1.5)"
        " work (sub-quadratic, not n log n), so its slope lies between 1 and 1.5 by construction. Memory is linear"
        f" for all of them, but the M2 mixers hold 2L-point complex spectra: {mib('m2_causal_fft (a)/fwd'):,.0f} MiB"
        f" forward for (a) at {mix['L']:,} against {mib('attention (blockwise, causal)/fwd'):,.0f} MiB for blockwise"
        " attention."
        f" `monarch_matmul` at n = {best_mm['n']:,} runs at {best_mm['fraction_of_peak']:.0%} of the measured 2048³"
        f" matmul rate, short of the 50% target: one dense GEMM of the factors' own shape (K = N = {best_mm['block']})"
        f" reaches only {best_mm['gemm_same_shape_fraction']:.0%} on XLA:CPU, and the two reshape-transposes between"
        f" the factors cost the rest. `monarch_fft` (complex GEMMs, larger arithmetic intensity) reaches"
        f" {best_fft['fraction_of_peak']:.0%} at n = {best_fft['n']:,}, yet takes"
        f" {best_fft['time_ratio_monarch_over_jnp_fft']:.1f}x the time of jnp.fft (O(n^1.5) work against"
        " O(n log n)): on a CPU the FFT path is the right default (it is the layers' default, `conv_impl='jnp_fft'`);"
        " the Monarch DFT pays off only where GEMMs run far faster than FFTs (bf16 tensor cores; not measured here)."
    )


def environment() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "numpy": np.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "threads": THREADS,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 rep, temp output dir, no README")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="re-render README/PNG from a results JSON")
    args = parser.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        results["conclusion"] = conclusion(results)
        plot(results, args.render.parent / "bench_m2.png")
        write_readme(results, args.render.parent / "README.md")
        args.render.write_text(json.dumps(results, indent=1))
        return results
    rng = np.random.default_rng(0)
    t0 = time.time()
    env = environment()
    if args.quick:
        lengths, conv_lengths = [256, 512], [256, 512]
        reps = lambda L: 1
        mm_cases, fft_cases, thr_reps, attn_bwd_max, naive_max = [(256, 64)], [(256, 16)], 1, 512, 512
    else:
        lengths = conv_lengths = [1024, 2048, 4096, 8192, 16384, 32768]
        reps = lambda L: 5 if L <= 4096 else 3 if L <= 8192 else 2
        mm_cases = [(1024, 16384), (4096, 4096), (16384, 1024)]
        fft_cases = [(1024, 1024), (4096, 256), (16384, 64), (65536, 16)]
        thr_reps, attn_bwd_max, naive_max = 5, 8192, 1024  # naive conv: an (L, L, D) Toeplitz in memory
    results = {"environment": env, "config": {"D": D, "H": H, "P": P, "quick": args.quick}}
    results["throughput"] = bench_throughput(mm_cases, fft_cases, thr_reps, rng)
    results["convs"] = bench_convs(conv_lengths, reps, naive_max, rng)
    results["mixers"] = bench_mixers(lengths, reps, attn_bwd_max, rng)
    min_L = 4096 if not args.quick else 0
    results["fits"] = {"mixers": fits(results["mixers"], lambda k: True, min_L, rng),
                       "convs": fits(results["convs"], lambda k: "naive" not in k, min_L, rng)}  # fmt: skip
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.time() - t0
    results["conclusion"] = conclusion(results)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_m2_")) if args.quick else OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_m2.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench_m2.png")
    if not args.quick:
        write_readme(results, out / "README.md")
    print(json.dumps({"out": str(out), "wall_s": round(results["wall_s"], 1), "conclusion": results["conclusion"]}))
    return results


if __name__ == "__main__":
    main()
