"""Token-level losses, written to stay correct when the vocabulary axis is sharded (tensor parallelism).

The label logit is picked with a one-hot contraction instead of a gather, so a vocab-sharded ``logits`` needs only
reductions (sum, max) across shards. Dimension key (lcjax/typing.py): B batch, L length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax import checks
from lcjax.typing import Array, Float, Int


def token_cross_entropy(
    logits_BLV: Float[Array, "B L V"], targets_BL: Int[Array, "B L"], weights_BL: Float[Array, "B L"] | None = None,
    *, z_loss: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:  # fmt: skip
    """``(sum of weighted per-token losses, sum of weights)``; divide for the mean.

    Loss per token: ``logsumexp(logits) - logits[target] + z_loss * logsumexp(logits)**2`` (the z-loss of PaLM,
    Chowdhery et al. 2022). ``weights`` (default: 1 everywhere) select where labels are valid; tokens with weight 0
    contribute nothing, whatever their target id. Other target ids must lie in ``[0, V)``: concrete targets are checked
    here (``ValueError``), traced ones only under ``lcjax.checks.checkify`` (under a plain jit an out-of-range target
    has an all-zero one-hot, so its loss is ``logsumexp`` alone, silently).
    """
    checks.require(logits_BLV.ndim == 3 and logits_BLV.shape[:2] == targets_BL.shape,
                   f"token_cross_entropy: logits {logits_BLV.shape} must be [B, L, V] with [B, L] = targets "
                   f"{targets_BL.shape}")  # fmt: skip
    checks.require(weights_BL is None or weights_BL.shape == targets_BL.shape,
                   f"token_cross_entropy: weights shape {None if weights_BL is None else weights_BL.shape} != targets "
                   f"shape {targets_BL.shape}")  # fmt: skip
    checks.require_float("token_cross_entropy: z_loss", z_loss, min=0)
    checks.require(jnp.issubdtype(targets_BL.dtype, jnp.integer),
                   f"token_cross_entropy: targets must be integer ids, got {targets_BL.dtype}")  # fmt: skip
    labelled_BL = targets_BL if weights_BL is None else jnp.where(weights_BL != 0, targets_BL, 0)
    checks.check_token_ids("token_cross_entropy: targets (where weight != 0)", labelled_BL, logits_BLV.shape[-1])
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.float32)
    label_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    loss_BL = lse_BL - label_BL + z_loss * jnp.square(lse_BL)
    w_BL = jnp.ones_like(loss_BL) if weights_BL is None else weights_BL.astype(jnp.float32)
    return jnp.sum(loss_BL * w_BL), jnp.sum(w_BL)
