"""Two JAX processes x 4 CPU devices (gloo), joined by lcjax.distributed.initialize from LCJAX_* variables."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lcjax import distributed

pytestmark = pytest.mark.multiprocess

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from lcjax import distributed, sharding
    assert distributed.initialize()
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = sharding.make_mesh(data=8)
    with sharding.use(mesh, sharding.ShardingRules.dp()):
        spec = sharding.named_sharding("act_batch", None)
        pid = jax.process_index()
        local = np.arange(4 * pid, 4 * pid + 4, dtype=np.float32)[:, None]
        x = jax.make_array_from_process_local_data(spec, local)
        def body(x):
            axis = sharding.mesh_axes("act_batch")
            n = jax.lax.axis_size(axis)
            total = jax.lax.psum(x, axis)
            ring = jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])
            return total, ring
        f = sharding.shard_map(body, in_specs=(("act_batch", None),),
                               out_specs=(("act_batch", None), ("act_batch", None)))
        total, ring = jax.jit(f)(x)
        from jax.experimental import multihost_utils
        ring_all = multihost_utils.process_allgather(ring, tiled=True)
    out = dict(pid=pid, n_dev=jax.device_count(), n_local=jax.local_device_count(),
               total=float(np.asarray(total.addressable_shards[0].data).ravel()[0]),
               ring=np.asarray(ring_all).ravel().tolist())
    print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_run_collectives_over_eight_devices(tmp_path):
    port = _free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for pid in range(2):
        env = dict(os.environ, LCJAX_COORDINATOR=f"127.0.0.1:{port}", LCJAX_NUM_PROCESSES="2",
                   LCJAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu")  # fmt: skip
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    for r in results:
        assert r["n_dev"] == 8 and r["n_local"] == 4
        assert r["total"] == sum(range(8))  # psum over all 8 devices of both processes
        assert r["ring"] == [7.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # crosses the process boundary both ways


def test_initialize_validation(monkeypatch):
    monkeypatch.setenv("LCJAX_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("LCJAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("LCJAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="set all of"):
        distributed.initialize()
    monkeypatch.delenv("LCJAX_COORDINATOR")
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    for hint in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(hint, raising=False)
    assert distributed.initialize() is False  # single process: nothing to join
