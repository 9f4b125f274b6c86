"""Ring attention across a process boundary: 2 JAX processes x 4 CPU devices (gloo), one context axis of 8.

Each worker joins through ``lcjax.distributed.initialize`` (LCJAX_* variables), builds the global zigzag-permuted
arrays from the same host data, runs ring attention forward and backward through ``context_parallel_attention``
and gathers the results; the test compares them (un-permuted) with the dense float64 reference.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lcjax.ops import context_parallel as cp
from tests.ops.test_ring_attention import assert_matches, make_inputs, reference

pytestmark = pytest.mark.multiprocess

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from lcjax import distributed, sharding
    assert distributed.initialize()
    import numpy as np
    from jax.experimental import multihost_utils
    from lcjax.ops import context_parallel as cp

    d = dict(np.load(sys.argv[1]))
    mesh = sharding.make_mesh(context=8)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    with sharding.use(mesh, sharding.ShardingRules.context_parallel()):
        def put(x):
            names = ("act_batch", "act_seq") + (None,) * (x.ndim - 2)
            return jax.make_array_from_callback(x.shape, sharding.named_sharding(*names), lambda idx: x[idx])

        q, k, v, pos, seg, dout, dlse = (put(d[name]) for name in ("q", "k", "v", "pos", "seg", "dout", "dlse"))

        @jax.jit
        def fwd_bwd(q, k, v, pos, seg, dout, dlse):
            attn = lambda q, k, v: cp.context_parallel_attention(
                q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, window=13,
                strategy="ring", return_lse=True)
            (out, lse), vjp = jax.vjp(attn, q, k, v)
            return (out, lse, *vjp((dout, dlse)))

        results = [multihost_utils.process_allgather(x, tiled=True) for x in fwd_bwd(q, k, v, pos, seg, dout, dlse)]
    if jax.process_index() == 0:
        np.savez(sys.argv[2], *[np.asarray(x) for x in results])
    distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ring_attention_across_two_processes(tmp_path):
    n, layout, window = 8, "zigzag", 13
    inputs = make_inputs(5, 4, 2, 8, True)
    perm = cp.permutation(inputs[0].shape[1], n, layout)
    names = ("q", "k", "v", "pos", "seg", "dout", "dlse")
    np.savez(tmp_path / "inputs.npz", **{k: x[:, perm] for k, x in zip(names, inputs)})
    (tmp_path / "worker.py").write_text(WORKER)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, LCJAX_COORDINATOR=f"127.0.0.1:{port}", LCJAX_NUM_PROCESSES="2",
                   LCJAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu")  # fmt: skip
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:  # time limit: never leave a worker behind
            if p.poll() is None:
                p.kill()
    with np.load(tmp_path / "out.npz") as f:
        got = [cp.undo_layout(f[f"arr_{i}"], n=n, layout=layout) for i in range(5)]
    assert_matches(got, reference(*inputs, causal=True, window=window))
