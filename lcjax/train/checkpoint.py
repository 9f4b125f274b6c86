"""Checkpoints: one orbax ``CheckpointManager`` (async, keep-last-K, atomic commits) per run directory.

Each checkpoint ``<dir>/<step>/`` holds three items, as in the Flax NNX gemma example and nanodo:
``model`` (``nnx.state(model)``), ``optimizer`` (``nnx.state(optimizer)``: step count, moments) and ``data`` (the
grain iterator state, ``grain.checkpoint.CheckpointSave``; one JSON file per process). The step number is the
number of completed updates; it is also ``optimizer.step``.

Restoring tries the latest step first. If it cannot be read (truncated or corrupted files), the trainer warns
(``CheckpointFallbackWarning``), moves it aside to ``<dir>/../corrupt_checkpoints/<step>`` so the step can be
written again, and falls back to the previous one. If no checkpoint can be restored, it raises instead of quietly
starting over (that is usually a changed config, not corruption), and moves nothing.

The fallback is quiet: when one array of a checkpoint cannot be read, orbax abandons the restore and closes its
asyncio loop while tensorstore is still reading the other arrays; each of those reads then completes on a
tensorstore thread by scheduling a callback on the closed loop, and Python prints an unraisable ``RuntimeError:
Event loop is closed`` traceback for every one (dozens per checkpoint). ``_quiet_closed_loops`` drops exactly those
while restoring; every other unraisable exception still reaches ``sys.unraisablehook``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointFallbackWarning(UserWarning):
    """The latest checkpoint could not be restored; an earlier one was used."""


class Checkpointer:
    """Save / restore model, optimizer and data-iterator state under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.quarantine = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ---- save ----------------------------------------------------------------------------------------------
    def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, data_iter: Any = None) -> None:
        """Start an (async) save of ``step``; returns once the arrays are copied off the devices."""
        items = dict(
            model=ocp.args.StandardSave(nnx.state(model)), optimizer=ocp.args.StandardSave(nnx.state(optimizer))
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # ---- restore -------------------------------------------------------------------------------------------
    def restore_latest(
        self, *, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
        new_data_iter: Callable[[], Iterator] | None = None,
    ) -> tuple[int | None, Iterator | None]:  # fmt: skip
        """Restore the newest readable checkpoint into ``model`` (and ``optimizer``, and a fresh data iterator).

        Returns ``(step, data_iter)``; ``(None, None)`` when the directory holds no checkpoint. Arrays are
        restored with the shardings of the arrays already in ``model`` / ``optimizer``.
        """
        with _QuietClosedLoops() as quiet:
            return self._restore_latest(model, optimizer, new_data_iter, quiet)

    def _restore_latest(self, model, optimizer, new_data_iter, quiet):
        steps = sorted(self._mngr.all_steps(), reverse=True)
        failures: list[tuple[int, Exception]] = []
        for step in steps:
            data_iter = new_data_iter() if new_data_iter is not None else None
            items = dict(model=ocp.args.StandardRestore(nnx.state(model)))
            if optimizer is not None:
                items["optimizer"] = ocp.args.StandardRestore(nnx.state(optimizer))
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                failures.append((step, e))
                quiet.failed()
                _close(data_iter)
                continue
            nnx.update(model, restored["model"])
            if optimizer is not None:
                nnx.update(optimizer, restored["optimizer"])
            if failures:
                self._set_aside(failures, step)
            return step, data_iter
        if failures:
            step, err = failures[0]
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored (steps {[s for s, _ in failures]}); the latest "
                f"(step {step}) failed with {type(err).__name__}: {err}. If the config changed, use a new workdir."
            ) from err
        return None, None

    def _set_aside(self, failures: list[tuple[int, Exception]], good_step: int) -> None:
        os.makedirs(self.quarantine, exist_ok=True)
        for step, err in failures:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.quarantine, f"{step}-{int(time.time())}")
            if jax.process_index() == 0 and os.path.exists(src):
                shutil.move(src, dst)
            warnings.warn(
                f"checkpoint step {step} in {self.directory} could not be restored ({type(err).__name__}: "
                f"{str(err)[:300]}); moved it to {dst} and resumed from step {good_step}",
                CheckpointFallbackWarning,
                stacklevel=4,
            )
        self._mngr.reload()


def _close(data_iter: Any) -> None:
    close = getattr(data_iter, "close", None)
    if close is not None:
        close()


def _is_closed_loop_callback(unraisable: Any) -> bool:
    return (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and threading.current_thread() is not threading.main_thread()
    )


class _QuietClosedLoops:
    """While active, ``sys.unraisablehook`` drops the "Event loop is closed" callbacks of abandoned tensorstore reads
    (raised on tensorstore's threads; see the module docstring) and passes every other unraisable exception on.
    After a failed restore (``failed()``), leaving waits until no such callback came for ``settle_s``, so the
    stragglers of the abandoned reads are dropped too."""

    def __init__(self, settle_s: float = 0.5):
        self.settle_s = settle_s
        self._last: float | None = None

    def failed(self) -> None:
        self._last = time.monotonic()

    def _hook(self, unraisable: Any) -> None:
        if _is_closed_loop_callback(unraisable):
            self._last = time.monotonic()
        else:
            self._previous(unraisable)

    def __enter__(self):
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._hook
        return self

    def __exit__(self, *exc):
        while self._last is not None and time.monotonic() - self._last < self.settle_s:
            time.sleep(0.05)
        if sys.unraisablehook == self._hook:
            sys.unraisablehook = self._previous
