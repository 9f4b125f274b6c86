"""Depthwise causal 1-D convolution with an explicit history (the Mamba short conv), as pure functions.

Matches ``torch.nn.Conv1d(C, C, K, groups=C, padding=K-1)`` keeping the first L outputs (state-spaces/mamba
``mamba_ssm/modules/mamba2.py``; Dao-AILab/causal-conv1d ``causal_conv1d_fn``/``causal_conv1d_update``, including
their ``seq_idx`` masking): out[t] = Σ_k w[k] · u[t - (W-1) + k] (+ bias), i.e. tap W-1 sees the current token.

The history holds the last W-1 raw inputs before ``x``; it is zeros at the start of a sequence and is returned
updated, so a prefill followed by token-by-token decoding equals one full call. With ``seq_idx_BL`` (lcjax segment
ids, read as Mamba-2 reads them: a new document starts wherever the id changes, so a padding run of 0s is a document
of its own) taps never cross a document boundary and the returned history keeps only the last document's tokens.
Channels can be any trailing shape (``*E``), so x (H, P) and B/C (G, N) are convolved in their sharded layouts
without concatenation.

Dimension key (lcjax/typing.py): B batch, L length, W conv width, E channels (any trailing shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.checks import require, validated_by
from lcjax.ops._common import require_float_array, require_ids, require_shape, run_index
from lcjax.typing import Array, Float, Int


def _check_conv_args(x_BLE, w_WE, bias_E=None, *, history_BWE=None, seq_idx_BL=None) -> None:
    require_float_array("x_BLE", x_BLE, min_rank=3)
    require_float_array("w_WE", w_WE)
    Bsz, L, *E = x_BLE.shape
    require(L >= 1, f"x_BLE: length L must be >= 1, got shape {tuple(x_BLE.shape)}")
    require(w_WE.ndim == x_BLE.ndim - 1 and tuple(w_WE.shape[1:]) == tuple(E) and w_WE.shape[0] >= 1,
            f"w_WE: expected shape (W, *channels) with W >= 1 and channels {tuple(E)}, got {tuple(w_WE.shape)}")
    if bias_E is not None:
        require_shape("bias_E", bias_E, tuple(E), "(*channels)")
    if history_BWE is not None:
        require_shape("history_BWE", history_BWE, (Bsz, w_WE.shape[0] - 1, *E), "(B, W-1, *channels)")
    require_ids("seq_idx_BL", seq_idx_BL, (Bsz, L))


@validated_by(_check_conv_args)
def causal_conv1d(
    x_BLE: Float[Array, "B L *E"],
    w_WE: Float[Array, "W *E"],
    bias_E: Float[Array, "*E"] | None = None,
    *,
    history_BWE: Float[Array, "B W-1 *E"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
) -> tuple[Float[Array, "B L *E"], Float[Array, "B W-1 *E"]]:
    """Depthwise causal conv: (y_BLE, new history = the last W-1 raw inputs). Computed in x's dtype.

    W shifted multiply-adds, no conv primitive: the kernel is tiny (W = 4), so this is bandwidth-bound either way
    and shards over any channel axis. The backward is written out (``_taps``): one materialised cotangent feeds W
    shifted adds (input gradient) and W plain reductions (weight gradient); XLA's autodiff of the shifted slices
    would otherwise re-evaluate the upstream elementwise chain inside each of the W reductions.
    """
    Bsz, L, *E = x_BLE.shape
    W = w_WE.shape[0]
    dtype = x_BLE.dtype
    history_BWE = jnp.zeros((Bsz, W - 1, *E), dtype) if history_BWE is None else history_BWE.astype(dtype)
    u_BSE = jnp.concatenate([history_BWE, x_BLE], axis=1)  # S = W-1+L: history then x
    expand = (slice(None), slice(None)) + (None,) * len(E)  # (B, L) -> (B, L, 1, ...)
    keep_WBL = None
    if seq_idx_BL is not None:  # history positions continue the first document (segment 0)
        seg_BS = jnp.pad(run_index(seq_idx_BL), [(0, 0), (W - 1, 0)])
        keep_WBL = jnp.stack([seg_BS[:, k : k + L] == seg_BS[:, W - 1 :] for k in range(W)])
    bias_E = jnp.zeros(tuple(E), dtype) if bias_E is None else bias_E.astype(dtype)
    y_BLE = _taps(u_BSE, w_WE.astype(dtype), bias_E, keep_WBL)
    new_history_BWE = u_BSE[:, L:]
    if seq_idx_BL is not None:  # drop tokens of earlier documents: the next call continues the last one
        new_history_BWE = jnp.where((seg_BS[:, L:] == seg_BS[:, -1:])[expand], new_history_BWE, 0.0)
    return y_BLE, new_history_BWE


def _expand(mask_BL, ndim: int):
    return mask_BL.reshape(mask_BL.shape + (1,) * (ndim - 2))


def _taps_forward(u_BSE, w_WE, bias_E, keep_WBL):
    """y_t = Σ_k keep_k[t] · u_{t+k} · w_k + bias (tap k looks back W-1-k tokens; keep_{W-1} is all true)."""
    W, L = w_WE.shape[0], u_BSE.shape[1] - w_WE.shape[0] + 1
    y_BLE = None
    for k in range(W):
        tap_BLE = u_BSE[:, k : k + L] * w_WE[k][None, None]
        if keep_WBL is not None:
            tap_BLE = jnp.where(_expand(keep_WBL[k], tap_BLE.ndim), tap_BLE, 0.0)
        y_BLE = tap_BLE if y_BLE is None else y_BLE + tap_BLE
    return y_BLE + bias_E[None, None]


@jax.custom_vjp
def _taps(u_BSE, w_WE, bias_E, keep_WBL):
    return _taps_forward(u_BSE, w_WE, bias_E, keep_WBL)


def _taps_fwd(u_BSE, w_WE, bias_E, keep_WBL):
    return _taps_forward(u_BSE, w_WE, bias_E, keep_WBL), (u_BSE, w_WE, keep_WBL)


def _taps_bwd(residuals, g_BLE):
    u_BSE, w_WE, keep_WBL = residuals
    W, L = w_WE.shape[0], g_BLE.shape[1]
    g_BLE = lax.optimization_barrier(g_BLE)  # materialise once; every term below reads it
    du_BSE, dw = None, []
    for k in range(W):
        g_k = g_BLE if keep_WBL is None else jnp.where(_expand(keep_WBL[k], g_BLE.ndim), g_BLE, 0.0)
        dw.append(jnp.sum(u_BSE[:, k : k + L] * g_k, axis=(0, 1)))
        term = jnp.pad(g_k * w_WE[k][None, None], [(0, 0), (k, W - 1 - k)] + [(0, 0)] * (g_BLE.ndim - 2))
        du_BSE = term if du_BSE is None else du_BSE + term
    return du_BSE, jnp.stack(dw).astype(w_WE.dtype), jnp.sum(g_BLE, axis=(0, 1)), None


_taps.defvjp(_taps_fwd, _taps_bwd)


__all__ = ["causal_conv1d"]
