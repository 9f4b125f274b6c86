"""Sequence-parallel (context-parallel) Mamba-2: SSD state passing across sequence shards and the conv halo.

"Transformers are SSMs", Dao & Gu 2024, https://arxiv.org/abs/2405.21060, §8.2 (sequence parallelism: each device
computes its local outputs and final state, then the states are passed). Cross-checked with recurrentgemma's
``multi_shard_correction`` idea (google-deepmind/recurrentgemma ``recurrentgemma/jax/pallas.py``) and the open
state-spaces/mamba PR #664 (sequential state passing + conv halo); written from the math, not copied.

The SSD map of one shard is affine in the state that enters it (``lcjax.ops.ssd.initial_state_decay``):

    y_t(S_in)  = y_t(0) + d_t · (C_t · S_in)          d_t = exp(Σ_{s<=t, s in shard} Δ_s A)   (0 after a boundary)
    final(S_in) = a · S_in + final(0)                   a = d_{last}

so, with n shards on ``axis_name``: (1) every shard runs ``ssd_chunked`` from a zero state; (2) the per-shard
(final(0), a) pairs, O(B·H·P·N) floats independent of L, are ``all_gather``-ed; (3) every shard folds the
exclusive scan ``S_in_0 = S0``, ``S_in_r = a_{r-1}·g_{r-1}·S_in_{r-1} + final_{r-1}(0)`` (g_r = 0 when shard r
starts a new document, so nothing flows into it) and (4) adds the correction ``d_t · (C_t · g_r·S_in_r)``. The
global final state (the last shard's) is the full fold, identical on every device. Gradients flow through the
gather and the fold by autodiff (the gather's transpose reduce-scatters them); nothing is O(L) per device.
``lcjax.ops.ssd.ssd(..., impl="context_parallel", axis_name=...)`` dispatches here; ``lcjax.layers.mamba2``
switches to it (and to the conv below) by itself when the mesh shards ``act_seq``.

Packed sequences (``seq_idx``): a new document starts wherever the id changes, including between the last token of
shard r-1 and the first of shard r (``g_r``, from the gathered first/last ids). State clipping
(``max_state_norm_H``) is not affine, so it is refused here.

The depthwise causal conv needs the last ``W - 1`` raw inputs of the previous shard: ``conv_halo`` passes them with
one ``ppermute`` (device 0 gets the caller's history), masked to the document the shard starts with, and
``causal_conv1d_context_parallel`` is the global-array version used by a layer.

Dimension key (lcjax/typing.py): B batch, L (local) length, H heads, P head dim, G groups, N state, W conv width,
E channels (any trailing shape), R heads per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcjax import sharding
from lcjax.ops import ssd as ssd_ops
from lcjax.ops.conv import causal_conv1d
from lcjax.ops.ring_attention import AxisName, check_axis_name
from lcjax.typing import Array, Float, Int

__all__ = ["ssd_context_parallel", "conv_halo", "last_shard", "causal_conv1d_context_parallel"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_ssd_cp(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, *, axis_name, chunk_size, D_H=None, initial_state_BHPN=None,
                  seq_idx_BL=None, decay_scale_H=None, max_state_norm_H=None):  # fmt: skip
    check_axis_name(axis_name)
    _require(max_state_norm_H is None, "max_state_norm_H: state clipping is not affine in the entering state, so "
                                       "context-parallel SSD cannot pass states across shards; use None")
    ssd_ops._check_ssd_args(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size=chunk_size, D_H=D_H,
                            initial_state_BHPN=initial_state_BHPN, seq_idx_BL=seq_idx_BL, decay_scale_H=decay_scale_H)


def _ring_size(axis_name) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _ring_index(axis_name):
    return jnp.zeros((), jnp.int32) if axis_name is None else lax.axis_index(axis_name)


def _gather(x, axis_name):
    """``[n, ...]``: x of every shard in device order (``[1, ...]`` on one device)."""
    return x[None] if axis_name is None else lax.all_gather(x, axis_name)


@ssd_ops._validated_by(_check_ssd_cp)
def ssd_context_parallel(
    x_BLHP: Float[Array, "B L H P"],
    dt_BLH: Float[Array, "B L H"],
    A_H: Float[Array, " H"],
    B_BLGN: Float[Array, "B L G N"],
    C_BLGN: Float[Array, "B L G N"],
    *,
    axis_name: AxisName,
    chunk_size: int,
    D_H: Float[Array, " H"] | None = None,
    initial_state_BHPN: Float[Array, "B H P N"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
    decay_scale_H: Float[Array, " H"] | None = None,
    max_state_norm_H: None = None,
) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """SSD of a sequence sharded over ``axis_name`` (call inside ``jax.shard_map``; arguments are local shards).

    Same contract as ``lcjax.ops.ssd.ssd`` on the whole sequence: returns the local outputs (x's dtype) and the
    global final state (float32, identical on every device; pass it out replicated over the sequence axes).
    ``initial_state_BHPN`` is the state before the first token of shard 0 (replicated); ``seq_idx_BL`` the local
    document ids. ``axis_name=None`` is the one-device path.
    """
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[2:]
    R = H // G
    acc = ssd_ops._acc_dtype(x_BLHP.dtype)
    y0_BLHP, S_ext_BHPN = ssd_ops.ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size=chunk_size, D_H=D_H,
                                              seq_idx_BL=seq_idx_BL, decay_scale_H=decay_scale_H)  # fmt: skip
    d_BLH, a_BH = ssd_ops.initial_state_decay(dt_BLH, A_H, seq_idx_BL=seq_idx_BL, decay_scale_H=decay_scale_H)
    r = _ring_index(axis_name)

    if seq_idx_BL is None:
        g_rB = jnp.ones((_ring_size(axis_name), Bsz), acc)
    else:  # g_r = 1 iff shard r's first token continues the document of shard r-1's last token (shard 0: 1)
        ends_rB2 = _gather(jnp.stack([seq_idx_BL[:, 0], seq_idx_BL[:, -1]], axis=-1), axis_name)
        cont_rB = jnp.concatenate([jnp.ones_like(ends_rB2[:1, :, 0], bool),
                                   ends_rB2[1:, :, 0] == ends_rB2[:-1, :, 1]], axis=0)  # fmt: skip
        g_rB = cont_rB.astype(acc)
    S_ext_rBHPN = _gather(S_ext_BHPN.astype(acc), axis_name)
    a_rBH = _gather(a_BH.astype(acc), axis_name)

    S0_BHPN = jnp.zeros((Bsz, H, P, N), acc) if initial_state_BHPN is None else initial_state_BHPN.astype(acc)

    def fold(F_BHPN, inputs):  # F: true state after the previous shard; E: what actually enters this shard
        S_ext, a_BH_, g_B = inputs
        E_BHPN = g_B[:, None, None, None] * F_BHPN
        return a_BH_[:, :, None, None] * E_BHPN + S_ext, E_BHPN

    final_BHPN, E_rBHPN = lax.scan(fold, S0_BHPN, (S_ext_rBHPN, a_rBH, g_rB))
    E_BGRPN = E_rBHPN[r].reshape(Bsz, G, R, P, N)
    corr_BLGRP = jnp.einsum("BLGN,BGRPN->BLGRP", C_BLGN.astype(acc), E_BGRPN)
    y_BLHP = y0_BLHP.astype(acc) + corr_BLGRP.reshape(Bsz, L, H, P) * d_BLH[..., None]
    return y_BLHP.astype(x_BLHP.dtype), final_BHPN


def _check_halo(x_BLE, *, axis_name, width, history_BWE=None, seq_idx_BL=None):
    check_axis_name(axis_name)
    _require(isinstance(width, int) and not isinstance(width, bool) and width >= 1,
             f"width: expected a positive int (the conv width W), got {width!r}")  # fmt: skip
    _require(hasattr(x_BLE, "ndim") and x_BLE.ndim >= 3, "x_BLE: expected rank >= 3 (B, L, *channels)")
    _require(x_BLE.shape[1] >= width - 1, f"x_BLE: the local shard length {x_BLE.shape[1]} must be >= width - 1 = "
                                          f"{width - 1} (the halo comes from one neighbour only)")  # fmt: skip
    if history_BWE is not None:
        want = (x_BLE.shape[0], width - 1, *x_BLE.shape[2:])
        _require(tuple(history_BWE.shape) == want, f"history_BWE: expected shape {want}, got {history_BWE.shape}")
    if seq_idx_BL is not None:
        _require(tuple(seq_idx_BL.shape) == tuple(x_BLE.shape[:2]) and jnp.issubdtype(seq_idx_BL.dtype, jnp.integer),
                 f"seq_idx_BL: expected an integer array of shape {tuple(x_BLE.shape[:2])}, got {seq_idx_BL.shape}")


@ssd_ops._validated_by(_check_halo)
def conv_halo(
    x_BLE: Float[Array, "B L *E"],
    *,
    axis_name: AxisName,
    width: int,
    history_BWE: Float[Array, "B W1 *E"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
) -> Float[Array, "B W1 *E"]:
    """The conv history of this shard: the last ``width - 1`` raw inputs of the previous shard (one ``ppermute``).

    Device 0 gets ``history_BWE`` (zeros if None), the state before the whole sequence. With ``seq_idx_BL`` a halo
    token is kept only if no document boundary lies between it and this shard's first token (others are zeroed,
    which removes their taps), so ``causal_conv1d(x, w, b, history_BWE=halo, seq_idx_BL=seq)`` on each shard equals
    the one-device conv. Call inside ``jax.shard_map``; ``axis_name=None`` returns the history.
    """
    W1 = width - 1
    Bsz, L = x_BLE.shape[:2]
    first = jnp.zeros((Bsz, W1, *x_BLE.shape[2:]), x_BLE.dtype) if history_BWE is None else history_BWE
    if axis_name is None or W1 == 0:
        return first.astype(x_BLE.dtype)
    n = _ring_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    is_first = _ring_index(axis_name) == 0
    halo = jnp.where(is_first, first.astype(x_BLE.dtype), lax.ppermute(x_BLE[:, L - W1 :], axis_name, perm))
    if seq_idx_BL is not None:
        prev_seq_BW = lax.ppermute(seq_idx_BL[:, L - W1 :], axis_name, perm)
        same_BW = prev_seq_BW == seq_idx_BL[:, :1]
        valid_BW = jnp.flip(jnp.cumprod(jnp.flip(same_BW, 1), axis=1), 1).astype(bool)  # no change up to the shard
        valid_BW = valid_BW | is_first
        halo = jnp.where(valid_BW.reshape(Bsz, W1, *(1,) * (x_BLE.ndim - 2)), halo, jnp.zeros((), halo.dtype))
    return halo


def last_shard(x, axis_name: AxisName):
    """The value of ``x`` on the last device of ``axis_name``, on every device (e.g. the conv history after the
    whole sequence). One ``all_gather``; the identity for ``axis_name=None``."""
    check_axis_name(axis_name)
    return x if axis_name is None else lax.all_gather(x, axis_name)[-1]


def causal_conv1d_context_parallel(
    x_BLE: Float[Array, "B L *E"],
    w_WE: Float[Array, "W *E"],
    bias_E: Float[Array, "*E"] | None = None,
    *,
    channel_names: tuple[str | None, ...],
    history_BWE: Float[Array, "B W1 *E"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
) -> tuple[Float[Array, "B L *E"], Float[Array, "B W1 *E"]]:
    """``lcjax.ops.conv.causal_conv1d`` on global arrays whose sequence axis is sharded on ``act_seq``.

    ``sharding.shard_map`` over the active mesh (batch ``act_batch``, sequence ``act_seq``, channels
    ``channel_names``, e.g. ``("act_heads", None)`` for x ``[B, L, H, P]``): each shard gets its ``conv_halo`` and
    runs the conv; the returned history (the last W-1 inputs of the whole sequence) is the last shard's. Without a
    mesh (or an unsharded ``act_seq``) this is ``causal_conv1d``.
    """
    axes = sharding.mesh_axes("act_seq")
    if not axes:
        return causal_conv1d(x_BLE, w_WE, bias_E, history_BWE=history_BWE, seq_idx_BL=seq_idx_BL)
    axis_name = axes[0] if len(axes) == 1 else axes
    _require(len(channel_names) == x_BLE.ndim - 2, f"channel_names: expected {x_BLE.ndim - 2} names (one per "
                                                   f"channel axis of x_BLE), got {channel_names!r}")  # fmt: skip
    n = sharding.axis_size("act_seq")
    _require(x_BLE.shape[1] % n == 0, f"x_BLE: sequence length {x_BLE.shape[1]} must be divisible by the "
                                      f"context-parallel size {n}")  # fmt: skip
    W = w_WE.shape[0]
    x_spec = ("act_batch", "act_seq", *channel_names)
    h_spec = ("act_batch", None, *channel_names)
    opt = {k: v for k, v in (("bias", bias_E), ("history", history_BWE), ("seq", seq_idx_BL)) if v is not None}
    spec_of = {"bias": tuple(channel_names), "history": h_spec, "seq": ("act_batch", "act_seq")}

    def local(x, w, *rest):
        a = dict(zip(opt, rest))
        halo = conv_halo(x, axis_name=axis_name, width=W, history_BWE=a.get("history"), seq_idx_BL=a.get("seq"))
        y, hist = causal_conv1d(x, w, a.get("bias"), history_BWE=halo, seq_idx_BL=a.get("seq"))
        return y, last_shard(hist, axis_name)

    fn = sharding.shard_map(local, in_specs=(x_spec, (None, *channel_names), *(spec_of[k] for k in opt)),
                            out_specs=(x_spec, h_spec))  # fmt: skip
    return fn(x_BLE, w_WE, *opt.values())

