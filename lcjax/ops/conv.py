"""Depthwise causal 1-D convolution with an explicit history (the Mamba short conv), as pure functions.

Matches ``torch.nn.Conv1d(C, C, K, groups=C, padding=K-1)`` keeping the first L outputs (state-spaces/mamba
``mamba_ssm/modules/mamba2.py``; Dao-AILab/causal-conv1d ``causal_conv1d_fn``/``causal_conv1d_update``, including
their ``seq_idx`` masking): out[t] = Σ_k w[k] · u[t - (W-1) + k] (+ bias), i.e. tap W-1 sees the current token.

The history holds the last W-1 raw inputs before ``x``; it is zeros at the start of a sequence and is returned
updated, so a prefill followed by token-by-token decoding equals one full call. With ``seq_idx_BL`` taps never cross
a document boundary (a new document starts wherever the id changes) and the returned history keeps only the last
document's tokens. Channels can be any trailing shape (``*E``), so x (H, P) and B/C (G, N) are convolved in their
sharded layouts without concatenation.

Dimension key (lcjax/typing.py): B batch, L length, W conv width, E channels (any trailing shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.ops.ssd import _require, _validated_by, segment_ids
from lcjax.typing import Array, Float, Int


def _check_conv_args(x_BLE, w_WE, bias_E=None, *, history_BWE=None, seq_idx_BL=None) -> None:
    for name, a in (("x_BLE", x_BLE), ("w_WE", w_WE)):
        _require(hasattr(a, "shape") and jnp.issubdtype(a.dtype, jnp.floating),
                 f"{name}: expected a floating array, got {getattr(a, 'dtype', type(a).__name__)}")  # fmt: skip
    _require(x_BLE.ndim >= 3, f"x_BLE: expected rank >= 3 (B, L, *channels), got shape {tuple(x_BLE.shape)}")
    Bsz, L, *E = x_BLE.shape
    _require(L >= 1, f"x_BLE: length L must be >= 1, got shape {tuple(x_BLE.shape)}")
    _require(w_WE.ndim == x_BLE.ndim - 1 and tuple(w_WE.shape[1:]) == tuple(E),
             f"w_WE: expected shape (W, *channels) with channels {tuple(E)}, got {tuple(w_WE.shape)}")  # fmt: skip
    _require(w_WE.shape[0] >= 1, f"w_WE: conv width W must be >= 1, got shape {tuple(w_WE.shape)}")
    W = w_WE.shape[0]
    if bias_E is not None:
        _require(hasattr(bias_E, "shape") and tuple(bias_E.shape) == tuple(E),
                 f"bias_E: expected shape {tuple(E)}, got {tuple(getattr(bias_E, 'shape', ()))}")  # fmt: skip
    if history_BWE is not None:
        want = (Bsz, W - 1, *E)
        _require(hasattr(history_BWE, "shape") and tuple(history_BWE.shape) == want,
                 f"history_BWE: expected shape (B, W-1, *channels) = {want}, got "
                 f"{tuple(getattr(history_BWE, 'shape', ()))}")  # fmt: skip
    if seq_idx_BL is not None:
        _require(hasattr(seq_idx_BL, "dtype") and jnp.issubdtype(seq_idx_BL.dtype, jnp.integer)
                 and tuple(seq_idx_BL.shape) == (Bsz, L),
                 f"seq_idx_BL: expected an integer array of shape (B, L) = {(Bsz, L)}, got "
                 f"{getattr(seq_idx_BL, 'dtype', None)} {tuple(getattr(seq_idx_BL, 'shape', ()))}")  # fmt: skip


@_validated_by(_check_conv_args)
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
        seg_BS = jnp.pad(segment_ids(seq_idx_BL), [(0, 0), (W - 1, 0)])
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
