"""Sequence-parallel (context-parallel) Mamba-2 on global arrays: the SSD, the causal conv and their layouts.

The Mamba-2 counterpart of ``lcjax.ops.context_parallel.context_parallel_attention``: the layer calls these on
global arrays, and they read the active mesh and rules through ``lcjax.sharding`` (the one module naming mesh
axes) and run ``sharding.shard_map`` over batch (``act_batch``), heads (``act_heads``) and, when the sequence is
sharded (``act_seq``), the sequence. "Transformers are SSMs", Dao & Gu 2024, https://arxiv.org/abs/2405.21060, §8.2;
the per-shard math is ``lcjax.ops.ssd`` (``impl="context_parallel"``: state passing) and ``lcjax.ops.conv``.

* ``sequence_axis``: whether one mixer call runs sequence-parallel (``"act_seq"``) or gathers the sequence (None).
  Every device keeps its contiguous slice of the sequence when the mesh shards ``act_seq`` over n > 1 devices, n
  divides L, every shard holds at least ``conv_width - 1`` tokens (the conv halo comes from one neighbour; decoding
  steps therefore gather) and there is no state clipping (not affine in the entering state). Otherwise the
  sequence is gathered: the result is the same, the memory is not, as the attention layer gathers keys/values.
* ``ssd_sharded``: ``lcjax.ops.ssd.ssd`` per (batch, heads[, sequence]) shard, with the B/C groups laid out to
  follow the heads (``groups_for_heads``); sequence-parallel it is one ``all_gather`` of O(B·H·P·N) floats,
  independent of L.
* ``causal_conv1d_context_parallel``: the conv per sequence shard with its ``conv_halo`` (the previous shard's last
  W-1 inputs, one ``ppermute``, masked to the document the shard starts with); ``last_shard`` for the returned
  history.
* The per-token pieces whose form depends on the head layout: ``in_projection`` (one fused matmul unless the heads
  are split) and ``gated_rmsnorm`` (group statistics that hold for any split of the heads).

Recurrent state passes from device r-1 to device r, so batches must use the contiguous layout
(``lcjax.ops.context_parallel.Layout``). Packed documents (``seq_idx``, lcjax segment ids): a change of id starts
a document, including between the last token of shard r-1 and the first of shard r.

Dimension key (lcjax/typing.py): B batch, L length (local inside shard_map), H heads, P head dim, G groups, N state,
W conv width, E channels (any trailing shape).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax import sharding
from lcjax.checks import require, require_bool, require_choice, require_int, validated_by
from lcjax.ops._common import (
    AxisName, axis_index, check_axis_name, context_axis_name, require_float_array, require_ids, require_shape,
    send_to_next,
)  # fmt: skip
from lcjax.ops.conv import causal_conv1d
from lcjax.ops.ssd import Impl, SSDInputs, ssd
from lcjax.typing import Array, Float, Int

__all__ = ["sequence_axis", "ssd_sharded", "groups_for_heads", "in_projection", "gated_rmsnorm", "conv_halo",
           "last_shard", "causal_conv1d_context_parallel"]  # fmt: skip

SEQ = "act_seq"


def sequence_axis(length: int, *, conv_width: int, state_clipping: bool = False) -> str | None:
    """``"act_seq"`` when a Mamba-2 mixer call of ``length`` tokens runs sequence-parallel, None when it gathers.

    The rule of the module docstring, under the active mesh and rules (None without a mesh). The result is the
    logical name of the activations' sequence axis: pass it to ``ssd_sharded`` and ``causal_conv1d_context_parallel``
    as ``seq`` and use it in the layer's own sharding specs.
    """
    require_int("sequence_axis: length", length, min=1)
    require_int("sequence_axis: conv_width", conv_width, min=1)
    require_bool("sequence_axis: state_clipping", state_clipping)
    n = sharding.axis_size(SEQ)
    if n == 1 or length % n or length // n < conv_width - 1 or state_clipping:
        return None
    return SEQ


def _require_seq(owner: str, seq, length: int) -> None:
    require_choice(f"{owner}: seq", seq, (None, SEQ))
    n = sharding.axis_size(SEQ)
    require(seq is None or length % n == 0, f"{owner}: sequence length {length} must be divisible by the "
                                            f"context-parallel size {n} (or pass seq=None to gather it)")  # fmt: skip


def groups_for_heads(B_BLGN: Float[Array, "B L G N"], C_BLGN: Float[Array, "B L G N"], H: int):
    """Lay out the B/C groups so that every heads shard holds the groups of its heads.

    G divisible by the heads shards t: shard G along with the heads. t divisible by G (e.g. G = 1): repeat each
    group t/G times, so shard i gets the one group serving its heads. Returns (B, C, logical spec of (G, N)).
    """
    G = B_BLGN.shape[2]
    t = sharding.axis_size("act_heads")
    if t == 1:
        return B_BLGN, C_BLGN, (None, None)
    require(H % t == 0, f"ssd_sharded: num_heads={H} is not divisible by the {t} shards of act_heads")
    if G % t == 0:
        return B_BLGN, C_BLGN, ("act_heads", None)
    require(t % G == 0, f"ssd_sharded: n_groups={G} and the {t} shards of act_heads must divide one another")
    rep = lambda a: jnp.repeat(a, t // G, axis=2)  # noqa: E731
    return rep(B_BLGN), rep(C_BLGN), ("act_heads", None)


def ssd_sharded(
    inputs: SSDInputs, *, impl: Impl | str = Impl.CHUNKED, seq: str | None = None
) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """``lcjax.ops.ssd.ssd`` of global arrays under the active mesh: (y_BLHP, final_state_BHPN).

    ``sharding.shard_map`` over batch and heads (B/C groups by ``groups_for_heads``); with ``seq="act_seq"``
    (``sequence_axis``) also over the sequence, where each shard runs ``impl="context_parallel"`` over the mesh
    axes of ``act_seq`` and the final state comes back replicated over them. Without a mesh this is ``ssd``.
    """
    impl = inputs.check(require_choice("ssd_sharded: impl", impl, [i.value for i in Impl]))
    x_BLHP = inputs.x_BLHP
    _require_seq("ssd_sharded", seq, x_BLHP.shape[1])
    axis_name = context_axis_name() if seq is not None else None
    local_impl = impl if axis_name is None else inputs.check(Impl.CONTEXT_PARALLEL)  # refuses state clipping
    B_BLGN, C_BLGN, g = groups_for_heads(inputs.B_BLGN, inputs.C_BLGN, x_BLHP.shape[2])
    inputs = inputs._replace(B_BLGN=B_BLGN, C_BLGN=C_BLGN)
    h, bl = ("act_heads",), ("act_batch", seq)
    specs = SSDInputs(bl + h + (None,), bl + h, h, bl + g, bl + g, None, h, ("act_batch", *h, None, None), bl, h, h)
    names = [k for k, v in inputs._asdict().items() if v is not None and k != "chunk_size"]  # shard_map: arrays only

    def local(*arrays):
        shard = inputs._replace(**dict(zip(names, arrays)))
        return ssd(**shard._asdict(), impl=local_impl, axis_name=axis_name)

    fn = sharding.shard_map(local, in_specs=tuple(getattr(specs, k) for k in names),
                            out_specs=(specs.x_BLHP, specs.initial_state_BHPN))  # fmt: skip
    return fn(*(getattr(inputs, k) for k in names))


def in_projection(
    x_BLD: Float[Array, "B L D"], w: dict[str, Array], names: dict[str, tuple[str | None, ...]], *, seq: str | None
) -> dict[str, Array]:
    """``{k: x_BLD · w[k]}`` for weights ``w[k]`` of shape ``(D, *E_k)``, with output names ``("act_batch", seq,
    *names[k])``.

    Heads not split over devices: one matmul against the pieces side by side (HF's single in_proj), which XLA runs
    ~10% faster than five thin ones; under tensor parallelism the pieces stay apart, each sharded by its names.
    """
    Bsz, L, D = x_BLD.shape
    if sharding.axis_size("act_heads") == 1:
        W_DF = jnp.concatenate([w_DE.reshape(D, -1) for w_DE in w.values()], axis=1)
        out_BLF = sharding.einsum("BLD,DF->BLF", x_BLD, W_DF, out=("act_batch", seq, None))
        cuts = np.cumsum([math.prod(w_DE.shape[1:]) for w_DE in w.values()])[:-1]
        return {k: y.reshape(Bsz, L, *w[k].shape[1:]) for k, y in zip(w, jnp.split(out_BLF, cuts, axis=-1))}
    spec = lambda w_DE: "BLD,D{0}->BL{0}".format("EF"[: w_DE.ndim - 1])  # noqa: E731
    return {k: sharding.einsum(spec(w_DE), x_BLD, w_DE, out=("act_batch", seq, *names[k])) for k, w_DE in w.items()}


def gated_rmsnorm(
    y_BLHP: Float[Array, "B L H P"], z_BLHP: Float[Array, "B L H P"], weight_HP: Float[Array, "H P"] | None, *,
    n_groups: int, eps: float, norm_before_gate: bool = False, seq: str | None = None,
) -> Float[Array, "B L H P"]:  # fmt: skip
    """Mamba-2's gated RMSNorm over groups of H/G heads (HF ``MambaRMSNormGated``), in float32.

    norm(y·silu(z))·w, or with ``norm_before_gate`` norm(y)·w·silu(z); ``weight_HP=None``: y·silu(z) (no norm, float32).
    With a weight the result has z's dtype. The mean square per group is a contraction with the (H, G) membership
    matrix, so it holds for any split of the heads over devices (a reshape H -> (G, H/G) would not).
    """
    dt = z_BLHP.dtype
    H, P = y_BLHP.shape[2:]
    G = n_groups
    gate_BLHP = jax.nn.silu(z_BLHP.astype(jnp.float32))
    y_BLHP = y_BLHP.astype(jnp.float32)
    if weight_HP is None:
        return y_BLHP * gate_BLHP
    if not norm_before_gate:
        y_BLHP = y_BLHP * gate_BLHP
    member_HG = jnp.asarray(np.arange(H)[:, None] // (H // G) == np.arange(G)[None, :], jnp.float32)
    sq_BLH = jnp.sum(jnp.square(y_BLHP), axis=-1)
    ms_BLG = sharding.einsum("BLH,HG->BLG", sq_BLH, member_HG, out=("act_batch", seq, None)) / (H // G * P)
    rstd_BLH = sharding.einsum("BLG,HG->BLH", lax.rsqrt(ms_BLG + eps), member_HG, out=("act_batch", seq, "act_heads"))
    # Materialised once: the norm-weight gradient then reduces it instead of re-deriving it in the reduction.
    y_BLHP = lax.optimization_barrier(y_BLHP * rstd_BLH[..., None])
    y_BLHP = weight_HP[None, None] * y_BLHP.astype(dt)
    return y_BLHP * gate_BLHP.astype(dt) if norm_before_gate else y_BLHP


# ---- the causal conv ----------------------------------------------------------------------------------------------
def _check_halo(x_BLE, *, axis_name, width, history_BWE=None, seq_idx_BL=None):
    check_axis_name("conv_halo", axis_name)
    require_int("conv_halo: width", width, min=1)
    require_float_array("x_BLE", x_BLE, min_rank=3)
    require(x_BLE.shape[1] >= width - 1, f"x_BLE: the local shard length {x_BLE.shape[1]} must be >= width - 1 = "
                                         f"{width - 1} (the halo comes from one neighbour only)")  # fmt: skip
    if history_BWE is not None:
        require_shape("history_BWE", history_BWE, (x_BLE.shape[0], width - 1, *x_BLE.shape[2:]), "(B, W-1, *channels)")
    require_ids("seq_idx_BL", seq_idx_BL, x_BLE.shape[:2])


@validated_by(_check_halo)
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
    is_first = axis_index(axis_name) == 0
    halo = jnp.where(is_first, first.astype(x_BLE.dtype), send_to_next(x_BLE[:, L - W1 :], axis_name))
    if seq_idx_BL is not None:
        prev_seq_BW = send_to_next(seq_idx_BL[:, L - W1 :], axis_name)
        same_BW = prev_seq_BW == seq_idx_BL[:, :1]
        valid_BW = jnp.flip(jnp.cumprod(jnp.flip(same_BW, 1), axis=1), 1).astype(bool)  # no change up to the shard
        valid_BW = valid_BW | is_first
        halo = jnp.where(valid_BW.reshape(Bsz, W1, *(1,) * (x_BLE.ndim - 2)), halo, jnp.zeros((), halo.dtype))
    return halo


def last_shard(x, axis_name: AxisName):
    """The value of ``x`` on the last device of ``axis_name``, on every device (e.g. the conv history after the
    whole sequence). One ``all_gather``; the identity for ``axis_name=None``."""
    check_axis_name("last_shard", axis_name)
    return x if axis_name is None else lax.all_gather(x, axis_name)[-1]


def causal_conv1d_context_parallel(
    x_BLE: Float[Array, "B L *E"],
    w_WE: Float[Array, "W *E"],
    bias_E: Float[Array, "*E"] | None = None,
    *,
    channel_names: tuple[str | None, ...],
    seq: str | None = SEQ,
    history_BWE: Float[Array, "B W1 *E"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
) -> tuple[Float[Array, "B L *E"], Float[Array, "B W1 *E"]]:
    """``lcjax.ops.conv.causal_conv1d`` on global arrays whose sequence axis is sharded on ``act_seq``.

    ``sharding.shard_map`` over the active mesh (batch ``act_batch``, sequence ``act_seq``, channels
    ``channel_names``, e.g. ``("act_heads", None)`` for x ``[B, L, H, P]``): each shard gets its ``conv_halo`` and
    runs the conv; the returned history (the last W-1 inputs of the whole sequence) is the last shard's. Without a
    mesh, with ``act_seq`` unsharded or with ``seq=None`` (``sequence_axis``: the gathered sequence) this is
    ``causal_conv1d`` on the global arrays.
    """
    _require_seq("causal_conv1d_context_parallel", seq, x_BLE.shape[1])
    axis_name = context_axis_name() if seq is not None else None
    if axis_name is None:
        return causal_conv1d(x_BLE, w_WE, bias_E, history_BWE=history_BWE, seq_idx_BL=seq_idx_BL)
    require(len(channel_names) == x_BLE.ndim - 2, f"channel_names: expected {x_BLE.ndim - 2} names (one per "
                                                  f"channel axis of x_BLE), got {channel_names!r}")  # fmt: skip
    W = w_WE.shape[0]
    x_spec = ("act_batch", SEQ, *channel_names)
    h_spec = ("act_batch", None, *channel_names)
    opt = {k: v for k, v in (("bias", bias_E), ("history", history_BWE), ("seq", seq_idx_BL)) if v is not None}
    spec_of = {"bias": tuple(channel_names), "history": h_spec, "seq": ("act_batch", SEQ)}

    def local(x, w, *rest):
        a = dict(zip(opt, rest))
        halo = conv_halo(x, axis_name=axis_name, width=W, history_BWE=a.get("history"), seq_idx_BL=a.get("seq"))
        y, hist = causal_conv1d(x, w, a.get("bias"), history_BWE=halo, seq_idx_BL=a.get("seq"))
        return y, last_shard(hist, axis_name)

    fn = sharding.shard_map(local, in_specs=(x_spec, (None, *channel_names), *(spec_of[k] for k in opt)),
                            out_specs=(x_spec, h_spec))  # fmt: skip
    return fn(x_BLE, w_WE, *opt.values())
