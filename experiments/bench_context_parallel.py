"""Context-parallel attention: per-device memory vs total length, and time overhead on the fake CPU mesh.

Question 1 (memory): does ring attention's per-device peak memory (forward + backward, from XLA's compiled memory
analysis; nothing is executed) scale as L/n? Acceptance: at the largest L, ring(n) <= 1.25/n x one device.
All-gather attention is measured alongside (its gathered K/V are O(L) per device).

Question 2 (time): what does the ring cost on top of single-device blockwise attention? On 8 fake CPU devices
sharing the host's cores, the devices' work is serialised, so this is a correctness-mesh figure (collective and
scheduling overhead of the program), not a speed claim about real accelerators.

    .venv/bin/python experiments/bench_context_parallel.py            # full run (a few minutes)
    .venv/bin/python experiments/bench_context_parallel.py --quick    # smoke run (seconds)

Writes experiments/context_parallel/{results.json, memory.png, time.png} (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lcjax.ops import context_parallel as cp  # noqa: E402
from lcjax.ops.attention_blockwise import blockwise_attention  # noqa: E402
from lcjax.ops.ring_attention import default_block  # noqa: E402


def make_step(strategy: str, n: int, B: int, L: int, H: int, K: int, Pd: int):
    """jit(fwd + bwd) of causal attention on a ``ctx`` mesh of n devices, and its (sharded) abstract inputs."""
    if n == 1 and strategy == "blockwise":
        def loss(q, k, v, pos, dout):
            # the ring's tile size (default_block) so that only the sequence split differs
            out = blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos, block_q=default_block(L),
                                      block_kv=default_block(L))
            return jnp.sum(out * dout)

        args = [jax.ShapeDtypeStruct(s, d) for s, d in (((B, L, H, Pd), jnp.float32), ((B, L, K, Pd), jnp.float32),
                                                         ((B, L, K, Pd), jnp.float32), ((B, L), jnp.int32),
                                                         ((B, L, H, Pd), jnp.float32))]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args, None
    mesh = jax.make_mesh((n,), ("ctx",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])
    fn = cp.ring_attention if strategy == "ring" else cp.allgather_attention
    spec = P(None, "ctx")

    def loss(q, k, v, pos, dout):
        out = jax.shard_map(lambda q, k, v, p: fn(q, k, v, axis_name="ctx", q_positions=p, kv_positions=p),
                            mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(q, k, v, pos)
        return jnp.sum(out * dout)

    sh = NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in (
        ((B, L, H, Pd), jnp.float32), ((B, L, K, Pd), jnp.float32), ((B, L, K, Pd), jnp.float32),
        ((B, L), jnp.int32), ((B, L, H, Pd), jnp.float32))]  # fmt: skip
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args, mesh


def peak_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return dict(peak=int(peak), arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                temp=int(m.temp_size_in_bytes))  # fmt: skip


def memory_study(lengths, ns, shape) -> list[dict]:
    rows = []
    for L in lengths:
        # all-gather with n = 1 is the blockwise kernel again; ring n = 1 is kept as a check of the baseline
        for strategy, n in [("blockwise", 1)] + [(s, n) for s in ("ring", "allgather") for n in ns
                                                 if s == "ring" or n > 1]:  # fmt: skip
            step, args, mesh = make_step(strategy, n, shape["B"], L, shape["H"], shape["K"], shape["P"])
            with jax.set_mesh(mesh):
                compiled = step.lower(*args).compile()
            rows.append(dict(L=L, n=n, strategy=strategy, **peak_bytes(compiled)))
            print(f"memory  L={L:6d} n={n} {strategy:9s} peak/device {rows[-1]['peak'] / 2**20:8.1f} MiB", flush=True)
    return rows


def time_study(L, ns, shape, repeats, layouts) -> list[dict]:
    """Interleaved min-of-N wall time of one fwd+bwd step; single-device blockwise is the baseline."""
    r = np.random.default_rng(0)
    B, H, K, Pd = shape["B"], shape["H"], shape["K"], shape["P"]
    host = [r.normal(size=s).astype(np.float32) for s in ((B, L, H, Pd), (B, L, K, Pd), (B, L, K, Pd))]
    dout = r.normal(size=(B, L, H, Pd)).astype(np.float32)
    configs = [("blockwise", 1, "contiguous")] + [(s, n, lay) for s in ("ring", "allgather") for n in ns if n > 1
                                                  for lay in layouts]  # fmt: skip
    runners = {}
    for strategy, n, layout in configs:
        step, args, mesh = make_step(strategy, n, B, L, H, K, Pd)
        perm = cp.permutation(L, n, layout)
        pos = np.broadcast_to(perm.astype(np.int32), (B, L)).copy()
        vals = [x[:, perm] for x in host] + [pos, dout[:, perm]]
        with jax.set_mesh(mesh):
            dev = [jax.device_put(x, a.sharding) if a.sharding is not None else jnp.asarray(x)
                   for x, a in zip(vals, args)]  # fmt: skip
            jax.block_until_ready(step(*dev))  # compile + warm up
        runners[(strategy, n, layout)] = (step, dev, mesh)
    best = {key: float("inf") for key in runners}
    for _ in range(repeats):  # interleave A/B so background load hits every configuration alike
        for key, (step, dev, mesh) in runners.items():
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                jax.block_until_ready(step(*dev))
                best[key] = min(best[key], time.perf_counter() - t0)
    base = best[("blockwise", 1, "contiguous")]
    rows = []
    for (strategy, n, layout), t in best.items():
        rows.append(dict(L=L, n=n, strategy=strategy, layout=layout, seconds=t, vs_single_device=t / base))
        print(f"time    L={L} n={n} {strategy:9s} {layout:10s} {t * 1e3:8.1f} ms  x{t / base:.2f}", flush=True)
    return rows


def plot(mem_rows, time_rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, style in (("blockwise", "--"), ("ring", "-"), ("allgather", ":")):
        for n in sorted({r["n"] for r in mem_rows}):
            pts = sorted((r["L"], r["peak"] / 2**20) for r in mem_rows if r["strategy"] == strategy and r["n"] == n)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{strategy} n={n}")
    one = sorted((r["L"], r["peak"] / 2**20) for r in mem_rows if r["strategy"] == "blockwise")
    for n in sorted({r["n"] for r in mem_rows if r["n"] > 1}):
        ax.plot([L for L, _ in one], [m / n for _, m in one], "kx", ms=5,
                label="one device / n" if n == 2 else None)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("total sequence length L")
    ax.set_ylabel("peak memory per device, fwd+bwd (MiB)")
    ax.set_title("Compiled per-device memory (B=1, H=8, K=2, P=64, f32, causal)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = [f"{r['strategy']}\nn={r['n']} {r['layout'][:3]}" for r in time_rows]
    ax.bar(range(len(time_rows)), [r["vs_single_device"] for r in time_rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(time_rows)), labels, fontsize=6)
    ax.set_ylabel("fwd+bwd time / single-device blockwise")
    ax.set_title(f"8 fake CPU devices on a shared 2-core host, L={time_rows[0]['L']}: not a speed claim", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run in seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "context_parallel"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNGs from an existing results.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((out / "results.json").read_text())
        plot(saved["memory"], saved["time"], out)
        return
    shape = dict(B=1, H=8, K=2, P=64)
    if args.quick:
        lengths, ns, time_L, repeats, layouts = [256], [1, 2], 256, 1, ["zigzag"]
    else:
        lengths, ns, time_L, repeats, layouts = [16384, 65536, 262144], [1, 2, 4, 8], 4096, 5, ["contiguous", "zigzag"]
    mem_rows = memory_study(lengths, ns, shape)
    time_rows = time_study(time_L, ns, shape, repeats, layouts)
    Lmax = max(lengths)
    one = next(r["peak"] for r in mem_rows if r["L"] == Lmax and r["strategy"] == "blockwise")
    check = {f"n={r['n']}": dict(ratio=r["peak"] / one, bound=1.25 / r["n"], ok=r["peak"] / one <= 1.25 / r["n"])
             for r in mem_rows if r["L"] == Lmax and r["strategy"] == "ring"}  # fmt: skip
    for k, v in check.items():
        print(f"ring memory at L={Lmax}, {k}: {v['ratio']:.3f} of one device (bound {v['bound']:.3f}) ok={v['ok']}")
    result = dict(
        question="per-device memory of ring / all-gather attention vs L and n; time overhead on a fake CPU mesh",
        shape=shape | dict(causal=True, dtype="float32"), memory=mem_rows, memory_check_at_largest_L=check,
        time=time_rows, quick=args.quick, command="experiments/bench_context_parallel.py" + (" --quick" * args.quick),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                     jax=jax.__version__, devices=f"{jax.device_count()} fake CPU devices",
                     note="shared host; other jobs were running; times are min-of-N, interleaved"),
    )  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(mem_rows, time_rows, out)


if __name__ == "__main__":
    main()
