"""The one training loop of lcjax (STYLE §2.6), read top to bottom in banner sections like big_vision's
``big_vision/train.py``: mesh, input, model and optimizer, checkpoint restore, update step, evaluation, loop.

``train(cfg, workdir)`` takes an ``ExperimentConfig`` (the ``get_config()`` of ``configs/*.py``, checked when built)
and trains an ``lcjax.models.lm.LM`` whose block types come from ``config.model`` alone. The
same loop trains other modules with other objectives (``train(..., model=, objective=)``): Activation Beacon's
beacon-only training is ``lcjax.train.beacon.BeaconLoss`` run by this loop, not a loop of its own.

- Parameters and optimizer state are born sharded (``state.create_train_state``); batches are placed explicitly with
  ``jax.make_array_from_process_local_data``, so the loop runs under ``jax.transfer_guard("disallow")``: any
  implicit host <-> device transfer is a bug and raises. Metrics come back only through ``jax.device_get``.
- The update step is one ``sharding.jit`` (the sharding rules key its cache) with
  ``donate_argnames=("model", "optimizer")``. The loss is the objective's sum over the positions whose
  ``loss_mask`` is set (``NextTokenLoss``: token cross-entropy, optional z-loss), divided by their number in the
  whole global batch (also under gradient accumulation, so accumulating changes nothing but memory).
- Step ``s`` is the ``s``-th completed update; its RNG is ``fold_in(key(seed), s - 1)`` (``optimizer.step`` before
  the update). The LM's blocks are deterministic today; the beacon objective draws its compression ratios from it.
- The first training batch's token ids are checked against ``config.model.vocab_size`` on the host before the step
  compiles (inside the compiled step an out-of-range id would be clamped by the embedding gather).
- Non-finite loss, gradient norm or parameter norm stops the run with ``NonFiniteError`` naming the step. Metrics
  are fetched every ``log_every`` steps and always before a checkpoint, so a bad state is never saved.
- SIGTERM (and a first Ctrl-C) finishes the current step, writes a checkpoint and returns (``preempted=True``);
  rerunning the same command resumes from it, bitwise identically to an uninterrupted run. ``config.json`` is
  written once the run is restored (or starts fresh), so a rerun with a config that cannot restore changes nothing.

Run-directory services (``lcjax eval`` / ``lcjax generate``) live in ``workdir.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax import checks, sharding
from lcjax import data as data_lib
from lcjax.ops import context_parallel
from lcjax.ops.losses import token_cross_entropy
from lcjax.train import checkpoint as ckpt_lib
from lcjax.train import metrics as metrics_lib
from lcjax.train import state as state_lib
from lcjax.train.config import ExperimentConfig, SyntheticDataConfig, config_to_json

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteError(FloatingPointError):
    """The loss, gradient norm or parameter norm of a step was NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # completed updates
    eval: dict[str, float]  # the final held-out evaluation (empty when preempted)
    workdir: str
    preempted: bool = False
    model: Any = dataclasses.field(default=None, repr=False, compare=False)  # the trained model, in memory


# ---------------------------------------------------------------------------------------------------------------
# Input pipelines
# ---------------------------------------------------------------------------------------------------------------
def make_datasets(cfg: ExperimentConfig):
    """``(train, eval)`` grain datasets of process-local ``[B_local, L]`` NumPy batches (``lcjax.data``)."""
    d = cfg.data
    if isinstance(d, SyntheticDataConfig):
        return data_lib.synthetic_datasets(
            d.task, global_batch_size=cfg.batch_size, eval_batch_size=cfg.global_eval_batch_size,
            num_train=d.num_train, num_validation=d.num_validation, seed=d.seed, data_dir=d.data_dir,
            worker_count=d.worker_count,
        )  # fmt: skip
    try:
        train_docs = data_lib.TextFileSource(d.train_files, separator=d.separator)
        eval_docs = data_lib.TextFileSource(d.eval_files, separator=d.separator)
    except ValueError as e:
        raise ValueError(f"config.data: {e}") from None
    train = data_lib.packed_text_dataset(
        train_docs, seq_len=d.seq_len, global_batch_size=cfg.batch_size, seed=d.seed, worker_count=d.worker_count
    )
    eval_ = data_lib.packed_text_eval_dataset(
        eval_docs, seq_len=d.seq_len, global_batch_size=cfg.global_eval_batch_size
    )
    return train, eval_


def _batch_sharding(mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, rules.to_pspec("act_batch", "act_seq"))


def put_batch(batch: dict[str, np.ndarray], batch_sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Process-local NumPy batch -> global sharded arrays (the one host-to-device transfer of the loop)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def batch_placer(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules):
    """``place(numpy batch) -> device batch``: the context-parallel token layout (``config.context_layout``,
    e.g. zigzag for causal load balance) is applied on the host, once per batch, then the batch is transferred.
    Losses and accuracies are sums over tokens, so they do not depend on the layout."""
    batch_sharding = _batch_sharding(mesh, rules)
    n = int(np.prod([mesh.shape[a] for a in rules.mesh_axes("act_seq")]))  # sequence shards

    def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if n > 1 and cfg.context_layout != "contiguous":
            batch = context_parallel.apply_layout(batch, n=n, layout=cfg.context_layout)
        return put_batch(batch, batch_sharding)

    return place


# ---------------------------------------------------------------------------------------------------------------
# Objective, update step
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The LM objective: token cross-entropy (plus ``z_loss`` x logsumexp^2) over the ``loss_mask`` positions.

    An objective is a frozen (hashable: a static jit argument) dataclass with ``wrt``, the ``nnx`` filter of the
    variables the optimizer updates; ``logits(model, batch, rng)``, the logits scored by the loss and the held-out
    evaluation (``rng`` is None at evaluation); and ``__call__(model, batch, rng) -> (loss sum, scored tokens)``.
    Other objectives subclass it (``lcjax.train.beacon.BeaconLoss`` trains the beacon parameters only).
    ``rng`` is the step's key; no block of the LM is stochastic yet, so this objective does not use it.
    """

    z_loss: float = 0.0
    wrt: ClassVar[Any] = nnx.Param

    def logits(self, model, batch, rng):
        del rng
        return model(batch["inputs"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"])

    def __call__(self, model, batch, rng):
        logits_BLV = self.logits(model, batch, rng)
        weights_BL = batch["loss_mask"].astype(jnp.float32)
        return token_cross_entropy(logits_BLV, batch["targets"], weights_BL, z_loss=self.z_loss)


@sharding.jit(static_argnames=("objective", "schedule", "grad_accum_steps"), donate_argnames=("model", "optimizer"))
def train_step(model, optimizer, batch, key, *, objective, schedule, grad_accum_steps: int):
    """One update: ``(model, optimizer, metrics)``, with the model and optimizer donated.

    Gradients are taken w.r.t. the ``objective.wrt`` variables only (the rest of the model is a constant of the
    step). ``sharding.jit`` keys the compilation by the active ``ShardingRules`` as well.
    """
    count = optimizer.step[...]  # updates done so far
    rng = jax.random.fold_in(key, count)
    graphdef, trained, rest = nnx.split(model, objective.wrt, ...)

    def objective_of(trained, batch, rng):
        return objective(nnx.merge(graphdef, trained, rest), batch, rng)

    grad_fn = jax.value_and_grad(objective_of, has_aux=True)
    if grad_accum_steps == 1:
        (loss_sum, tokens), grads = grad_fn(trained, batch, rng)
    else:
        # [B, ...] -> [A, B/A, ...] with micro-batch i = rows i, i+A, ...: the batch axis keeps its sharding on the
        # B/A rows, so every micro-batch is spread over all data-parallel shards.
        def split(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1)

        def body(acc, mb_rng):
            mb, r = mb_rng
            (s, n), g = grad_fn(trained, mb, r)
            return jax.tree.map(jnp.add, acc, ((s, n), g)), None

        micro = jax.tree.map(split, batch)
        rngs = jax.random.split(rng, grad_accum_steps)
        (first, first_grads) = grad_fn(trained, jax.tree.map(lambda x: x[0], micro), rngs[0])
        ((loss_sum, tokens), grads), _ = jax.lax.scan(
            body, (first, first_grads), (jax.tree.map(lambda x: x[1:], micro), rngs[1:])
        )
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    metrics = dict(
        loss=loss_sum / denom, grad_norm=optax.tree.norm(grads), learning_rate=schedule(count), tokens=tokens,
    )  # fmt: skip
    optimizer.update(model, grads)
    metrics["param_norm"] = optax.tree.norm(nnx.state(model, nnx.Param))
    return model, optimizer, metrics


def check_first_batch(batch: dict[str, np.ndarray], vocab_size: int) -> None:
    """The trainer's one token-id check: the first host batch's ``inputs`` and scored ``targets`` are in
    ``[0, vocab_size)`` (later batches run unchecked inside the compiled step, where the gather would clamp)."""
    checks.check_token_ids("first training batch['inputs']", batch["inputs"], vocab_size)
    scored = np.asarray(batch["targets"])[np.asarray(batch["loss_mask"], bool)]
    checks.check_token_ids("first training batch['targets'] (where loss_mask)", scored, vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@sharding.jit(static_argnames=("objective", "text"))
def eval_step(model, batch, *, objective, text: bool):
    """Summable eval counts of one batch: NLL sum and scored tokens, plus task accuracy or scored bytes."""
    logits_BLV = objective.logits(model, batch, None)
    nll, tokens = token_cross_entropy(logits_BLV, batch["targets"], batch["loss_mask"].astype(jnp.float32))
    out = dict(nll=nll, tokens=tokens)
    if text:
        out["bytes"] = jnp.sum(batch["loss_mask"] & (batch["targets"] < data_lib.ByteTokenizer.PAD), dtype=jnp.int32)
    else:
        out |= data_lib.accuracy_counts(jnp.argmax(logits_BLV, axis=-1), batch["targets"], batch["loss_mask"])
    return out


def evaluate(model, eval_ds, eval_fn, place, *, text: bool, max_batches: int = 0) -> dict[str, float]:
    """One pass over the held-out split (or its first ``max_batches``): loss, and accuracy or bits per byte, plus
    the integer counts they come from."""
    totals = None
    for i, batch in enumerate(eval_ds):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(model, place(batch))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        raise ValueError("the held-out split produced no batch")
    totals = jax.device_get(totals)
    tokens = float(totals["tokens"])
    if tokens == 0:
        raise ValueError("the held-out split has no scored position (loss_mask is all False)")
    result = dict(loss=float(totals["nll"]) / tokens)
    if text:
        result["bits_per_byte"] = float(totals["nll"]) / (math.log(2.0) * max(int(totals["bytes"]), 1))
    else:
        result |= data_lib.accuracy_from_counts(totals)
    # The counts behind the numbers (scored tokens, bytes or answers), for aggregation and checks.
    result |= {k: int(v) for k, v in totals.items() if k != "nll"}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------
class _StopSignals:
    """While active, SIGTERM / a first SIGINT only set ``received``; the loop then checkpoints and returns."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def train(
    cfg: ExperimentConfig, workdir: str | os.PathLike, *, model: nnx.Module | None = None,
    objective: NextTokenLoss | None = None,
) -> TrainResult:  # fmt: skip
    """Train (or resume) the experiment ``cfg`` in ``workdir``; see the module docstring.

    ``model`` and ``objective`` (both optional) train another module than ``LM(config.model)`` with the same loop,
    e.g. a ``BeaconLM`` with ``lcjax.train.beacon.BeaconLoss()``: ``model`` must already live on the config's mesh
    (created under ``sharding.use``) and is donated; the optimizer updates its ``objective.wrt`` variables only.
    ``config.model`` then only describes it (the vocabulary the first batch is checked against; ``lcjax eval`` and
    ``lcjax generate`` rebuild ``LM(config.model)``, so they serve plain LM runs).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    jax.config.update("jax_threefry_partitionable", True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)

    # ---- Mesh and sharding rules ---------------------------------------------------------------------------
    mesh = state_lib.build_mesh(cfg.mesh)
    rules = cfg.rules
    cfg.check_data_parallel(state_lib.data_parallel_size(mesh, rules))
    place = batch_placer(cfg, mesh, rules)

    # ---- Input -----------------------------------------------------------------------------------------------
    train_ds, eval_ds = make_datasets(cfg)
    text = cfg.data.kind == "text"
    tokens_per_step = cfg.batch_size * cfg.data.seq_len

    # ---- Model and optimizer, born sharded -----------------------------------------------------------------
    objective = NextTokenLoss(z_loss=cfg.z_loss) if objective is None else objective
    schedule, tx = state_lib.optimizer_for(cfg)
    if model is None:
        model, optimizer = state_lib.create_train_state(cfg, tx, mesh, rules)
    else:
        optimizer = state_lib.create_optimizer(model, tx, objective.wrt, mesh, rules)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, objective.wrt)))
    with sharding.use(mesh, rules):
        key = jax.device_put(jax.random.key(cfg.seed), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    # ---- Checkpoint: resume from the latest readable one ---------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=cfg.keep_checkpoints)
    try:
        start, train_iter = ckpt.restore_latest(model=model, optimizer=optimizer, new_data_iter=lambda: iter(train_ds))
    except BaseException:
        ckpt.close()
        raise
    if start is None:
        start, train_iter = 0, iter(train_ds)
    last_saved = start if start else None
    # Written only now: a rerun whose config cannot restore the run must leave the run's config.json alone.
    if jax.process_index() == 0:
        _write_atomically(os.path.join(workdir, CONFIG_FILE), config_to_json(cfg))

    # ---- Update and eval steps (module-level jits: equal configs reuse their compilations) ------------------
    step_fn = functools.partial(
        train_step, objective=objective, schedule=schedule, grad_accum_steps=cfg.optim.grad_accum_steps
    )
    eval_fn = functools.partial(eval_step, objective=objective, text=text)

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
    bar = metrics_lib.ProgressBar(total=cfg.num_steps, initial=start, enabled=cfg.progress_bar)
    trained = "" if n_trained == n_params else f" ({n_trained:,} trained: {type(objective).__name__})"
    bar.write(
        f"lcjax train: {n_params:,} parameters{trained}, block_pattern={cfg.model.block_pattern}, "
        f"data={_data_name(cfg)}, mesh={dict(mesh.shape)} rules={cfg.sharding}, "
        + (f"resuming from step {start}" if start else "starting from scratch") + f"; workdir {workdir}"
    )
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    final_eval: dict[str, float] = {}
    preempted = False
    t_last, step_last = time.perf_counter(), start

    def drain(step: int) -> None:
        """Fetch and log the metrics of the steps run since the last drain; stop at the first non-finite one."""
        nonlocal t_last, step_last
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        rate = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        done = [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(pending, fetched)]
        pending.clear()
        for s, m in done:
            bad = {k: m[k] for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])}
            if s % cfg.log_every == 0 or s == step or bad:
                writer.write(s, "train", m | dict(tokens_per_s=rate))
            if bad:
                where = f"step {last_saved} in {ckpt.directory}" if last_saved else "none written yet"
                raise NonFiniteError(
                    f"non-finite training metrics at step {s}: {', '.join(f'{k}={v}' for k, v in bad.items())} "
                    f"(loss={m['loss']}, learning_rate={m['learning_rate']}). Stopped without saving this state; "
                    f"last good checkpoint: {where}."
                )
        bar.set_postfix(loss=f"{done[-1][1]['loss']:.4f}", tok_s=f"{rate:,.0f}")

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(model, eval_ds, eval_fn, place, text=text, max_batches=cfg.eval_batches)
        writer.write(step, "eval", result)
        bar.write(f"eval step {step}: {_fmt(result)}")
        return result

    # ---- Loop ----------------------------------------------------------------------------------------------
    try:
        with sharding.use(mesh, rules), jax.transfer_guard("disallow"), _StopSignals() as stop:
            if start >= cfg.num_steps:  # already complete: evaluate the restored model (replacing its eval record)
                final_eval = run_eval(start)
            t_last = time.perf_counter()
            for step in range(start + 1, cfg.num_steps + 1):
                host_batch = next(train_iter)
                if step == start + 1:  # before the step compiles
                    check_first_batch(host_batch, cfg.model.vocab_size)
                model, optimizer, m = step_fn(model, optimizer, place(host_batch), key)
                pending.append((step, m))
                bar.update()
                is_last = step == cfg.num_steps
                stopping = stop.received is not None  # read once: a signal arriving later is seen next step
                do_eval = is_last or (not stopping and cfg.eval_every and step % cfg.eval_every == 0)
                do_save = is_last or stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                if step % cfg.log_every == 0 or do_eval or do_save:
                    drain(step)
                if do_eval:
                    final_eval = run_eval(step)
                if do_save:
                    ckpt.save(step, model=model, optimizer=optimizer, data_iter=train_iter)
                    last_saved = step
                if do_eval or do_save:
                    t_last = time.perf_counter()  # tokens/s counts training only
                if stopping and not is_last:
                    preempted = True
                    final_eval = {}
                    bar.write(
                        f"received {signal.Signals(stop.received).name}: checkpoint written at step {step}; "
                        "rerun the same command to resume"
                    )
                    break
        ckpt.wait()
        latest = ckpt.latest_step()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        _close(train_iter)

    step = last_saved if preempted else max(start, cfg.num_steps)
    if not preempted:
        plot = metrics_lib.plot_metrics(workdir)
        if jax.process_index() == 0:
            print(f"final held-out eval at step {step}: {_fmt(final_eval)}", flush=True)
            print(
                f"wrote: checkpoint {os.path.join(ckpt.directory, str(latest))}, metrics {writer.path} "
                f"(+ {metrics_lib.TENSORBOARD_DIR}/), plot {plot}",
                flush=True,
            )
    return TrainResult(step=step, eval=final_eval, workdir=workdir, preempted=preempted, model=model)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _close(data_iter: Any) -> None:
    """Stop the iterator's grain worker processes now (``data.worker_count > 0``) rather than at garbage collection."""
    close = getattr(data_iter, "close", None)
    if close is not None:
        close()


def _fmt(values: dict[str, Any]) -> str:
    """The float metrics of an eval result (the integer counts go to metrics.jsonl only)."""
    return " ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float))


def _data_name(cfg: ExperimentConfig) -> str:
    d = cfg.data
    return d.task.name if isinstance(d, SyntheticDataConfig) else f"text(seq_len={d.seq_len})"
