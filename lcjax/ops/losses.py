"""Token-level losses, written to stay correct when the vocabulary axis is sharded (tensor parallelism).

The label logit is picked with a one-hot contraction instead of a gather, so a vocab-sharded ``logits`` needs only
reductions (sum, max) across shards. Dimension key (lcjax/typing.py): B batch, L length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.typing import Array, Float, Int


def token_cross_entropy(
    logits_BLV: Float[Array, "B L V"], targets_BL: Int[Array, "B L"], weights_BL: Float[Array, "B L"] | None = None,
    *, z_loss: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:  # fmt: skip
    """``(sum of weighted per-token losses, sum of weights)``; divide for the mean.

    Loss per token: ``logsumexp(logits) - logits[target] + z_loss * logsumexp(logits)**2`` (the z-loss of PaLM,
    Chowdhery et al. 2022). ``weights`` (default: 1 everywhere) select where labels are valid; tokens with weight 0
    contribute nothing, whatever their target id.
    """
    if logits_BLV.shape[:2] != targets_BL.shape:
        raise ValueError(f"token_cross_entropy: logits {logits_BLV.shape} and targets {targets_BL.shape} disagree")
    if weights_BL is not None and weights_BL.shape != targets_BL.shape:
        raise ValueError(f"token_cross_entropy: weights shape {weights_BL.shape} != targets shape {targets_BL.shape}")
    if z_loss < 0:
        raise ValueError(f"token_cross_entropy: z_loss={z_loss} must be >= 0")
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.float32)
    label_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    loss_BL = lse_BL - label_BL + z_loss * jnp.square(lse_BL)
    w_BL = jnp.ones_like(loss_BL) if weights_BL is None else weights_BL.astype(jnp.float32)
    return jnp.sum(loss_BL * w_BL), jnp.sum(w_BL)
