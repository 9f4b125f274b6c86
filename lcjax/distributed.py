"""Multi-host start-up: a thin, environment-driven wrapper over ``jax.distributed.initialize``.

On TPU pods, SLURM and other clusters JAX finds the coordinator by itself, so ``initialize()`` with no arguments and
no ``LCJAX_*`` variables just calls ``jax.distributed.initialize()`` when it detects a cluster, and otherwise does
nothing (one process). For hand-launched runs (and our 2-process CPU test) set:

  LCJAX_COORDINATOR=host:port   LCJAX_NUM_PROCESSES=N   LCJAX_PROCESS_ID=i   [LCJAX_LOCAL_DEVICE_IDS=0,1]

Call it once, before anything touches a JAX backend. CPU collectives use gloo by default in jax 0.10.
"""

from __future__ import annotations

import os

import jax

_ENV = ("LCJAX_COORDINATOR", "LCJAX_NUM_PROCESSES", "LCJAX_PROCESS_ID")
_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    *, local_device_ids: list[int] | None = None, initialization_timeout: int = 300,
) -> bool:  # fmt: skip
    """Join the multi-process JAX runtime. Returns True if running multi-process after the call.

    Explicit arguments win over ``LCJAX_*`` variables. Calling it again after a successful start is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    env_set = [n for n in _ENV if n in os.environ]
    if coordinator_address is None and env_set:
        if len(env_set) != len(_ENV):
            raise ValueError(f"distributed: set all of {_ENV} (or none); found only {env_set}")
        coordinator_address = os.environ["LCJAX_COORDINATOR"]
        num_processes = _env_int("LCJAX_NUM_PROCESSES") if num_processes is None else num_processes
        process_id = _env_int("LCJAX_PROCESS_ID") if process_id is None else process_id
        if local_device_ids is None and "LCJAX_LOCAL_DEVICE_IDS" in os.environ:
            local_device_ids = [int(i) for i in os.environ["LCJAX_LOCAL_DEVICE_IDS"].split(",")]
    if coordinator_address is None:
        if not any(h in os.environ for h in _CLUSTER_HINTS):
            return False  # a single process: nothing to join
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return True
    if num_processes is None or process_id is None:
        raise ValueError("distributed: num_processes and process_id are required with coordinator_address")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"distributed: process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
    )  # fmt: skip
    return True


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_main_process() -> bool:
    """True on the process that writes logs, plots and other one-copy outputs."""
    return jax.process_index() == 0
