"""Monarch matrices: order-2 products of block-diagonal factors and permutations, and the DFT as one of them.

"Monarch: Expressive Structured Matrices for Efficient and Accurate Training", Dao et al. 2022,
https://arxiv.org/abs/2204.00595; "Monarch Mixer", Fu et al. 2023, https://arxiv.org/abs/2310.12109 (appendix: the
DFT as a Monarch product); FlashFFTConv, Fu et al. 2023, https://arxiv.org/abs/2311.05908. Layout and factor
convention checked against HazyResearch/fly ``src/ops/blockdiag_butterfly_multiply.py`` (copied into HazyResearch/m2
``bert/src/mm/``) and the rank-1 projection in ``bert/src/ops/blockdiag_butterfly_projection.py``.

**Factor convention (fly).** ``x`` has ``n = k·p`` entries; ``w1`` is ``(k, q, p)`` (k blocks, each q×p) and ``w2`` is
``(l, s, r)`` with ``l·r = k·q``. ``monarch_matmul`` computes ``M x`` with ``M = P2 · B2 · P1 · B1``:

1. ``B1 = blockdiag(w1)``: view ``x`` as ``(k, p)``, ``y[k, :] = w1[k] @ x[k, :]``, flatten to ``k·q``;
2. ``P1``: view as ``(r, l)`` and transpose to ``(l, r)`` (the reshape-transpose permutation);
3. ``B2 = blockdiag(w2)``: ``z[l, :] = w2[l] @ y[l, :]``;
4. ``P2``: view ``z`` as ``(l, s)``, transpose to ``(s, l)``, flatten to ``l·s`` outputs.

So ``w1`` is the paper's R and ``w2`` its L; each factor is one batched GEMM, ``2·n^{3/2}`` multiply-adds when all
blocks are ``√n × √n``. Block letters in this module are local to it (k, q, p, l, s, r as above); ``...`` is batch.

**DFT.** With ``ω_n = exp(-2πi/n)``, ``n = b1·b2``, input index ``t = b2·n1 + n2`` and output index
``f = k1 + b1·k2``: ``X[k1 + b1·k2] = Σ_{n2} ω_{b2}^{n2·k2} · ω_n^{n2·k1} · Σ_{n1} ω_{b1}^{n1·k1} x[b2·n1 + n2]``
(Cooley-Tukey), i.e. a Monarch product whose first factor has blocks ``diag(ω_n^{n2·k1}) F_{b1}`` (one per
``n2``: the twiddles) and whose second factor has ``b1`` copies of ``F_{b2}``; the input permutation is the
reshape-transpose ``(b1 b2) -> (b2 b1)``.
``monarch_fft`` runs exactly these two GEMM stages (shared DFT blocks plus an elementwise twiddle, the FlashFFTConv
form); ``dft_monarch_factors`` returns the same factors in the fly convention for ``monarch_matmul``.
"""

from __future__ import annotations

import enum
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax import checks
from lcjax.typing import Array, Int, Shaped

HIGHEST = jax.lax.Precision.HIGHEST
ArrayIn = Array | np.ndarray  # inputs may be numpy or jax arrays


class Impl(enum.StrEnum):
    """``monarch_matmul`` implementations: ``BMM`` (two batched GEMMs) or ``DENSE`` (the naive dense reference)."""

    BMM = "bmm"
    DENSE = "dense"


def _check_factors(w1, w2) -> tuple[int, int, int, int, int, int]:
    checks.require(w1.ndim == 3 and w2.ndim == 3,
                   f"monarch: w1 and w2 must be rank 3 (blocks, out, in); got shapes {w1.shape}, {w2.shape}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    checks.require(l * r == k * q, f"monarch: w2 of shape (l, s, r)={w2.shape} needs l·r = k·q = {k * q} "
                   f"(w1 shape (k, q, p)={w1.shape})")  # fmt: skip
    return k, q, p, l, s, r


def monarch_matmul(
    x: Shaped[ArrayIn, "*batch n"], w1: Shaped[ArrayIn, "k q p"], w2: Shaped[ArrayIn, "l s r"], *,
    impl: Impl | str = Impl.BMM, precision=HIGHEST,
) -> Shaped[Array, "*batch m"]:  # fmt: skip
    """``M x`` for the order-2 Monarch ``M = P2 B2 P1 B1`` (module docstring), over the last axis of ``x``.

    ``x``: ``(..., k·p)``; ``w1``: ``(k, q, p)``; ``w2``: ``(l, s, r)`` with ``l·r = k·q``. Returns ``(..., l·s)``.
    ``impl="dense"`` multiplies by ``monarch_to_dense(w1, w2)`` (the reference the tests compare to).
    """
    k, q, p, l, s, r = _check_factors(w1, w2)
    checks.require(x.ndim >= 1 and x.shape[-1] == k * p, f"monarch_matmul: x has shape {x.shape}; its last axis must "
                   f"have k·p={k * p} features for w1 {w1.shape}")  # fmt: skip
    impl = checks.require_choice("monarch_matmul: impl", impl, tuple(i.value for i in Impl))
    if Impl(impl) == Impl.DENSE:
        return jnp.einsum("...i,oi->...o", x, monarch_to_dense(w1, w2), precision=precision)
    batch = x.shape[:-1]
    y = jnp.einsum("...kp,kqp->...kq", x.reshape(*batch, k, p), w1, precision=precision)
    y = y.reshape(*batch, r, l)  # P1: view (r, l); the einsum reads it as (l, r)
    z = jnp.einsum("...rl,lsr->...sl", y, w2, precision=precision)  # B2, written straight into P2's (s, l) order
    return z.reshape(*batch, l * s)


def _reshape_transpose_perm(a: int, b: int) -> np.ndarray:
    """Index map of "view as (a, b), transpose to (b, a), flatten": ``out[i] = in[perm[i]]``."""
    return np.arange(a * b).reshape(a, b).T.reshape(-1)


def monarch_to_dense(w1: Shaped[ArrayIn, "k q p"], w2: Shaped[ArrayIn, "l s r"]) -> Shaped[Array, "m n"]:
    """The dense ``(l·s, k·p)`` matrix ``P2 · blockdiag(w2) · P1 · blockdiag(w1)`` built from its definition."""
    k, q, p, l, s, r = _check_factors(w1, w2)
    b1 = jax.scipy.linalg.block_diag(*[w1[i] for i in range(k)])  # (k·q, k·p)
    b2 = jax.scipy.linalg.block_diag(*[w2[i] for i in range(l)])  # (l·s, l·r)
    p1 = _reshape_transpose_perm(r, l)  # rows of P1 · B1 are rows of B1 taken in this order
    p2 = _reshape_transpose_perm(l, s)
    return (b2 @ b1[p1])[p2]


def monarch_project(m: Shaped[ArrayIn, "m n"], *, k: int, l: int
                    ) -> tuple[Shaped[Array, "k l p"], Shaped[Array, "l s k"]]:  # fmt: skip
    """The Frobenius-nearest Monarch matrix to the dense ``m`` (``(l·s, k·p)``), as factors ``(w1, w2)``.

    Closed form (Monarch paper, Thm. 1): with ``q = l`` and ``r = k``, entry ``M[(si, li), (ki, pi)] =
    w2[li, si, ki] · w1[ki, li, pi]``, so each of the ``l·k`` sub-blocks ``m[(:, li), (ki, :)]`` (an ``s × p``
    matrix) is rank 1 and owns its own factor entries. The best approximation is therefore the top singular pair of each
    sub-block; the projection is exact for Monarch inputs and optimal otherwise.
    """
    checks.require(m.ndim == 2, f"monarch_project: m must be a matrix, got shape {m.shape}")
    rows, cols = m.shape
    k = checks.require_int("monarch_project: k", k, min=1)
    l = checks.require_int("monarch_project: l", l, min=1)
    checks.require(cols % k == 0 and rows % l == 0,
                   f"monarch_project: need k | {cols} (columns) and l | {rows} (rows); got k={k}, l={l}")  # fmt: skip
    s, p = rows // l, cols // k
    blocks = m.reshape(s, l, k, p).transpose(1, 2, 0, 3)  # (l, k, s, p); rows are (si, li), columns (ki, pi)
    u, sv, vh = jnp.linalg.svd(blocks, full_matrices=False)
    root = jnp.sqrt(sv[..., 0])
    w2 = (u[..., :, 0] * root[..., None]).transpose(0, 2, 1)  # (l, s, k)
    w1 = (vh[..., 0, :] * root[..., None]).transpose(1, 0, 2)  # (k, l, p)
    return w1, w2


# ---- the DFT as a Monarch product ------------------------------------------------------------------------------
def default_b1(n: int) -> int:
    """The largest divisor of ``n`` not above ``√n`` (so ``b1 ≤ b2``; ``b1 = 1`` only for prime ``n``)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def _check_n_b1(n: int, b1: int | None, who: str) -> tuple[int, int]:
    n = checks.require_int(f"{who}: the transform length n", n, min=1)
    b1 = default_b1(n) if b1 is None else checks.require_int(f"{who}: b1", b1, min=1)
    checks.require(n % b1 == 0, f"{who}: b1={b1!r} must be a positive divisor of n={n}")
    return b1, n // b1


@functools.lru_cache(maxsize=64)
def _dft_blocks(n: int, b1: int, inverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``F_{b1}``, ``F_{b2}`` and the twiddles ``ω_n^{k1·n2}`` ``(b1, b2)``, complex128, conjugated if inverse."""
    b2 = n // b1
    sign = 1.0 if inverse else -1.0
    dft = lambda m: np.exp(sign * 2j * np.pi * np.outer(np.arange(m), np.arange(m)) / m)
    twiddle = np.exp(sign * 2j * np.pi * np.outer(np.arange(b1), np.arange(b2)) / n)
    return dft(b1), dft(b2), twiddle


def _complex_dtype(dtype) -> np.dtype:
    return jnp.result_type(dtype, jnp.complex64)


def monarch_dft(x: Shaped[ArrayIn, "*batch n c"], *, b1: int | None = None, inverse: bool = False, precision=HIGHEST
                ) -> Shaped[Array, "*batch n c"]:  # fmt: skip
    """The DFT along axis -2 of ``x`` (channels last), as the two Monarch GEMM stages of the module docstring.

    ``inverse=True`` conjugates every factor and divides by ``n`` (``jnp.fft.ifft``). The output is complex64 for
    f32/complex64 inputs and complex128 under x64.
    """
    n = x.shape[-2]
    b1, b2 = _check_n_b1(n, b1, "monarch_dft")
    cdt = _complex_dtype(x.dtype)
    f1, f2, tw = (jnp.asarray(a, cdt) for a in _dft_blocks(n, b1, inverse))
    batch, c = x.shape[:-2], x.shape[-1]
    x_ABC = x.astype(cdt).reshape(*batch, b1, b2, c)  # [n1, n2]: t = b2·n1 + n2
    tw = tw.reshape((1,) * len(batch) + tw.shape + (1,))
    y_KBC = jnp.einsum("kn,...nmc->...kmc", f1, x_ABC, precision=precision) * tw  # [k1, n2]
    z_JKC = jnp.einsum("jm,...kmc->...jkc", f2, y_KBC, precision=precision)  # [k2, k1]: f = k1 + b1·k2
    z = z_JKC.reshape(*batch, n, c)
    return z / n if inverse else z


def monarch_fft(x: Shaped[ArrayIn, "*batch n"], b1: int | None = None, *, inverse: bool = False, precision=HIGHEST
                ) -> Shaped[Array, "*batch n"]:  # fmt: skip
    """``jnp.fft.fft(x)`` along the last axis (``ifft`` if ``inverse``) computed as a Monarch product with twiddles.

    ``b1`` is the first block size (a divisor of ``n``; default: the largest divisor ≤ √n, so ``b1·b2 = n`` with
    ``b1 ≤ b2``). Cost: ``n·(b1 + b2)`` complex multiply-adds per transform instead of the dense ``n²``.
    """
    return monarch_dft(x[..., None], b1=b1, inverse=inverse, precision=precision)[..., 0]


def dft_monarch_factors(
    n: int, b1: int | None = None, *, inverse: bool = False, dtype=jnp.complex64
) -> tuple[Int[np.ndarray, " n"], Shaped[Array, "b2 b1 b1"], Shaped[Array, "b1 b2 b2"]]:
    """``(perm, w1, w2)`` with ``monarch_matmul(x[..., perm], w1, w2) == fft(x)`` (``ifft`` if ``inverse``).

    ``w1[n2] = diag_{k1}(ω_n^{n2·k1}) · F_{b1}`` (twiddles folded into the first factor), ``w2[k1] = F_{b2}``, and
    ``perm`` is the reshape-transpose ``(b1 b2) -> (b2 b1)``.
    """
    b1, b2 = _check_n_b1(n, b1, "dft_monarch_factors")
    f1, f2, tw = _dft_blocks(n, b1, inverse)
    w1 = tw.T[:, :, None] * f1[None]  # (b2, b1, b1): row k1 of block n2 scaled by ω^{n2·k1}
    w2 = np.broadcast_to(f2, (b1, b2, b2))
    if inverse:
        w2 = w2 / n
    return _reshape_transpose_perm(b1, b2), jnp.asarray(w1, dtype), jnp.asarray(w2, dtype)


def dft_flops(n: int, b1: int | None = None) -> int:
    """Real FLOPs of one complex ``monarch_fft`` of length ``n``: 8 per complex multiply-add, plus the twiddle."""
    b1, b2 = _check_n_b1(n, b1, "dft_flops")
    return 8 * n * (b1 + b2) + 6 * n


def monarch_flops(w1_shape: tuple[int, int, int], w2_shape: tuple[int, int, int]) -> int:
    """Real multiply-add FLOPs (2 per MAC) of one ``monarch_matmul`` matvec."""
    k, q, p = w1_shape
    l, s, r = w2_shape
    return 2 * (k * q * p + l * s * r)


__all__ = [
    "Impl", "monarch_matmul", "monarch_to_dense", "monarch_project", "default_b1", "monarch_dft", "monarch_fft",
    "dft_monarch_factors", "dft_flops", "monarch_flops",
]  # fmt: skip
