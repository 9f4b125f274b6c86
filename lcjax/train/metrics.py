"""Metrics: a JSONL file, TensorBoard event files, a tqdm progress bar, and the end-of-run PNG plot.

Every record is one JSON line in ``<workdir>/metrics.jsonl``: ``{"step": int, "split": "train" | "eval", ...}``,
mirrored as TensorBoard scalars ``<split>/<name>`` under ``<workdir>/tensorboard``. On resume from step ``s`` the
records after ``s`` (written by the interrupted run past its last checkpoint) are dropped, so the file and the plot
describe one consistent history; a step has at most one eval record (a rerun of a finished run replaces it). Only
process 0 writes.

Crash safety: records are appended one line at a time, so a power loss can tear only the last line; readers skip a
torn last line with a ``TornMetricsWarning`` naming the file (any other unreadable line is a ``ValueError`` naming
the file and line). Whole-file rewrites (on resume) go through a temporary file and ``os.replace``, so the file is
always either the old or the new history.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TENSORBOARD_DIR = "tensorboard"


class TornMetricsWarning(UserWarning):
    """The last line of metrics.jsonl was cut short (the writer died mid-line); it was skipped."""


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` (empty when there is none); a torn last line is skipped with a
    ``TornMetricsWarning``."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the last write was cut short
                warnings.warn(f"{path}: skipped its torn last line {line[:80]!r} ({e})", TornMetricsWarning)
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e}): {line[:80]!r}") from None
    return records


def _write_atomically(path: str, records: list[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard (process 0 only). A second eval record for a step
    replaces the first (so rerunning a finished run keeps one final eval)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        self._records = [r for r in read_metrics(self.workdir) if r["step"] <= resume_step]
        self._eval_steps = {r["step"] for r in self._records if r["split"] == "eval"}
        _write_atomically(self.path, self._records)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time()}
        record |= {k: _to_python(v) for k, v in values.items()}
        if split == "eval" and step in self._eval_steps:  # replace, not append: one eval record per step
            self._records = [r for r in self._records if not (r["step"] == step and r["split"] == "eval")]
            _write_atomically(self.path, self._records + [record])
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._records.append(record)
        if split == "eval":
            self._eval_steps.add(int(step))
        for k, v in record.items():
            if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_python(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan" / "inf": JSON has no literal for them
    return v


class ProgressBar:
    """tqdm over the steps of the run: loss and tokens/s in the postfix, ETA from tqdm's rate."""

    def __init__(self, *, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            import sys

            from tqdm.auto import tqdm

            # In a terminal, redraw a few times a second; in a log file, write a line every 10 s at most.
            interval = 0.5 if sys.stderr.isatty() else 10.0
            self._bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=interval
            )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plot_metrics(workdir: str | os.PathLike) -> str | None:
    """Train/eval loss and the eval task metric against step, as ``<workdir>/metrics.png``; returns its path."""
    if jax.process_index() != 0:
        return None
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split, key):
        pts = [(r["step"], r[key]) for r in records if r["split"] == split and isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    evals = [r for r in records if r["split"] == "eval"]
    task_keys = [k for k in ("answer_accuracy", "example_accuracy", "bits_per_byte") if any(k in r for r in evals)]
    fig, axes = plt.subplots(1, 2 if task_keys else 1, figsize=(11 if task_keys else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for split, style in (("train", "-"), ("eval", "o-")):
        x, y = series(split, "loss")
        if x:
            ax.plot(x, y, style, label=f"{split} loss", markersize=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", yscale="log", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if task_keys:
        ax = axes[0, 1]
        for key in task_keys:
            ax.plot(*series("eval", key), "o-", label=key, markersize=3)
        ax.set(xlabel="step", title="held-out " + ("accuracy" if "bits_per_byte" not in task_keys else "bits/byte"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    path = os.path.join(workdir, PLOT_FILE)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
