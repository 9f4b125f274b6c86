"""Long convolutions for Monarch Mixer / Hyena: causal, bidirectional (as released in M2-BERT) and causal Monarch.

"Monarch Mixer", Fu et al. 2023, https://arxiv.org/abs/2310.12109 (§5: causal Monarch via polynomial evaluation and
interpolation); "Hyena Hierarchy", Poli et al. 2023, https://arxiv.org/abs/2302.10866. Released form checked against
HazyResearch/m2 ``bert/src/mm/hyena_utils.py`` (``HyenaFilter.forward``, ``fftconv_ref``).
Dimension key (lcjax/typing.py): B batch, L length, D channels.

**Causal** (``k_rev=None``): ``y[t] = Σ_{s≤t} k[t−s]·u[s]``, computed with a length-2L FFT (nothing wraps around).
**Bidirectional** (``k_rev`` given, the released form): the 2L kernel ``[k, 0_L] + [0_L, flip(k_rev)]`` gives
``y[t] = Σ_{s≤t} k[t−s]·u[s] + Σ_{s>t} k_rev[s−t−1]·u[s]`` (``k_rev[L−1]`` never contributes).
``impl``: ``naive`` (the dense Toeplitz sum, O(L²) — the reference), ``jnp_fft`` (``rfft``/``irfft``) or ``monarch``
(the DFT as a Monarch product, ``lcjax.ops.monarch.monarch_dft``: GEMMs instead of an FFT). The FFT runs in float32
(float64 under x64) whatever the input dtype, as upstream does; the result is cast back to ``u``'s dtype.

**Causal Monarch** (``causal_monarch_conv``, our derivation of the paper's §5; no public code exists). Let
``n = 2L = b1·b2`` with ``b1 = 2h`` even, so ``L = h·b2``; index inputs as ``t = b2·n1 + n2`` and write ``u`` as the
polynomial ``U(Z) = Σ_t u_t q_t(Z)`` in the basis ``q_t(Z) = r_{n2}(Z) · ℓ^{(n2)}_{n1}(Z^{b2})`` (Kronecker
substitution of a bivariate basis). An order-2 Monarch matrix ``M`` (2L × 2L) *evaluates* ``U`` at ``2L`` points:
its first factor evaluates the ``ℓ`` polynomials (one block per ``n2``) at points ``w_{k1}``, its second the ``r``
polynomials at the ``b2``-th roots ``z`` of each ``w_{k1}`` (``z^{b2} = w_{k1}``). ``M⁻¹`` interpolates, so
``M⁻¹(M u' ⊙ M k')`` is the ``q``-coefficient vector of ``U·K`` modulo the points' vanishing polynomial.

Causality holds when (i) ``q_t`` has *order* ``t`` (its lowest monomial is ``Z^t``: ``r_{n2}`` starts at ``Z^{n2}``,
``ℓ_{n1}`` at ``W^{n1}``), and (ii) for ``t < L`` its degree is below ``L`` (``r`` has degree < b2, ``ℓ_{n1}`` for
``n1 < h`` degree < h), and (iii) ``u, k`` are zero-padded to ``2L`` and the output truncated to ``L``. Proof: by
(ii) ``deg U·K ≤ 2L − 2 < 2L``, so the reduction modulo the vanishing polynomial does nothing and
``M⁻¹(Mu' ⊙ Mk')`` is exactly the expansion of the product ``U·K``; the term ``u_i k_j q_i q_j`` has order
``i + j`` and, since ``{q_s}`` is order-graded (triangular), its expansion only touches ``q_s`` with
``s ≥ i + j``. So output ``s`` depends on ``u_i, k_j`` with ``i + j ≤ s`` only: a causal bilinear map, like a
convolution. Degree-graded bases (``deg q_t = t``, the condition one might guess) are **not** enough:
``q_1 = Z + a``, ``q_2 = Z² + bZ + c`` make output 0 depend on ``u_1`` (``tests/ops/test_monarch_causal.py`` checks
such a counter-example numerically).

In coefficient form: with ``A`` the (lower-triangular) matrix of monomial coefficients of the ``q_t``, and roots of
unity as evaluation points (``M = F_{2L} · A``, well conditioned; general points give Vandermonde blocks that are
not), the map is ``y = A⁻¹ · causal_conv(A·u, A·k)``. ``A[(s1,s2),(n1,n2)] = Al[n2][s1,n1] · Ar[s2,n2]`` is
itself a product of two block-diagonal factors (``Al``: ``b2`` unit lower-triangular ``h × h`` blocks; ``Ar``: one unit
lower-triangular ``b2 × b2`` block shared by all ``s1``), so ``A``, ``A⁻¹`` cost ``O(L·(h + b2))`` per channel and
the whole map stays sub-quadratic. With ``Al = Ar = I`` (the monomial basis) it *is* the causal FFT convolution.
``causal_monarch_factors`` returns the 2L × 2L Monarch factors of ``M = F_{2L} · A`` in the fly convention.
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax import checks
from lcjax.ops import monarch as monarch_ops
from lcjax.typing import Array, Float, Int, Shaped

HIGHEST = jax.lax.Precision.HIGHEST
ArrayIn = Array | np.ndarray  # inputs may be numpy or jax arrays


class Impl(enum.StrEnum):
    NAIVE = "naive"
    JNP_FFT = "jnp_fft"
    MONARCH = "monarch"


def _compute_dtype(*dtypes) -> np.dtype:
    return jnp.dtype(jnp.float64 if jnp.float64 in [jnp.dtype(d) for d in dtypes] else jnp.float32)


def _check_inputs(u, k, name: str) -> None:
    for arg, x in (("u", u), (name, k)):
        checks.require(hasattr(x, "shape") and hasattr(x, "dtype"), f"fftconv: {arg} must be an array, got "
                       f"{type(x).__name__}")  # fmt: skip
    checks.require(u.ndim >= 2 and u.shape[-2] >= 1, f"fftconv: u must be (..., L, D) with L >= 1, got shape {u.shape}")
    checks.require(k.shape == u.shape[-2:],
                   f"fftconv: {name} has shape {k.shape}; it must be (L, D) = {u.shape[-2:]} like u's last axes")


def bidirectional_kernel(k_LD: Float[ArrayIn, "L D"], k_rev_LD: Float[ArrayIn, "L D"]) -> Float[Array, "L2 D"]:
    """The released length-2L kernel ``[k, 0] + [0, flip(k_rev)]`` (HyenaFilter.forward, bidirectional)."""
    zeros = jnp.zeros_like(k_LD)
    return jnp.concatenate([k_LD, zeros], axis=0) + jnp.concatenate([zeros, k_rev_LD[::-1]], axis=0)


def fftconv_naive(
    u_BLD: Float[ArrayIn, "*B L D"], k_LD: Float[ArrayIn, "Lk Dk"], k_rev_LD: Float[ArrayIn, "Lr Dr"] | None = None
) -> Float[Array, "*B L D"]:
    """The dense Toeplitz sum of the module docstring (O(L²·D) memory and time): the reference."""
    _check_inputs(u_BLD, k_LD, "k")
    L = u_BLD.shape[-2]
    lag_TS = np.arange(L)[:, None] - np.arange(L)[None, :]  # t - s
    toeplitz_TSD = jnp.where((lag_TS >= 0)[..., None], k_LD[np.clip(lag_TS, 0, None)], 0)
    if k_rev_LD is not None:
        _check_inputs(u_BLD, k_rev_LD, "k_rev")
        toeplitz_TSD = toeplitz_TSD + jnp.where((lag_TS < 0)[..., None], k_rev_LD[np.clip(-lag_TS - 1, 0, None)], 0)
    return jnp.einsum("tsd,...sd->...td", toeplitz_TSD, u_BLD, precision=HIGHEST)


def fftconv(
    u_BLD: Float[ArrayIn, "*B L D"], k_LD: Float[ArrayIn, "Lk Dk"], *, k_rev_LD: Float[ArrayIn, "Lr Dr"] | None = None,
    impl: Impl | str = Impl.JNP_FFT, b1: int | None = None,
) -> Float[Array, "*B L D"]:  # fmt: skip
    """Per-channel long convolution of ``u`` (``(..., L, D)``) with ``k`` (``(L, D)``), causal or bidirectional.

    ``k_rev_LD=None``: causal, zero-padded to 2L. Otherwise the released bidirectional form (module docstring).
    ``impl``: ``"naive" | "jnp_fft" | "monarch"``; ``b1`` picks the Monarch block size of the length-2L DFT.
    """
    impl = Impl(checks.require_choice("fftconv: impl", impl, tuple(i.value for i in Impl)))
    _check_inputs(u_BLD, k_LD, "k")
    if k_rev_LD is not None:
        _check_inputs(u_BLD, k_rev_LD, "k_rev")
    checks.require_optional_int("fftconv: b1", b1, min=1)
    out_dtype = u_BLD.dtype
    dt = _compute_dtype(u_BLD.dtype, k_LD.dtype)
    u_BLD, k_LD = u_BLD.astype(dt), k_LD.astype(dt)
    k_rev_LD = None if k_rev_LD is None else k_rev_LD.astype(dt)
    if impl == Impl.NAIVE:
        return fftconv_naive(u_BLD, k_LD, k_rev_LD).astype(out_dtype)
    L = u_BLD.shape[-2]
    n = 2 * L
    lead = (1,) * (u_BLD.ndim - 2)  # explicit broadcasting of the kernel over batch dims
    k_ND = jnp.pad(k_LD, ((0, L), (0, 0))) if k_rev_LD is None else bidirectional_kernel(k_LD, k_rev_LD)
    if impl == Impl.JNP_FFT:
        u_f = jnp.fft.rfft(u_BLD, n=n, axis=-2)
        k_f = jnp.fft.rfft(k_ND, n=n, axis=0).reshape(lead + (n // 2 + 1, -1))
        y_BND = jnp.fft.irfft(u_f * k_f, n=n, axis=-2)
    else:
        pad = [(0, 0)] * (u_BLD.ndim - 2) + [(0, L), (0, 0)]
        u_f = monarch_ops.monarch_dft(jnp.pad(u_BLD, pad), b1=b1)
        k_f = monarch_ops.monarch_dft(k_ND, b1=b1).reshape(lead + (n, -1))
        y_BND = monarch_ops.monarch_dft(u_f * k_f, b1=b1, inverse=True).real
    return y_BND[..., :L, :].astype(out_dtype)


# ---- the causal Monarch parameterization (module docstring) ---------------------------------------------------
def causal_monarch_shape(length: int, b2: int | None = None) -> tuple[int, int]:
    """``(h, b2)`` with ``h·b2 = length`` for the 2L-point Monarch ``b1 = 2h``; default: ``b2 ≈ √L`` (the divisor
    minimising ``h + b2``, the per-channel cost of ``A``; ties go to the larger ``b2``)."""
    length = checks.require_int("causal_monarch_shape: length", length, min=1)
    b2 = checks.require_optional_int("causal_monarch_shape: b2", b2, min=1)
    if b2 is None:
        divisors = [d for d in range(1, length + 1) if length % d == 0]
        b2 = min(divisors, key=lambda d: (length // d + d, -d))
    checks.require(length % b2 == 0, f"causal_monarch_shape: b2={b2} must be a positive divisor of the length {length}")
    return length // b2, b2


def unit_lower(raw: Float[ArrayIn, "*G m m"]) -> Float[Array, "*G m m"]:
    """``I + strictly_lower(raw)``: the unit lower-triangular matrices the basis parameters stand for."""
    m = raw.shape[-1]
    return jnp.tril(raw, -1) + jnp.broadcast_to(jnp.eye(m, dtype=raw.dtype), raw.shape)


def unit_lower_inverse(raw: Float[ArrayIn, "*G m m"]) -> Float[Array, "*G m m"]:
    """``unit_lower(raw)⁻¹`` exactly, by doubling: with ``X = −strictly_lower(raw)`` (nilpotent, ``X^m = 0``),
    ``(I − X)⁻¹ = Σ_{k<m} X^k = Π_{j<⌈log2 m⌉} (I + X^{2^j})`` — ``2⌈log2 m⌉`` batched GEMMs (XLA:CPU's
    ``solve_triangular`` was ~30x slower on these small blocks)."""
    m = raw.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(m, dtype=raw.dtype), raw.shape)
    x = -jnp.tril(raw, -1)
    inv, power = eye + x, x
    for _ in range(max(math.ceil(math.log2(m)), 1) - 1):
        power = jnp.matmul(power, power, precision=HIGHEST)
        inv = jnp.matmul(inv, eye + power, precision=HIGHEST)
    return inv


def _check_basis(L: int, basis_l, basis_r) -> tuple[int, int]:
    checks.require(basis_r.ndim == 2 and basis_r.shape[0] == basis_r.shape[1],
                   f"causal_monarch: basis_r must be square (b2, b2), got {basis_r.shape}")  # fmt: skip
    b2 = basis_r.shape[0]
    checks.require(basis_l.ndim == 3 and basis_l.shape[0] == b2 and basis_l.shape[1] == basis_l.shape[2],
                   f"causal_monarch: basis_l must be (b2, h, h) with b2={b2}, got {basis_l.shape}")  # fmt: skip
    h = basis_l.shape[1]
    checks.require(h * b2 == L, f"causal_monarch: the sequence length {L} must equal h·b2 = {h}·{b2} = {h * b2}")
    return h, b2


def basis_apply(x_BLD: Float[ArrayIn, "*B L D"], basis_l: Float[ArrayIn, "b2 h h"], basis_r: Float[ArrayIn, "b2 b2"]
                ) -> Float[Array, "*B L D"]:  # fmt: skip
    """``c = A·x``: the monomial coefficients of ``Σ_t x_t q_t(Z)`` (two block-diagonal GEMM stages)."""
    h, b2 = _check_basis(x_BLD.shape[-2], basis_l, basis_r)
    al, ar = unit_lower(basis_l), unit_lower(basis_r)
    batch, D = x_BLD.shape[:-2], x_BLD.shape[-1]
    x_HMD = x_BLD.reshape(*batch, h, b2, D)  # [n1, n2]
    y_KMD = jnp.einsum("mkn,...nmd->...kmd", al.astype(x_BLD.dtype), x_HMD, precision=HIGHEST)  # [s1, n2]
    c_KJD = jnp.einsum("jm,...kmd->...kjd", ar.astype(x_BLD.dtype), y_KMD, precision=HIGHEST)  # [s1, s2]
    return c_KJD.reshape(*batch, h * b2, D)


def basis_solve(c_BLD: Float[ArrayIn, "*B L D"], basis_l: Float[ArrayIn, "b2 h h"], basis_r: Float[ArrayIn, "b2 b2"]
                ) -> Float[Array, "*B L D"]:  # fmt: skip
    """``x = A⁻¹·c`` (the inverse stages in reverse order; unit triangular, so always invertible)."""
    h, b2 = _check_basis(c_BLD.shape[-2], basis_l, basis_r)
    dt = c_BLD.dtype
    al_inv, ar_inv = unit_lower_inverse(basis_l.astype(dt)), unit_lower_inverse(basis_r.astype(dt))
    batch, D = c_BLD.shape[:-2], c_BLD.shape[-1]
    c_KJD = c_BLD.reshape(*batch, h, b2, D)  # [s1, s2]
    y_KMD = jnp.einsum("mj,...kjd->...kmd", ar_inv, c_KJD, precision=HIGHEST)  # [s1, n2]
    x_NMD = jnp.einsum("mnk,...kmd->...nmd", al_inv, y_KMD, precision=HIGHEST)  # [n1, n2]
    return x_NMD.reshape(*batch, h * b2, D)


def causal_monarch_conv(
    u_BLD: Float[ArrayIn, "*B L D"], k_LD: Float[ArrayIn, "Lk Dk"], basis_l: Float[ArrayIn, "b2 h h"],
    basis_r: Float[ArrayIn, "b2 b2"], *, impl: Impl | str = Impl.JNP_FFT,
) -> Float[Array, "*B L D"]:  # fmt: skip
    """``M⁻¹(M·[u, 0] ⊙ M·[k, 0])[:L]`` for the causal Monarch ``M = F_{2L}·A`` (module docstring), per channel.

    ``basis_l`` ``(b2, h, h)`` and ``basis_r`` ``(b2, b2)`` hold the strictly-lower parts of the unit
    lower-triangular basis factors (zeros = the monomial basis = the causal FFT conv); ``L = h·b2``. ``impl`` is
    the inner length-2L convolution's (``causal_monarch_shape`` picks ``h, b2``).
    """
    _check_inputs(u_BLD, k_LD, "k")
    dt = _compute_dtype(u_BLD.dtype, k_LD.dtype)
    cu_BLD = basis_apply(u_BLD.astype(dt), basis_l, basis_r)
    ck_LD = basis_apply(k_LD.astype(dt), basis_l, basis_r)
    cy_BLD = fftconv(cu_BLD, ck_LD, impl=impl)
    return basis_solve(cy_BLD, basis_l, basis_r).astype(u_BLD.dtype)


def causal_monarch_factors(
    basis_l: Float[ArrayIn, "b2 h h"], basis_r: Float[ArrayIn, "b2 b2"], *, dtype=jnp.complex64
) -> tuple[Int[np.ndarray, " n"], Shaped[Array, "b2 b1 b1"], Shaped[Array, "b1 b2 b2"]]:
    """``(perm, w1, w2)`` with ``monarch_matmul(x[..., perm], w1, w2) == F_{2L} · A_ext · x`` for ``x`` of length 2L.

    ``A_ext`` extends ``A`` to the padded half with identity ``ℓ`` blocks (``Al_ext[n2] = blockdiag(Al[n2], I_h)``).
    Block ``n2`` of ``w1`` is ``F_{b1} · Al_ext[n2]``; block ``k1`` of ``w2`` is
    ``F_{b2} · diag_{s2}(ω_{2L}^{k1·s2}) · Ar`` — the polynomial-evaluation Monarch of the module docstring at the
    2L-th roots of unity.
    """
    h, b2 = basis_l.shape[1], basis_r.shape[0]
    _check_basis(h * b2, basis_l, basis_r)
    b1, n = 2 * h, 2 * h * b2
    f1, f2, tw = (jnp.asarray(a, dtype) for a in monarch_ops._dft_blocks(n, b1, False))
    al = unit_lower(basis_l).astype(dtype)
    al_ext = jnp.zeros((b2, b1, b1), dtype).at[:, :h, :h].set(al).at[:, h:, h:].set(jnp.eye(h, dtype=dtype))
    w1 = jnp.einsum("kj,mjn->mkn", f1, al_ext)  # (b2, b1, b1)
    w2 = jnp.einsum("ij,kj,jm->kim", f2, tw, unit_lower(basis_r).astype(dtype))  # (b1, b2, b2)
    return monarch_ops._reshape_transpose_perm(b1, b2), w1, w2


__all__ = [
    "Impl", "fftconv", "fftconv_naive", "bidirectional_kernel", "causal_monarch_shape", "unit_lower",
    "unit_lower_inverse", "basis_apply",
    "basis_solve", "causal_monarch_conv", "causal_monarch_factors",
]  # fmt: skip
