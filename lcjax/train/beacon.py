"""Beacon-only training as an objective of the one loop: ratio sampling per window, loss on raw tokens, base frozen.

The recipe of Activation Beacon (https://arxiv.org/abs/2401.03462; FlagOpen/FlagEmbedding
``research/Long_LLM/activation_beacon/main/train.py`` with ``only_train_beacon=True``): next-token cross-entropy on
the raw tokens of every window of a sample, processed as one differentiable forward (gradients flow through the
earlier windows' beacon K/V), a fresh compression ratio per window drawn from a mix, and only the beacon parameters
(``BeaconParam``: beacon embedding and beacon q/k/v(/o) projections) updated.

``BeaconLoss`` is that objective for ``lcjax.train.loop.train`` (``train(config, workdir, model=beacon_lm,
objective=BeaconLoss())``): the loop's one update step differentiates w.r.t. ``BeaconLoss.wrt = BeaconParam`` only
and its optimizer holds state for those only, so no optimizer rule (weight decay included) can touch a base weight.
Freezing is also enforced in the loss: ``beacon_loss`` stops gradients at every non-beacon variable, so ``jax.grad``
of it w.r.t. the whole model is exactly zero there.

Unlike upstream there is no separate "training mode": the loss is computed on exactly the computation used at
inference (beacons also in the last window, no masking of the first window's labels), and ratios come from the
step's PRNG key instead of a global ``np.random`` state. The CPU passkey study that uses it is
``experiments/beacon/passkey.py``.
Dimension key (lcjax/typing.py): B batch, L length, N windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.layers.beacon import _ADAPT, BeaconConfig, BeaconParam
from lcjax.models.beacon import BeaconLM
from lcjax.ops.losses import token_cross_entropy
from lcjax.train.loop import NextTokenLoss
from lcjax.typing import Array, Int

__all__ = ["BeaconLoss", "beacon_loss", "lengths_from_batch", "sample_ratios"]


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
        raise ValueError(
            f"sample_ratios: ratio_mix={mix!r} needs max_positions (the base model's LMConfig.max_seq_len)"
        )
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


@dataclasses.dataclass(frozen=True)
class BeaconLoss(NextTokenLoss):
    """The loop objective of beacon-only training (``lcjax.train.loop.NextTokenLoss`` on a ``BeaconLM``).

    Training draws one compression ratio per example and window from the step's key (``sample_ratios``; the adapt-N
    mix uses the base model's ``max_seq_len``); evaluation (``rng=None``) uses ``BeaconConfig.ratio``. Rows are
    right-padded documents: their lengths come from ``segment_ids``. Base weights are frozen (``wrt``).
    """

    wrt: ClassVar[Any] = BeaconParam

    def logits(self, model: BeaconLM, batch, rng):
        inputs = batch["inputs"]
        lengths_B = lengths_from_batch(batch)
        ratios_BN = None
        if rng is not None:
            n_windows = -(-inputs.shape[1] // model.cfg.window)
            ratios_BN = sample_ratios(model.cfg, rng, lengths_B, n_windows, max_positions=model.base.cfg.max_seq_len)
        return _frozen_base(model)(inputs, lengths_B=lengths_B, ratios_BN=ratios_BN)
