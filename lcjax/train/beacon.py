"""Beacon-only training: ratio sampling per window, loss on raw tokens, base parameters frozen.

The recipe of Activation Beacon (https://arxiv.org/abs/2401.03462; FlagOpen/FlagEmbedding
``research/Long_LLM/activation_beacon/main/train.py`` with ``only_train_beacon=True``): next-token cross-entropy on
the raw tokens of every window of a sample, processed as one differentiable forward (gradients flow through the
earlier windows' beacon K/V), a fresh compression ratio per window drawn from a mix, and only the beacon parameters
(``BeaconParam``: beacon embedding and beacon q/k/v(/o) projections) updated.

Freezing is enforced twice: ``beacon_loss`` stops gradients at every non-beacon variable (so ``jax.grad`` of it
w.r.t. the whole model is exactly zero there), and ``train_beacons`` / ``make_train_step`` give the optimizer the
``BeaconParam`` state only (``nnx.split(model, BeaconParam, ...)``), so no optimizer rule (weight decay included)
can touch a base weight. A trainer that uses ``nnx.Optimizer`` should pass ``wrt=BeaconParam``.

Unlike upstream there is no separate "training mode": the loss is computed on exactly the computation used at
inference (beacons also in the last window, no masking of the first window's labels), and ratios come from an
explicit PRNG key instead of a global ``np.random`` state.
Dimension key (lcjax/typing.py): B batch, L length, N windows.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax.layers.beacon import _ADAPT, BeaconConfig, BeaconParam
from lcjax.models.beacon import BeaconLM
from lcjax.ops.losses import token_cross_entropy
from lcjax.typing import Array, Int

__all__ = ["beacon_loss", "lengths_from_batch", "make_train_step", "sample_ratios", "train_beacons"]


def sample_ratios(
    cfg: BeaconConfig, key: jax.Array, lengths_B: Int[Array, " B"], n_windows: int, *, max_positions: int | None = None
) -> Int[Array, "B N"]:
    """A ratio for every example and window [B, n_windows], drawn from ``cfg.train_ratios`` by ``cfg.ratio_mix``.

    ``step_random``: independent per window (repeated entries act as weights); ``instance_random``: one per example;
    ``sequence``: window w gets ``train_ratios[w % len]``; ``adapt-N``: per example the smallest ratio with
    ``(max_positions - W) * r + W >= length + N`` (the largest if none), which needs ``max_positions``.
    """
    choices = jnp.asarray(cfg.train_ratios, jnp.int32)
    B = lengths_B.shape[0]
    mix = cfg.ratio_mix
    if mix == "step_random":
        return jax.random.choice(key, choices, shape=(B, n_windows))
    if mix == "instance_random":
        return jnp.broadcast_to(jax.random.choice(key, choices, shape=(B, 1)), (B, n_windows))
    if mix == "sequence":
        return jnp.broadcast_to(choices[jnp.arange(n_windows) % choices.shape[0]][None], (B, n_windows))
    m = _ADAPT.match(mix)
    if m is None:  # BeaconConfig validates the mix; this guards direct misuse
        raise ValueError(f"sample_ratios: unknown BeaconConfig.ratio_mix={mix!r}")
    if max_positions is None:
        raise ValueError(f"sample_ratios: ratio_mix={mix!r} needs max_positions (the base model's LMConfig.max_seq_len)")
    candidates = jnp.asarray(sorted(r for r in cfg.train_ratios if r > 0) or [max(cfg.train_ratios)], jnp.int32)
    W = cfg.window
    fits_BC = (max_positions - W) * candidates[None, :] + W >= lengths_B[:, None] + int(m.group(1))
    first_B = jnp.where(fits_BC.any(axis=1), jnp.argmax(fits_BC, axis=1), candidates.shape[0] - 1)
    return jnp.broadcast_to(candidates[first_B][:, None], (B, n_windows))


def lengths_from_batch(batch: Mapping[str, Any]) -> Int[Array, " B"]:
    """Real tokens per row of an ``lcjax.data`` batch: positions with ``segment_ids > 0`` (padding is at the end)."""
    return jnp.sum(jnp.asarray(batch["segment_ids"]) > 0, axis=1, dtype=jnp.int32)


def _frozen_base(model: BeaconLM) -> BeaconLM:
    """The same model with ``stop_gradient`` on every variable that is not a ``BeaconParam``."""
    graphdef, beacon, rest = nnx.split(model, BeaconParam, ...)
    return nnx.merge(graphdef, beacon, jax.tree.map(jax.lax.stop_gradient, rest))


def beacon_loss(
    model: BeaconLM, batch: Mapping[str, Any], ratios_BN: Int[Array, "B N"] | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(mean cross-entropy over batch["loss_mask"], metrics)`` of the raw-token logits, base weights frozen.

    ``batch`` has ``inputs``, ``targets``, ``loss_mask`` and optionally ``segment_ids`` (right padding = 0);
    ``ratios_BN``: one ratio per example and window (default ``cfg.ratio``).
    """
    inputs = jnp.asarray(batch["inputs"])
    lengths_B = lengths_from_batch(batch) if "segment_ids" in batch else None
    logits_BLV = _frozen_base(model)(inputs, lengths_B=lengths_B, ratios_BN=ratios_BN)
    weights_BL = jnp.asarray(batch["loss_mask"]).astype(jnp.float32)
    total, count = token_cross_entropy(logits_BLV, jnp.asarray(batch["targets"]), weights_BL)
    loss = total / jnp.maximum(count, 1.0)
    correct = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == jnp.asarray(batch["targets"])) * weights_BL)
    return loss, {"loss": loss, "tokens": count, "accuracy": correct / jnp.maximum(count, 1.0)}


def make_train_step(model: BeaconLM, tx: optax.GradientTransformation) -> tuple[Callable, Any, Any, Any]:
    """``(step, beacon_state, opt_state, (graphdef, rest))`` for a functional loop over the beacon parameters only.

    ``step(beacon_state, opt_state, rest, batch, key) -> (beacon_state, opt_state, metrics)`` is jitted, donates the
    beacon and optimizer state (not ``rest``, the base weights, which is never an output) and samples each window's
    ratio from ``key``. Rebuild the model with ``nnx.merge(graphdef, beacon_state, rest)`` (see ``train_beacons``).
    """
    graphdef, beacon, rest = nnx.split(model, BeaconParam, ...)
    cfg = model.cfg
    max_positions = model.base.cfg.max_seq_len
    opt_state = tx.init(beacon)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(beacon, opt_state, rest, batch, key):
        inputs = jnp.asarray(batch["inputs"])
        B, L = inputs.shape
        lengths_B = lengths_from_batch(batch) if "segment_ids" in batch else jnp.full((B,), L, jnp.int32)
        ratios_BN = sample_ratios(cfg, key, lengths_B, -(-L // cfg.window), max_positions=max_positions)

        def loss_fn(beacon):
            return beacon_loss(nnx.merge(graphdef, beacon, rest), batch, ratios_BN)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(beacon)
        updates, opt_state = tx.update(grads, opt_state, beacon)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(beacon, updates), opt_state, metrics

    return step, beacon, opt_state, (graphdef, rest)


def train_beacons(
    model: BeaconLM, batches: Iterable[Mapping[str, np.ndarray]], *, steps: int, tx: optax.GradientTransformation,
    seed: int = 0, log_every: int = 0, log: Callable[[str], None] = print,
) -> tuple[BeaconLM, list[dict[str, float]]]:
    """Train the beacon parameters of ``model`` for ``steps`` batches; returns the trained model and per-step metrics.

    A small self-contained loop (the shared trainer can do the same with ``beacon_loss`` and
    ``nnx.Optimizer(model, tx, wrt=BeaconParam)``). Stops with an error on a non-finite loss.
    """
    if steps < 1:
        raise ValueError(f"train_beacons: steps={steps} must be >= 1")
    step, beacon, opt_state, (graphdef, rest) = make_train_step(model, tx)
    key = jax.random.key(seed)
    history: list[dict[str, float]] = []
    it = iter(batches)
    t0 = time.perf_counter()
    for i in range(steps):
        batch = {k: np.asarray(v) for k, v in next(it).items()}
        beacon, opt_state, metrics = step(beacon, opt_state, rest, batch, jax.random.fold_in(key, i))
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"train_beacons: non-finite loss {metrics['loss']} at step {i}")
        metrics["step"], metrics["time_s"] = i, time.perf_counter() - t0
        history.append(metrics)
        if log_every and (i % log_every == 0 or i == steps - 1):
            log(f"step {i:5d}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}  {metrics['time_s']:.1f}s")
    return nnx.merge(graphdef, beacon, rest), history
