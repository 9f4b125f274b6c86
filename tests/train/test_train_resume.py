"""Preemption and crashes, with real training subprocesses: SIGTERM writes a checkpoint and exits cleanly; a run
killed with SIGKILL and restarted ends bitwise equal to an uninterrupted run, with the same data order; a corrupt
latest checkpoint costs one warning (not a screen of tracebacks); a trainer killed with SIGKILL leaves no grain
worker process behind.

All runs use one CPU device, the same environment and a shared persistent compilation cache (the same executables,
compiled once), so "bitwise" compares the arithmetic of resumed and uninterrupted training, nothing else.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.train import metrics
from tests.train.test_train import _corrupt
from tolerances import EXACT

pytestmark = pytest.mark.slow  # four training subprocesses (~45 s CPU); runs in CI's first pass, not the tree-mode one

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24  # checkpoint every 4 steps, metrics every step
ARGS = [
    f"--config={os.path.join(ROOT, 'configs', 'mqar.py')}:smoke,steps={STEPS}", "--config.progress_bar=False",
    "--config.checkpoint_every=4", "--config.eval_every=12", "--config.log_every=1", "--config.keep_checkpoints=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e |= dict(
        JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )  # fmt: skip
    return e


def start(workdir, env, *extra):
    cmd = [sys.executable, "-m", "lcjax.train", *ARGS, *extra, f"--workdir={workdir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def last_logged_step(workdir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.TornMetricsWarning)  # a line being written
        steps = [r["step"] for r in metrics.read_metrics(workdir) if r["split"] == "train"]
    return max(steps, default=0)


def wait_for_step(proc, workdir, step, timeout=240):
    t0 = time.time()
    while last_logged_step(workdir) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.communicate()[0]}"
        assert time.time() - t0 < timeout, f"no step {step} after {timeout} s"
        time.sleep(0.005)


def params(workdir, step):
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(workdir, "checkpoints", str(step), "model"))
    return jax.tree.map(np.asarray, tree)


def train_losses(workdir):
    records = [r for r in metrics.read_metrics(workdir) if r["split"] == "train"]
    return [r["step"] for r in records], [r["loss"] for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    rc, out = finish(start(workdir, env))
    assert rc == 0, out
    return workdir


def assert_same_run(workdir, reference):
    steps, losses = train_losses(workdir)
    ref_steps, ref_losses = train_losses(reference)
    assert steps == ref_steps == list(range(1, STEPS + 1))  # every step once, in order, despite the restarts
    np.testing.assert_allclose(losses, ref_losses, **EXACT)  # the same batches in the same order
    final, ref_final = params(workdir, STEPS), params(reference, STEPS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **EXACT), final, ref_final)


def test_sigterm_checkpoints_and_sigkill_resumes_bitwise(uninterrupted, env, tmp_path):
    workdir = str(tmp_path / "run")

    # 1. SIGTERM mid-run: the current step finishes, a checkpoint is written, the process exits with 0.
    proc = start(workdir, env)
    wait_for_step(proc, workdir, 6)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out
    stopped = last_logged_step(workdir)
    assert f"received SIGTERM: checkpoint written at step {stopped}" in out
    assert 6 <= stopped < STEPS
    assert stopped in {int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))}

    # 2. Resume, then SIGKILL a few steps later (possibly mid-checkpoint): no chance to clean up.
    proc = start(workdir, env)
    wait_for_step(proc, workdir, stopped + 6)
    proc.kill()
    rc, out = finish(proc)
    assert rc == -signal.SIGKILL, out
    assert f"resuming from step {stopped}" in out
    killed_at = last_logged_step(workdir)
    assert killed_at < STEPS, "the run finished before it was killed; the test proved nothing"

    # 3. Restart: resumes from the last committed checkpoint and ends exactly where the uninterrupted run ended.
    rc, out = finish(start(workdir, env))
    assert rc == 0, out
    resumed_from = int(out.split("resuming from step ")[1].split(";")[0])
    assert stopped <= resumed_from <= killed_at
    assert_same_run(workdir, uninterrupted)


def test_the_checkpoint_fallback_is_one_warning_not_a_screen_of_tracebacks(uninterrupted, env, tmp_path):
    """In a fresh process (as ``lcjax train`` runs), the abandoned reads of the unreadable checkpoint used to print an
    "Event loop is closed" traceback each (14 for this model, ~70 for a larger one)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    _corrupt(os.path.join(workdir, "checkpoints", str(STEPS)))
    rc, out = finish(start(workdir, env))
    assert rc == 0, out
    assert out.count("CheckpointFallbackWarning") == 1 and f"resuming from step {STEPS - 4}" in out, out
    assert "Event loop is closed" not in out and "Traceback" not in out, out


# ---- no orphaned grain workers ------------------------------------------------------------------------------------
def _stat(pid):
    """``(parent pid, state, start time)`` of a live process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid):
    """``{pid: start time}`` of every live descendant of ``pid``."""
    stats = {int(p): _stat(p) for p in os.listdir("/proc") if p.isdigit()}
    children = {p: s for p, s in stats.items() if s is not None and s[0] == pid}
    out = {p: s[2] for p, s in children.items()}
    for p in children:
        out |= descendants(p)
    return out


def alive(procs):
    """The processes of ``{pid: start time}`` that still run (not zombies, not a reused pid)."""
    return [p for p, t in procs.items() if (s := _stat(p)) is not None and s[1] != "Z" and s[2] == t]


def test_sigkill_of_the_trainer_leaves_no_grain_worker_behind(env, tmp_path):
    """With data.worker_count=1 the trainer has grain worker children; SIGKILL gives it no chance to stop them, so
    each worker must notice its parent is gone and exit by itself."""
    workdir = str(tmp_path / "run")
    proc = start(workdir, env, "--config.data.worker_count=1", "--config.num_steps=100000")
    wait_for_step(proc, workdir, 2)
    workers = descendants(proc.pid)
    assert workers, "the trainer started no worker process; the test proved nothing"
    proc.kill()
    try:
        proc.communicate(timeout=60)  # the workers share the trainer's stdout: EOF comes once they are gone too
        deadline = time.time() + 15
        while alive(workers) and time.time() < deadline:
            time.sleep(0.2)
        orphans = alive(workers)
    finally:
        for pid in alive(workers):  # never leave them running, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not orphans, f"still running after SIGKILL of the trainer: {orphans}"
