"""Benchmark: one Mamba-2 mixer at mamba2-130m shapes, lcjax (JAX/XLA CPU) vs HF transformers' torch path.

Question: is the lcjax mixer (chunked SSD) at least 2x faster than HF's pure-torch ``Mamba2Mixer`` for training
(forward + backward) at L = 4096, linear in L (log-log slope <= 1.1 over 1K..16K), and how much of the machine's
measured f32 matmul throughput do the analytic FLOPs imply? And is per-token decoding latency flat in the context?

Setup: d_model 768, d_state 128, head_dim 64, expand 2 (24 heads), n_groups 1, d_conv 4, chunk 256, float32,
batch 1. The HF mixer (transformers 5.23.0, ``Mamba2Mixer`` in train mode: no ``mamba_ssm``/``causal_conv1d``, so
its torch fallbacks run) gets the lcjax mixer's weights (``lcjax.convert.mamba2.mixer_to_hf``) and the outputs
are checked to agree. Both run with the same number of threads: ``torch.set_num_threads(n)`` and, set before
jax is imported, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=n``; and the
process is pinned to n CPUs (``os.sched_setaffinity``), because XLA:CPU still runs independent ops of one program
concurrently with those flags (measured: 2.2 s of CPU in 1.15 s of wall time on an idle moment). The loss is
sum(y * w) for a fixed random w; lcjax differentiates w.r.t. every parameter and the input, torch likewise.
Timing: per length, A and B alternate ``--repeats`` times (interleaved) and the minimum wall time is kept, with
the process CPU time of the same calls alongside (less sensitive to other jobs taking the core); the load
average is recorded before and after each length because the machine is shared.

    .venv/bin/python experiments/bench_mamba2.py                 # full run (writes experiments/mamba2/)
    .venv/bin/python experiments/bench_mamba2.py --quick         # seconds: tiny lengths, 1 repeat, no files

FLOPs (analytic, multiply-add = 2, forward): in_proj 2·L·D·(2E + 2GN + H), conv 2·L·(E + 2GN)·W, SSD intra-chunk
2·L·Q·(G·N + H·P), chunk states and state-to-output 4·L·H·P·N, out_proj 2·L·E·D; forward + backward = 3x the
forward (the backward of each matmul is two matmuls of the same size). XLA's own count is
``compiled.cost_analysis()["flops"]`` of the jitted gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short lengths, 1 repeat, no output files")
    p.add_argument("--threads", type=int, default=1, help="threads for both torch and XLA (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per length (min is kept)")
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--decode-steps", type=int, default=32, help="timed single-token steps per context")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mamba2"))
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.quick:
    ARGS.lengths, ARGS.decode_contexts, ARGS.repeats, ARGS.decode_steps = [256, 512], [256], 1, 4
os.environ["JAX_PLATFORMS"] = "cpu"
CPUS = sorted(os.sched_getaffinity(0))[: ARGS.threads]
os.sched_setaffinity(0, CPUS)
os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={ARGS.threads} "
                           + os.environ.get("XLA_FLAGS", ""))  # fmt: skip

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

torch.set_num_threads(ARGS.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcjax.convert.mamba2 import mixer_to_hf  # noqa: E402
from lcjax.layers.mamba2 import Mamba2, Mamba2Config  # noqa: E402

D, N, P, EXPAND, Q = 768, 128, 64, 2, 256


def analytic_flops(cfg: Mamba2Config, L: int) -> dict[str, float]:
    E, H, G, W = cfg.d_inner, cfg.num_heads, cfg.n_groups, cfg.d_conv
    fwd = {
        "in_proj": 2 * L * D * (2 * E + 2 * G * N + H),
        "conv": 2 * L * (E + 2 * G * N) * W,
        "ssd_intra_chunk": 2 * L * min(cfg.chunk_size, L) * (G * N + H * P),
        "ssd_states": 4 * L * H * P * N,
        "out_proj": 2 * L * E * D,
    }
    fwd_total = float(sum(fwd.values()))
    return {"forward": fwd_total, "forward_backward": 3 * fwd_total, "forward_parts": fwd}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed_cpu(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def build(seed: int = 0):
    """The lcjax mixer (upstream init, non-trivial D/norm) and an HF ``Mamba2Mixer`` holding the same weights."""
    from transformers import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(d_model=D, d_state=N, head_dim=P, expand=EXPAND, chunk_size=Q)
    mixer = Mamba2(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    mixer.D.set_value(jnp.asarray(rng.normal(size=mixer.D.shape), jnp.float32))
    mixer.norm.set_value(jnp.asarray(1 + 0.1 * rng.normal(size=mixer.norm.shape), jnp.float32))
    hf_cfg = HFConfig(hidden_size=D, num_heads=cfg.num_heads, head_dim=P, state_size=N, n_groups=1, expand=EXPAND,
                      chunk_size=Q, conv_kernel=cfg.d_conv, num_hidden_layers=1, vocab_size=16, use_cache=False)
    hf = Mamba2Mixer(hf_cfg, layer_idx=0)
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in mixer_to_hf(mixer).items()}, strict=True)
    return cfg, mixer, hf.train(), hf_cfg


def bench_matmul(repeats: int) -> dict[str, float]:
    """f32 matmul throughput of this process's XLA (and torch) on 2048^3: the machine's roofline for the ratio."""
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    at = torch.tensor(np.asarray(a))
    jax_t = min(timed(lambda: jax.block_until_ready(mm(a))) for _ in range(max(repeats, 3)))
    torch_t = min(timed(lambda: at @ at) for _ in range(max(repeats, 3)))
    return {"n": n, "jax_gflops": 2 * n**3 / jax_t / 1e9, "torch_gflops": 2 * n**3 / torch_t / 1e9}


def bench_training(cfg, mixer, hf, lengths, repeats):
    rows = []
    for L in lengths:
        rng = np.random.default_rng(L)
        x_np, w_np = (rng.normal(size=(1, L, D)).astype(np.float32) for _ in range(2))
        x, w = jnp.asarray(x_np), jnp.asarray(w_np)
        loss = lambda m, x, w: jnp.sum(m(x)[0] * w)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        t0 = time.perf_counter()
        compiled = grad.lower(mixer, x, w).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        xla_flops = float(cost.get("flops", float("nan")))
        xt, wt = torch.from_numpy(x_np).requires_grad_(), torch.from_numpy(w_np)

        def run_jax():
            jax.block_until_ready(compiled(mixer, x, w))

        def run_torch():
            hf.zero_grad(set_to_none=True)
            xt.grad = None
            (hf(xt) * wt).sum().backward()

        run_jax(), run_torch()  # warm-up (and allocator growth)
        load_before = loadavg()
        jax_ts, torch_ts, jax_cpu, torch_cpu = [], [], [], []
        for _ in range(repeats):  # interleaved A/B
            for fn, ts, cs in ((run_jax, jax_ts, jax_cpu), (run_torch, torch_ts, torch_cpu)):
                wall, cpu = timed_cpu(fn)
                ts.append(wall)
                cs.append(cpu)
        row = dict(L=L, jax_s=min(jax_ts), torch_s=min(torch_ts), jax_all=jax_ts, torch_all=torch_ts,
                   jax_cpu_s=min(jax_cpu), torch_cpu_s=min(torch_cpu), speedup=min(torch_ts) / min(jax_ts),
                   speedup_cpu=min(torch_cpu) / min(jax_cpu), compile_s=compile_s, xla_flops=xla_flops,
                   analytic_flops=analytic_flops(cfg, L)["forward_backward"], load_before=load_before,
                   load_after=loadavg())  # fmt: skip
        rows.append(row)
        print(f"L={L:6d}  lcjax {row['jax_s']:.3f} s  HF torch {row['torch_s']:.3f} s  speedup {row['speedup']:.2f}x  "
              f"(CPU time {row['speedup_cpu']:.2f}x; compile {compile_s:.1f} s, load {load_before})", flush=True)
    return rows


def check_parity(mixer, hf, L: int = 1024) -> float:
    x = np.random.default_rng(1).normal(size=(1, L, D)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).numpy()
    y = jax.jit(lambda m, x: m(x)[0])(mixer, jnp.asarray(x))
    return float(np.max(np.abs(np.asarray(y) - ref)))


def bench_decoding(mixer, hf, hf_cfg, contexts, steps, repeats):
    """Per-token latency after a prefill of each context length: lcjax ``Mamba2.step`` vs HF's cached update.

    lcjax is timed two ways: ``steps`` tokens in one jitted ``lax.scan`` (how ``lcjax.models.lm.generate`` decodes;
    min of ``repeats``, divided by ``steps``) and one jitted call per token from Python (median), which adds the
    dispatch of the module's pytree. HF: one ``Mamba2Mixer`` call per token with its cache (median).
    """
    from transformers.cache_utils import DynamicCache

    prefill = jax.jit(lambda m, x: m(x)[1])
    step = jax.jit(lambda m, x, s: m.step(x, s))

    @jax.jit
    def scan_steps(m, xs_TBD, state):
        def body(state, x_BD):
            y_BD, state = m.step(x_BD, state)
            return state, y_BD

        return jax.lax.scan(body, state, xs_TBD)
    hf.eval()
    rows = []
    for ctx in contexts:
        rng = np.random.default_rng(ctx)
        x_np = rng.normal(size=(1, ctx, D)).astype(np.float32)
        toks = rng.normal(size=(steps + 2, 1, D)).astype(np.float32)
        state = prefill(mixer, jnp.asarray(x_np))
        y, state = step(mixer, jnp.asarray(toks[0]), state)
        jax.block_until_ready(y)
        xs = jnp.asarray(toks[1 : steps + 1])
        jax.block_until_ready(scan_steps(mixer, xs, state))
        scan_s = min(timed(lambda: jax.block_until_ready(scan_steps(mixer, xs, state))) for _ in range(repeats))
        with torch.no_grad():
            cache = DynamicCache(config=hf_cfg)
            hf(torch.from_numpy(x_np), cache_params=cache)
            hf(torch.from_numpy(toks[0])[:, None], cache_params=cache)
            jax_ts, torch_ts = [], []
            for i in range(1, steps + 1):  # interleaved
                t = time.perf_counter()
                y, state = step(mixer, jnp.asarray(toks[i]), state)
                jax.block_until_ready(y)
                jax_ts.append(time.perf_counter() - t)
                torch_ts.append(timed(lambda: hf(torch.from_numpy(toks[i])[:, None], cache_params=cache)))
        row = dict(context=ctx, jax_scan_ms=1e3 * scan_s / steps, jax_ms=1e3 * float(np.median(jax_ts)),
                   torch_ms=1e3 * float(np.median(torch_ts)), jax_min_ms=1e3 * min(jax_ts),
                   torch_min_ms=1e3 * min(torch_ts), load=loadavg())  # fmt: skip
        rows.append(row)
        print(f"decode ctx={ctx:6d}  lcjax {row['jax_scan_ms']:.3f} ms/token in a jitted scan, "
              f"{row['jax_ms']:.2f} ms per Python call; HF {row['torch_ms']:.2f} ms/token", flush=True)
    hf.train()
    return rows


def slope(rows, key) -> float:
    L = np.log([r["L"] for r in rows])
    return float(np.polyfit(L, np.log([r[key] for r in rows]), 1)[0])


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, dec = result["training"], result["decoding"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    Ls = [r["L"] for r in tr]
    a.loglog(Ls, [r["jax_s"] for r in tr], "o-", label=f"lcjax (slope {result['slope_jax']:.2f})")
    a.loglog(Ls, [r["torch_s"] for r in tr], "s-", label=f"HF torch (slope {result['slope_torch']:.2f})")
    a.set_xlabel("sequence length L")
    a.set_ylabel("forward + backward, s (min of N)")
    a.set_title(f"Mamba-2 mixer, 130m shapes, f32, {result['threads']} thread(s)")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    ctx = [r["context"] for r in dec]
    b.semilogx(ctx, [r["jax_scan_ms"] for r in dec], "o-", label="lcjax Mamba2.step, jitted scan")
    b.semilogx(ctx, [r["jax_ms"] for r in dec], "^--", label="lcjax Mamba2.step, one call per token")
    b.semilogx(ctx, [r["torch_ms"] for r in dec], "s-", label="HF cached update")
    b.set_xlabel("context length before the step")
    b.set_ylabel("ms per token (median)")
    b.set_title("decoding latency")
    b.set_ylim(bottom=0)
    b.grid(True, which="both", alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    cfg, mixer, hf, hf_cfg = build()
    print(f"threads {ARGS.threads}; load {loadavg()}; parity check ...", flush=True)
    parity = check_parity(mixer, hf, L=min(1024, max(ARGS.lengths)))
    print(f"max |y_lcjax - y_hf| = {parity:.2e}", flush=True)
    mm = bench_matmul(ARGS.repeats)
    print(f"f32 matmul 2048^3: XLA {mm['jax_gflops']:.1f} GFLOP/s, torch {mm['torch_gflops']:.1f} GFLOP/s", flush=True)
    training = bench_training(cfg, mixer, hf, ARGS.lengths, ARGS.repeats)
    decoding = bench_decoding(mixer, hf, hf_cfg, ARGS.decode_contexts, ARGS.decode_steps, ARGS.repeats)
    mm_after = bench_matmul(ARGS.repeats)
    peak = max(mm["jax_gflops"], mm_after["jax_gflops"]) * 1e9
    for r in training:
        r["analytic_gflops_per_s"] = r["analytic_flops"] / r["jax_s"] / 1e9
        r["fraction_of_matmul"] = r["analytic_flops"] / r["jax_s"] / peak
        r["xla_fraction_of_matmul"] = r["xla_flops"] / r["jax_s"] / peak
    result = dict(
        question="Mamba-2 mixer fwd+bwd, lcjax vs HF torch; decoding latency vs context",
        config=dict(d_model=D, d_state=N, head_dim=P, expand=EXPAND, n_heads=cfg.num_heads, n_groups=1,
                    chunk_size=Q, d_conv=cfg.d_conv, dtype="float32", batch=1),  # fmt: skip
        threads=ARGS.threads, cpus=CPUS, repeats=ARGS.repeats, parity_max_abs=parity, matmul_before=mm,
        matmul_after=mm_after,
        training=training, decoding=decoding, slope_jax=slope(training, "jax_s"),
        slope_torch=slope(training, "torch_s"), slope_jax_cpu=slope(training, "jax_cpu_s"),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
        flops_per_part_at_4096=analytic_flops(cfg, 4096)["forward_parts"],
        command=" ".join(["python"] + sys.argv),
    )  # fmt: skip
    print(f"slope lcjax {result['slope_jax']:.3f} (CPU time {result['slope_jax_cpu']:.3f}), "
          f"HF {result['slope_torch']:.3f}", flush=True)
    for r in training:
        print(f"L={r['L']:6d}  analytic {r['analytic_gflops_per_s']:.1f} GFLOP/s = "
              f"{100 * r['fraction_of_matmul']:.0f}% "
              f"of matmul; XLA count {r['xla_flops'] / 1e9:.1f} GFLOP ({100 * r['xla_fraction_of_matmul']:.0f}%)")
    if ARGS.quick:
        return result
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, "bench_mamba2.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(ARGS.out, "bench_mamba2.png"))
    print(f"wrote {ARGS.out}/bench_mamba2.json and .png")
    return result


if __name__ == "__main__":
    main()
