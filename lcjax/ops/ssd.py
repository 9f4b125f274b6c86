"""State space duality (SSD): the Mamba-2 sequence mixer as pure functions.

"Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality",
Dao & Gu, ICML 2024, https://arxiv.org/abs/2405.21060 (§6 and Listing 1). Checked against state-spaces/mamba
``mamba_ssm/modules/ssd_minimal.py`` and ``mamba_ssm/ops/triton/ssd_combined.py`` (seq_idx semantics,
``_state_passing_fwd``) and HF transformers 5.23.0 ``models/mamba2/modeling_mamba2.py`` (``mamba2_chunk_scan``).

Per head h (group g = h // (H/G) supplies B and C), with Δ = dt > 0 and A < 0:

    S_t = exp(Δ_t·A_h) · S_{t-1} + Δ_t · x_t ⊗ B_t          S_t ∈ R^{P×N}
    y_t = S_t · C_t + D_h · x_t

Implementations (``Impl``):

* ``naive``: a ``lax.scan`` over time of that recurrence, the reference every other path is tested against.
* ``chunked``: the SSD block decomposition. Inside a chunk of Q tokens it is quadratic in Q (matmul-shaped, with the
  stable segment sum); between chunks it is a ``lax.scan`` of the affine map S_k = a_k·S_{k-1} + s_k, so nothing is
  quadratic in L or in the number of chunks. All decays, cumulative sums and states are in float32 (float64 for
  float64 inputs); matmul operands keep the input dtype with float32 accumulation.
* ``context_parallel``: the sequence sharded over a mesh axis (call inside ``jax.shard_map`` with ``axis_name``;
  ``lcjax/ops/ssd_context_parallel.py`` does that for global arrays). Paper §8.2, cross-checked with
  recurrentgemma's ``multi_shard_correction`` (google-deepmind/recurrentgemma ``recurrentgemma/jax/pallas.py``) and
  state-spaces/mamba PR #664; written from the math. The SSD of one shard is affine in the state S_in entering it
  (without state clipping; ``initial_state_decay``): y_t(S_in) = y_t(0) + d_t·(C_t·S_in) and final(S_in) =
  a·S_in + final(0), d_t = exp(Σ_{s<=t} Δ_s A) (0 after a document boundary), a = d_last. So every shard runs the
  chunked SSD from a zero state, the (final(0), a) pairs are ``all_gather``-ed (O(B·H·P·N), independent of L), and
  every shard folds S_in_0 = S0, S_in_r = a_{r-1}·g_{r-1}·S_in_{r-1} + final_{r-1}(0) (g_r = 0 when shard r starts
  a new document) and adds its correction. Gradients flow through the gather (its transpose reduce-scatters them).

Packed sequences: ``seq_idx_BL`` holds lcjax segment ids (int, one per token; a document is a run of equal ids, 0
is padding). For Mamba-2 a document starts wherever the id changes from one position to the next, so a padding run
is a run of its own and no state crosses it (also between the last token of one shard and the first of the next).
Every document behaves exactly as if run alone from a zero state; the initial state feeds only the first run, and
the returned final state is the state of the last run.

Long-context options (off when None): ``decay_scale_H`` multiplies every per-token decay by λ_h ("Stuffed Mamba",
arXiv 2410.07145, ``da_mult``), ``max_state_norm_H`` rescales each head's state to Frobenius norm ≤ τ_h after
every chunk of ``chunk_size`` tokens (Stuffed Mamba's state normalisation). ``longmamba_calibrate`` and
``longmamba_filter`` implement LongMamba's token filtering (arXiv 2504.16053, GATECH-EIC/LongMamba).

Dimension key (lcjax/typing.py): B batch, L length, H heads, P head dim, G groups, N state, C chunks, Q chunk length
(S: a second position inside a chunk).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax.checks import require, require_choice, require_float, require_int, validated_by
from lcjax.ops._common import (
    AxisName, acc_dtype, axis_index, axis_size, check_axis_name, gather_shards, require_float_array, require_ids,
    require_optional_vector, require_shape, run_index,
)  # fmt: skip
from lcjax.typing import Array, Bool, Float, Int


class Impl(str, enum.Enum):
    """Which SSD algorithm ``ssd`` runs."""

    NAIVE = "naive"  # sequential lax.scan over time: the reference
    CHUNKED = "chunked"  # SSD block decomposition, scan over chunks
    CONTEXT_PARALLEL = "context_parallel"  # sequence sharded over ``axis_name`` (inside shard_map): state passing


class SSDInputs(NamedTuple):
    """The arguments of one SSD call, as ``ssd`` takes them (see there); the implementations take this tuple.

    ``lcjax.ops.ssd_context_parallel.ssd_sharded`` takes it too, to run ``ssd`` per shard of global arrays.
    """

    x_BLHP: Float[Array, "B L H P"]
    dt_BLH: Float[Array, "B L H"]
    A_H: Float[Array, " H"]
    B_BLGN: Float[Array, "B L G N"]
    C_BLGN: Float[Array, "B L G N"]
    chunk_size: int
    D_H: Float[Array, " H"] | None = None
    initial_state_BHPN: Float[Array, "B H P N"] | None = None
    seq_idx_BL: Int[Array, "B L"] | None = None
    decay_scale_H: Float[Array, " H"] | None = None
    max_state_norm_H: Float[Array, " H"] | None = None

    def check(self, impl=Impl.CHUNKED, axis_name=None) -> Impl:
        """ValueError naming the first bad argument (TypeError for a non-int ``chunk_size``); returns ``Impl(impl)``.

        ``impl`` and ``axis_name`` (the values checked) are left unannotated, so the runtime type check leaves them
        to these messages.
        """
        x, dt, A, B, C = self[:5]
        for name, a, rank in (("x_BLHP", x, 4), ("dt_BLH", dt, 3), ("A_H", A, 1), ("B_BLGN", B, 4), ("C_BLGN", C, 4)):
            require_float_array(name, a, rank=rank)
        Bsz, L, H, P = x.shape
        G, N = B.shape[2:]
        require(L >= 1, f"x_BLHP: length L must be >= 1, got shape {tuple(x.shape)}")
        require_shape("dt_BLH", dt, (Bsz, L, H), "(B, L, H)")
        require_shape("A_H", A, (H,), "(H,)")
        require(B.shape[:2] == (Bsz, L), f"B_BLGN: expected shape (B, L, G, N) with (B, L) = {(Bsz, L)}, got "
                                         f"{tuple(B.shape)}")  # fmt: skip
        require_shape("C_BLGN", C, B.shape, "that of B_BLGN")
        require(G >= 1 and H % G == 0, f"B_BLGN: groups G={G} must divide heads H={H}")
        require_int("chunk_size", self.chunk_size, min=1)
        for name in ("D_H", "decay_scale_H", "max_state_norm_H"):
            require_optional_vector(name, getattr(self, name), H)
        if self.initial_state_BHPN is not None:
            require_float_array("initial_state_BHPN", self.initial_state_BHPN, rank=4)
            require_shape("initial_state_BHPN", self.initial_state_BHPN, (Bsz, H, P, N), "(B, H, P, N)")
        require_ids("seq_idx_BL", self.seq_idx_BL, (Bsz, L))
        impl = Impl(require_choice("impl", impl, [i.value for i in Impl]))
        check_axis_name("ssd", axis_name)
        require(axis_name is None or impl is Impl.CONTEXT_PARALLEL,
                f"axis_name={axis_name!r}: only impl='context_parallel' takes a mesh axis, got impl={impl.value!r}")
        require(impl is not Impl.CONTEXT_PARALLEL or self.max_state_norm_H is None,
                "max_state_norm_H: state clipping is not affine in the entering state, so context-parallel SSD "
                "cannot pass states across shards; use None")  # fmt: skip
        return impl


def _log_decay(dt_BLH, A_H, decay_scale_H, acc) -> Float[Array, "B L H"]:
    a_BLH = dt_BLH.astype(acc) * A_H.astype(acc)[None, None, :]
    if decay_scale_H is not None:
        a_BLH = a_BLH + jnp.log(decay_scale_H.astype(acc))[None, None, :]
    return a_BLH


def _clip_state_norm(S_BHPN: Float[Array, "B H P N"], max_norm_H: Float[Array, " H"]) -> Float[Array, "B H P N"]:
    """S_h <- S_h · min(1, τ_h / ||S_h||_F), NaN-free in value and gradient (also for S = 0 and τ = inf)."""
    sq_BH = jnp.sum(jnp.square(S_BHPN), axis=(2, 3))
    tau_1H = max_norm_H.astype(S_BHPN.dtype)[None, :]
    over_BH = sq_BH > jnp.square(tau_1H)
    scale_BH = jnp.where(over_BH, tau_1H * lax.rsqrt(jnp.where(over_BH, sq_BH, 1.0)), 1.0)
    return S_BHPN * scale_BH[:, :, None, None]


# ---- one recurrent step (decoding) and the naive reference ------------------------------------------------------
def ssd_step(
    state_BHPN: Float[Array, "B H P N"],
    x_BHP: Float[Array, "B H P"],
    dt_BH: Float[Array, "B H"],
    A_H: Float[Array, " H"],
    B_BGN: Float[Array, "B G N"],
    C_BGN: Float[Array, "B G N"],
    *,
    D_H: Float[Array, " H"] | None = None,
    decay_scale_H: Float[Array, " H"] | None = None,
    max_state_norm_H: Float[Array, " H"] | None = None,
) -> tuple[Float[Array, "B H P"], Float[Array, "B H P N"]]:
    """One token of the recurrence: O(1) in the sequence length. Returns (y_BHP, new state).

    The state is kept in float32 (float64 for float64 inputs); y has x's dtype. ``max_state_norm_H`` clips the new
    state after the output is read (a chunk of one token).
    """
    Bsz, H, P = x_BHP.shape
    G, N = B_BGN.shape[1:]
    acc = acc_dtype(x_BHP.dtype)
    a_BH = _log_decay(dt_BH[:, None, :], A_H, decay_scale_H, acc)[:, 0]
    x_BGRP = x_BHP.astype(acc).reshape(Bsz, G, H // G, P)
    dt_BGR = dt_BH.astype(acc).reshape(Bsz, G, H // G)
    S_BGRPN = state_BHPN.astype(acc).reshape(Bsz, G, H // G, P, N)
    write_BGRPN = jnp.einsum("BGR,BGRP,BGN->BGRPN", dt_BGR, x_BGRP, B_BGN.astype(acc))
    S_BGRPN = jnp.exp(a_BH).reshape(Bsz, G, H // G)[..., None, None] * S_BGRPN + write_BGRPN
    y_BGRP = jnp.einsum("BGRPN,BGN->BGRP", S_BGRPN, C_BGN.astype(acc))
    y_BHP = y_BGRP.reshape(Bsz, H, P)
    if D_H is not None:
        y_BHP = y_BHP + D_H.astype(acc)[None, :, None] * x_BHP.astype(acc)
    state_BHPN = S_BGRPN.reshape(Bsz, H, P, N)
    if max_state_norm_H is not None:
        state_BHPN = _clip_state_norm(state_BHPN, max_state_norm_H)
    return y_BHP.astype(x_BHP.dtype), state_BHPN


def _naive(a: SSDInputs) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """Reference: ``lax.scan`` of ``ssd_step`` over time, resetting the state where a new document starts.

    ``chunk_size`` only matters for ``max_state_norm_H``: the state is clipped after positions t with
    (t + 1) % chunk_size == 0 and after the last position, as the chunked algorithm does at its chunk ends.
    """
    x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, initial_state_BHPN, seq_idx_BL, decay_scale_H, \
        max_state_norm_H = a
    Bsz, L, H, P = x_BLHP.shape
    N = B_BLGN.shape[-1]
    acc = acc_dtype(x_BLHP.dtype)
    S0_BHPN = jnp.zeros((Bsz, H, P, N), acc) if initial_state_BHPN is None else initial_state_BHPN.astype(acc)
    if seq_idx_BL is None:
        reset_BL = jnp.zeros((Bsz, L), bool)
    else:
        seg_BL = run_index(seq_idx_BL)
        reset_BL = jnp.concatenate([jnp.zeros((Bsz, 1), bool), seg_BL[:, 1:] != seg_BL[:, :-1]], axis=1)
    t_L = jnp.arange(L)
    clip_L = ((t_L + 1) % chunk_size == 0) | (t_L == L - 1)

    def body(S_BHPN, inputs):
        x_BHP, dt_BH, B_BGN, C_BGN, reset_B, clip = inputs
        S_BHPN = jnp.where(reset_B[:, None, None, None], 0.0, S_BHPN)
        y_BHP, S_BHPN = ssd_step(S_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H=D_H, decay_scale_H=decay_scale_H)
        if max_state_norm_H is not None:
            S_BHPN = jnp.where(clip, _clip_state_norm(S_BHPN, max_state_norm_H), S_BHPN)
        return S_BHPN, y_BHP

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    inputs = tuple(map(time_major, (x_BLHP, dt_BLH, B_BLGN, C_BLGN, reset_BL))) + (clip_L,)
    final_BHPN, y_LBHP = lax.scan(body, S0_BHPN, inputs)
    return jnp.moveaxis(y_LBHP, 0, 1), final_BHPN


# ---- chunked SSD ------------------------------------------------------------------------------------------------
BLOCK = 64  # positions per diagonal (quadratic) block inside a chunk; chunk sizes that are multiples of it use it
SEGSUM_MATMUL_MAX = 64  # blocks up to this length build the segment sum with one matmul (a Q³ 0/1 constant)


def _stable_segsum(a_Q: Float[Array, "*B Q"]) -> Float[Array, "*B Q S"]:
    """Σ_{k=s+1..q} a_k for s <= q (0 above the diagonal): the stable segment sum.

    Each entry is a sum of exactly the same-sign terms it needs (a <= 0), never a difference of two long
    cumulative sums, so nothing cancels. Short blocks contract a with the constant 0/1 tensor [s < k <= q] (one
    matmul, also in the backward); longer ones cumsum the (q, s) matrix holding a_q below the diagonal (XLA lowers
    that cumsum to a reduce-window: O(Q) work per entry).
    """
    Q = a_Q.shape[-1]
    if Q <= SEGSUM_MATMUL_MAX:
        q, s, k = np.ogrid[:Q, :Q, :Q]
        between_KQS = jnp.asarray(((s < k) & (k <= q)).transpose(2, 0, 1).reshape(Q, Q * Q), a_Q.dtype)
        out = jnp.einsum("...K,KF->...F", a_Q, between_KQS, precision=lax.Precision.HIGHEST)
        return out.reshape(*a_Q.shape[:-1], Q, Q)
    below_QS = jnp.tril(jnp.ones((Q, Q), bool), -1)
    return jnp.cumsum(jnp.where(below_QS, a_Q[..., :, None], 0.0), axis=-2)


def _segsum_decay(
    a_BCHQ: Float[Array, "B C H Q"], mask_BCQS: Bool[Array, "B C Q S"] | None
) -> Float[Array, "B C H Q S"]:
    """exp(Σ_{k=s+1..q} a_k) for s <= q, 0 above the diagonal and across documents: the stable decay matrix."""
    Q = a_BCHQ.shape[-1]
    segsum_BCHQS = _stable_segsum(a_BCHQ)
    causal_QS = jnp.tril(jnp.ones((Q, Q), bool), 0)
    keep = causal_QS[None, None, None] if mask_BCQS is None else causal_QS[None, None, None] & mask_BCQS[:, :, None]
    return jnp.where(keep, jnp.exp(segsum_BCHQS), 0.0)


def _chunked(a: SSDInputs) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """Chunked SSD (paper §6): intra-chunk dual form + a scan over chunk states. Any L (padded internally).

    The quadratic (dual) form runs on blocks of Q = ``BLOCK`` positions when ``chunk_size`` is a multiple of it
    (else Q = ``chunk_size``, shrunk to L when L is shorter), and the states pass between blocks; ``chunk_size``
    keeps its meaning for ``max_state_norm_H`` (clipping after every ``chunk_size`` tokens and at the end). The
    result does not depend on the block size up to rounding, while the work, O(L·Q·(N + P)·H + L·H·P·N), and the
    memory of the decay matrices, O(L·Q·H), do: on CPU, 64-position blocks run the 130m mixer's SSD ~2x faster
    than 256. Inside, heads come before positions (``B C G R Q ...``), so every contraction is a batched matmul
    over (batch, block, group, head) without transposes of the (Q, Q) matrices, and every decay is the exp of a
    same-sign sum.
    """
    x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, initial_state_BHPN, seq_idx_BL, decay_scale_H, \
        max_state_norm_H = a
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[2:]
    R = H // G
    acc = acc_dtype(x_BLHP.dtype)
    mm = x_BLHP.dtype if x_BLHP.dtype != jnp.float64 else acc  # matmul operand dtype
    Q = BLOCK if chunk_size % BLOCK == 0 else chunk_size
    Q = min(Q, L)
    nC = -(-L // Q)
    pad = nC * Q - L

    # Discretise first, then pad with zeros: a = 0 and X = 0 leave outputs and the final state untouched.
    a_BLH = _log_decay(dt_BLH, A_H, decay_scale_H, acc)
    X_BLHP = x_BLHP.astype(acc) * dt_BLH.astype(acc)[..., None]
    time_pad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    # Two layouts: positions first (B C Q G ...) for the state contractions, whose results then need no
    # transposes, and heads first (B C G R Q ...) for the (Q, Q) dual form.
    a_BCHQ = jnp.moveaxis(time_pad(a_BLH).reshape(Bsz, nC, Q, H), 3, 2)
    X_BCQGRP = time_pad(X_BLHP).reshape(Bsz, nC, Q, G, R, P)
    X_BCGRQP = X_BCQGRP.transpose(0, 1, 3, 4, 2, 5)
    B_BCQGN = time_pad(B_BLGN).reshape(Bsz, nC, Q, G, N).astype(mm)
    C_BCQGN = time_pad(C_BLGN).reshape(Bsz, nC, Q, G, N).astype(mm)
    B_BCGQN, C_BCGQN = jnp.moveaxis(B_BCQGN, 3, 2), jnp.moveaxis(C_BCQGN, 3, 2)
    from_start_BCHQ = jnp.cumsum(a_BCHQ, axis=-1)  # decay from the chunk start to q, inclusive
    # decay from q to the chunk end (exclusive of q): a reversed cumsum, not a difference of cumulative sums
    to_end_BCHQ = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(a_BCHQ[..., 1:], -1), -1), -1),
                                   jnp.zeros_like(a_BCHQ[..., :1])], axis=-1)  # fmt: skip

    if seq_idx_BL is None:
        seg_BCQ = same_seg_BCQS = None
    else:  # padding joins the last document
        seg_BCQ = jnp.pad(run_index(seq_idx_BL), [(0, 0), (0, pad)], mode="edge").reshape(Bsz, nC, Q)
        same_seg_BCQS = seg_BCQ[:, :, :, None] == seg_BCQ[:, :, None, :]
        # Document of the state entering chunk k: that of the previous chunk's last token (chunk 0: document 0).
        prev_seg_BC = jnp.concatenate([jnp.zeros((Bsz, 1), jnp.int32), seg_BCQ[:, :-1, -1]], axis=1)

    # 1. Intra-chunk outputs (the diagonal blocks of the semiseparable matrix).
    L_BCGRQS = _segsum_decay(a_BCHQ, same_seg_BCQS).reshape(Bsz, nC, G, R, Q, Q)
    CB_BCGQS = jnp.einsum("BCGQN,BCGSN->BCGQS", C_BCGQN, B_BCGQN, preferred_element_type=acc)
    M_BCGRQS = (CB_BCGQS[:, :, :, None] * L_BCGRQS).astype(mm)
    y_BCGRQP = jnp.einsum("BCGRQS,BCGRSP->BCGRQP", M_BCGRQS, X_BCGRQP.astype(mm), preferred_element_type=acc)

    # 2. Weights of each token in its block's own final state (decay to the block end) and of the entering state
    # in each token's output (decay from the block start).
    w_BCHQ, d_BCHQ = jnp.exp(to_end_BCHQ), jnp.exp(from_start_BCHQ)
    a_BCH = jnp.exp(from_start_BCHQ[..., -1])  # decay across the whole block
    if seg_BCQ is not None:  # a new document inside a block: earlier tokens and states stop there
        w_BCHQ = jnp.where((seg_BCQ == seg_BCQ[:, :, -1:])[:, :, None, :], w_BCHQ, 0.0)
        d_BCHQ = jnp.where((seg_BCQ == prev_seg_BC[:, :, None])[:, :, None, :], d_BCHQ, 0.0)
        a_BCH = jnp.where((seg_BCQ[:, :, -1] == prev_seg_BC)[..., None], a_BCH, 0.0)
    to_BCQGR = lambda t_BCHQ: jnp.moveaxis(t_BCHQ, 3, 2).reshape(Bsz, nC, Q, G, R)
    Xw_BCQGRP = (X_BCQGRP * to_BCQGR(w_BCHQ)[..., None]).astype(mm)

    # 3. State passing, a linear recurrence over blocks (not the listing's (C x C) form): each step reads the
    # entering state S into the block's outputs, C_q · S, then S <- a·S + B^T·(w ⊙ X). Doing both in one scan
    # never materialises the (C, H, P, N) stack of entering states in the forward pass.
    S0_BHPN = jnp.zeros((Bsz, H, P, N), acc) if initial_state_BHPN is None else initial_state_BHPN.astype(acc)
    clip_C = np.zeros((nC,), bool)
    if max_state_norm_H is not None:  # clip where a chunk of chunk_size tokens ends, and after the last block
        clip_C = ((np.arange(1, nC + 1) * Q) % chunk_size == 0) | (np.arange(nC) == nC - 1)

    def step(S_BGRPN, inputs):
        a_BH, Xw_BQGRP, B_BQGN, C_BQGN, clip = inputs
        y_BQGRP = jnp.einsum("BQGN,BGRPN->BQGRP", C_BQGN.astype(acc), S_BGRPN)
        s_BGRPN = jnp.einsum("BQGN,BQGRP->BGRPN", B_BQGN, Xw_BQGRP, preferred_element_type=acc)
        S_BGRPN = a_BH.reshape(Bsz, G, R)[..., None, None] * S_BGRPN + s_BGRPN
        if max_state_norm_H is not None:
            clipped = _clip_state_norm(S_BGRPN.reshape(Bsz, H, P, N), max_state_norm_H).reshape(S_BGRPN.shape)
            S_BGRPN = jnp.where(clip, clipped, S_BGRPN)
        return S_BGRPN, y_BQGRP

    lead = lambda t: jnp.moveaxis(t, 1, 0)  # block axis first, for the scan
    final_BGRPN, y_off_CBQGRP = lax.scan(step, S0_BHPN.reshape(Bsz, G, R, P, N), (
        lead(a_BCH), lead(Xw_BCQGRP), lead(B_BCQGN), lead(C_BCQGN), jnp.asarray(clip_C)))  # fmt: skip
    final_BHPN = final_BGRPN.reshape(Bsz, H, P, N)

    # 4. Outputs: the diagonal blocks plus the entering states' contributions (the off-diagonal blocks).
    y_off_BCQGRP = lead(y_off_CBQGRP) * to_BCQGR(d_BCHQ)[..., None]
    y_BCQGRP = y_BCGRQP.transpose(0, 1, 4, 2, 3, 5) + y_off_BCQGRP

    y_BLHP = y_BCQGRP.reshape(Bsz, nC * Q, H, P)[:, :L]
    if D_H is not None:
        y_BLHP = y_BLHP + D_H.astype(acc)[None, None, :, None] * x_BLHP.astype(acc)
    return y_BLHP.astype(x_BLHP.dtype), final_BHPN


def initial_state_decay(
    dt_BLH: Float[Array, "B L H"],
    A_H: Float[Array, " H"],
    *,
    seq_idx_BL: Int[Array, "B L"] | None = None,
    decay_scale_H: Float[Array, " H"] | None = None,
) -> tuple[Float[Array, "B L H"], Float[Array, "B H"]]:
    """How an entering state reaches each token and the end: (d_BLH, a_BH), float32.

    ``ssd`` is affine in its initial state S0 (without ``max_state_norm_H``): y_t(S0) = y_t(0) + d_t · (C_t · S0)
    and final(S0) = a · S0 + final(0), with d_t = exp(Σ_{s<=t} Δ_s A) for tokens of the first document (0 after a
    boundary) and a = d_{L-1}. This is the per-shard piece of context-parallel state passing (paper §8.2).
    """
    acc = acc_dtype(dt_BLH.dtype)
    d_BLH = jnp.exp(jnp.cumsum(_log_decay(dt_BLH, A_H, decay_scale_H, acc), axis=1))
    if seq_idx_BL is not None:
        d_BLH = jnp.where((run_index(seq_idx_BL) == 0)[..., None], d_BLH, 0.0)
    return d_BLH, d_BLH[:, -1]


def _context_parallel(a: SSDInputs, axis_name: AxisName) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """State passing across the sequence shards on ``axis_name`` (paper §8.2; see the module docstring).

    Every shard runs ``_chunked`` from a zero state, then the per-shard (final(0), total decay) pairs are gathered
    (O(B·H·P·N), independent of L) and every shard folds them into the state that enters it and adds that state's
    contribution d_t · (C_t · S_in). Returns the local outputs and the global final state (every device).
    """
    x_BLHP, dt_BLH, A_H, _, C_BLGN, _, _, S0_BHPN, seq_idx_BL, decay_scale_H, _ = a
    Bsz, L, H, P = x_BLHP.shape
    G, N = C_BLGN.shape[2:]
    R = H // G
    acc = acc_dtype(x_BLHP.dtype)
    y0_BLHP, S_ext_BHPN = _chunked(a._replace(initial_state_BHPN=None))
    d_BLH, a_BH = initial_state_decay(dt_BLH, A_H, seq_idx_BL=seq_idx_BL, decay_scale_H=decay_scale_H)

    if seq_idx_BL is None:
        g_rB = jnp.ones((axis_size(axis_name), Bsz), acc)
    else:  # g_r = 1 iff shard r's first token continues the document of shard r-1's last token (shard 0: 1)
        ends_rB2 = gather_shards(jnp.stack([seq_idx_BL[:, 0], seq_idx_BL[:, -1]], axis=-1), axis_name)
        cont_rB = jnp.concatenate([jnp.ones_like(ends_rB2[:1, :, 0], bool),
                                   ends_rB2[1:, :, 0] == ends_rB2[:-1, :, 1]], axis=0)  # fmt: skip
        g_rB = cont_rB.astype(acc)
    S_ext_rBHPN = gather_shards(S_ext_BHPN.astype(acc), axis_name)
    a_rBH = gather_shards(a_BH.astype(acc), axis_name)
    S0_BHPN = jnp.zeros((Bsz, H, P, N), acc) if S0_BHPN is None else S0_BHPN.astype(acc)

    def fold(F_BHPN, inputs):  # F: true state after the previous shard; E: what actually enters this shard
        S_ext, a_BH_, g_B = inputs
        E_BHPN = g_B[:, None, None, None] * F_BHPN
        return a_BH_[:, :, None, None] * E_BHPN + S_ext, E_BHPN

    final_BHPN, E_rBHPN = lax.scan(fold, S0_BHPN, (S_ext_rBHPN, a_rBH, g_rB))
    E_BGRPN = E_rBHPN[axis_index(axis_name)].reshape(Bsz, G, R, P, N)
    corr_BLGRP = jnp.einsum("BLGN,BGRPN->BLGRP", C_BLGN.astype(acc), E_BGRPN)
    y_BLHP = y0_BLHP.astype(acc) + corr_BLGRP.reshape(Bsz, L, H, P) * d_BLH[..., None]
    return y_BLHP.astype(x_BLHP.dtype), final_BHPN


# ---- the entry point ------------------------------------------------------------------------------------------
def _check_call(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, *, impl=Impl.CHUNKED, axis_name=None, **options) -> None:
    SSDInputs(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, **options).check(impl, axis_name)


@validated_by(_check_call)
def ssd(
    x_BLHP: Float[Array, "B L H P"],
    dt_BLH: Float[Array, "B L H"],
    A_H: Float[Array, " H"],
    B_BLGN: Float[Array, "B L G N"],
    C_BLGN: Float[Array, "B L G N"],
    *,
    chunk_size: int,
    D_H: Float[Array, " H"] | None = None,
    initial_state_BHPN: Float[Array, "B H P N"] | None = None,
    seq_idx_BL: Int[Array, "B L"] | None = None,
    decay_scale_H: Float[Array, " H"] | None = None,
    max_state_norm_H: Float[Array, " H"] | None = None,
    impl: Impl | str = Impl.CHUNKED,
    axis_name: AxisName = None,
) -> tuple[Float[Array, "B L H P"], Float[Array, "B H P N"]]:
    """The SSD mixer: (y_BLHP in x's dtype, final_state_BHPN in float32). See the module docstring.

    ``dt_BLH`` is the positive step Δ (softplus and dt_bias already applied), ``A_H`` negative. Heads share B and C
    within a group: group g serves heads [g·H/G, (g+1)·H/G). ``D_H`` adds the skip D_h·x_t. With ``seq_idx_BL``
    (segment ids: every run of equal ids is a document) the initial state feeds the first document only and the
    final state is the last document's.

    ``impl="context_parallel"`` (call inside ``jax.shard_map``; the arrays are this device's sequence shard): chunked
    SSD per shard, then state passing over the mesh axis ``axis_name`` (None: one device); the final state is the
    whole sequence's, on every device. It refuses ``max_state_norm_H`` (clipping is not affine in the entering
    state). Only this impl takes ``axis_name``. On global arrays under a mesh use
    ``lcjax.ops.ssd_context_parallel.ssd_sharded``.
    """
    a = SSDInputs(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, initial_state_BHPN, seq_idx_BL, decay_scale_H,
                  max_state_norm_H)  # fmt: skip
    impl = Impl(impl)
    if impl is Impl.CONTEXT_PARALLEL:
        return _context_parallel(a, axis_name)
    return _naive(a) if impl is Impl.NAIVE else _chunked(a)


# ---- LongMamba token filtering ----------------------------------------------------------------------------------
def _interpolate_linear(v_HL: Float[Array, "H L"], size: int) -> Float[Array, "H S"]:
    """Resample the last axis to ``size`` points like ``torch.nn.functional.interpolate(mode="linear")``."""
    n = v_HL.shape[-1]
    src_S = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * (n / size) - 0.5, 0.0)
    lo_S = jnp.minimum(jnp.floor(src_S).astype(jnp.int32), n - 1)
    hi_S = jnp.minimum(lo_S + 1, n - 1)
    w_S = src_S - lo_S.astype(jnp.float32)
    return v_HL[:, lo_S] * (1.0 - w_S)[None, :] + v_HL[:, hi_S] * w_S[None, :]


def longmamba_calibrate(
    delta_BLH: Float[Array, "B L H"],
    A_H: Float[Array, " H"],
    *,
    target_lengths: Sequence[int],
    clamp_top: float | None = None,
) -> tuple[Float[Array, " H"], Float[Array, "n_lengths H"]]:
    """LongMamba calibration from the steps Δ of B samples of training length L: (decay_H, θ per target length, head).

    decay_h = exp(A_h · Σ_t Δ_ht) (heads with decay > c are "global"); for each target length T > L the threshold
    θ_h(T) keeps the largest Δ whose sum first exceeds the budget Σ_t Δ_ht: the descending sorted Δ is resampled
    to T points, θ = sorted[k + 1] with k the first index whose cumulative sum exceeds the budget (θ = 0, i.e. no
    filtering, for T <= L). ``clamp_top`` first clamps Δ to its ``clamp_top`` upper quantile (the released
    calibration scripts use 0.15-0.20). Both statistics are averaged over the samples.
    """
    require(len(target_lengths) > 0, f"longmamba_calibrate: target_lengths must be non-empty, got {target_lengths!r}")
    for t in target_lengths:
        require_int("longmamba_calibrate: target_lengths[i]", t, min=1)
    if clamp_top is not None:
        require_float("longmamba_calibrate: clamp_top", clamp_top, min=0.0, min_open=True, max=1.0)
    Bsz, L, H = delta_BLH.shape
    delta_BHL = jnp.moveaxis(delta_BLH.astype(jnp.float32), 1, 2)
    if clamp_top is not None:
        k = max(1, int(L * clamp_top))
        kth_BH = lax.top_k(delta_BHL, k)[0][..., -1]
        delta_BHL = jnp.minimum(delta_BHL, kth_BH[..., None])
    budget_BH = jnp.sum(delta_BHL, axis=-1)
    decay_H = jnp.mean(jnp.exp(A_H.astype(jnp.float32)[None, :] * budget_BH), axis=0)
    sorted_BHL = -jnp.sort(-delta_BHL, axis=-1)
    thresholds = []
    for T in target_lengths:
        if T <= L:
            thresholds.append(jnp.zeros((H,), jnp.float32))
            continue
        curve_BHT = jax.vmap(lambda v: _interpolate_linear(v, int(T)))(sorted_BHL)
        over_BHT = jnp.cumsum(curve_BHT, axis=-1) > budget_BH[..., None]
        k_BH = jnp.minimum(jnp.argmax(over_BHT, axis=-1) + 1, int(T) - 1)
        theta_BH = jnp.take_along_axis(curve_BHT, k_BH[..., None], axis=-1)[..., 0]
        thresholds.append(jnp.mean(theta_BH, axis=0))
    return decay_H, jnp.stack(thresholds)


def longmamba_filter(
    delta_BLH: Float[Array, "B L H"],
    global_H: Bool[Array, " H"],
    threshold_H: Float[Array, " H"],
) -> Float[Array, "B L H"]:
    """Δ'_ht = Δ_ht · 1[Δ_ht > θ_h] on global heads; local heads pass through unchanged (bit for bit).

    A filtered token has Δ' = 0: decay exp(0) = 1 and no write, so the state skips it.
    """
    keep_BLH = (delta_BLH > threshold_H.astype(delta_BLH.dtype)[None, None, :]) | ~global_H[None, None, :]
    return jnp.where(keep_BLH, delta_BLH, jnp.zeros_like(delta_BLH))


def nearest_length(lengths: Sequence[int], L: int) -> int:
    """Index of the calibrated length closest to L (the first one on ties), as LongMamba picks it."""
    return int(min(range(len(lengths)), key=lambda i: abs(L - lengths[i])))


__all__ = ["Impl", "SSDInputs", "ssd", "ssd_step", "initial_state_decay", "longmamba_calibrate", "longmamba_filter",
           "nearest_length"]  # fmt: skip
