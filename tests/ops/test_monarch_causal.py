"""Causal long convolutions: (a) the zero-padded FFT conv and (b) the causal Monarch parameterization.

(b) is checked three independent ways in float64: against the polynomial algebra it is derived from (numpy
polynomial products in the order-graded basis), against ``M⁻¹(M·u' ⊙ M·k')`` with the dense 2L × 2L Monarch ``M``
built from its factors (evaluation at the 2L-th roots of unity, then interpolation), and by its Jacobian.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ops import fftconv, monarch
from tolerances import F32_OP

cm_conv = jax.jit(fftconv.causal_monarch_conv, static_argnames="impl")


def basis_matrix(basis_l, basis_r, extended=False):
    """Column t = monomial coefficients of ``q_t(Z) = r_{n2}(Z) · ℓ^{(n2)}_{n1}(Z^{b2})``, t = b2·n1 + n2 (numpy)."""
    b2, h = basis_r.shape[0], basis_l.shape[1]
    al = np.tril(basis_l, -1) + np.eye(h)
    ar = np.tril(basis_r, -1) + np.eye(b2)
    rows = 2 * h if extended else h
    n = rows * b2
    q = np.zeros((n, n))
    for n1 in range(rows):
        for n2 in range(b2):
            ell = np.zeros(n)  # ℓ(Z^{b2}); the padded half (n1 >= h) uses the identity ℓ blocks: ℓ_{n1} = W^{n1}
            if n1 < h:
                ell[b2 * np.arange(h)] = al[n2][:, n1]
            else:
                ell[b2 * n1] = 1.0
            q[:, b2 * n1 + n2] = np.convolve(ell, ar[:, n2])[:n]  # degree < n: nothing is cut
    return q


def polynomial_reference(u, k, basis_l, basis_r):
    """q-coefficients of U·K truncated to L, with U = Σ u_t q_t (u: (L, D), float64)."""
    L = u.shape[0]
    q2 = basis_matrix(basis_l, basis_r, extended=True)
    pad = lambda a: np.concatenate([a, np.zeros_like(a)], 0)
    cu, ck = q2 @ pad(u), q2 @ pad(k)
    prod = np.stack([np.convolve(cu[:, d], ck[:, d])[: 2 * L] for d in range(u.shape[1])], 1)
    return np.linalg.solve(q2, prod)[:L]


@pytest.fixture
def basis(rng):
    h, b2 = fftconv.causal_monarch_shape(12)  # 12 = 3 · 4: b1 = 6, b2 = 4 (non-square)
    return 0.5 * rng.normal(size=(b2, h, h)), 0.5 * rng.normal(size=(b2, b2))


def test_causal_monarch_shape():
    assert fftconv.causal_monarch_shape(12) == (3, 4)  # 2L = 24 = 6 · 4: b1 = 6, b2 = 4 (non-square)
    assert fftconv.causal_monarch_shape(1024) == (32, 32)  # 2L = 2048 = 64 · 32
    assert fftconv.causal_monarch_shape(64, 8) == (8, 8)


def test_equals_polynomial_product(basis, rng):
    bl, br = basis
    u, k = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    with jax.enable_x64(True):
        out = cm_conv(u[None], k, bl, br, impl="monarch")[0]
        np.testing.assert_allclose(out, polynomial_reference(u, k, bl, br), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cm_conv(u[None], k, bl, br, impl="jnp_fft")[0], out,
                                   rtol=1e-10, atol=1e-10)  # fmt: skip


def test_is_monarch_evaluation_then_interpolation(basis, rng):
    bl, br = basis
    L, D = 12, 2
    u, k = rng.normal(size=(L, D)), rng.normal(size=(L, D))
    with jax.enable_x64(True):
        perm, w1, w2 = fftconv.causal_monarch_factors(bl, br, dtype=jnp.complex128)
        # M = F_{2L} · A_ext: evaluation of Σ x_t q_t(Z) at the 2L-th roots of unity
        x = rng.normal(size=(3, 2 * L))
        want = np.fft.fft(x @ basis_matrix(bl, br, extended=True).T)
        np.testing.assert_allclose(monarch.monarch_matmul(x[:, perm], w1, w2), want, rtol=1e-10, atol=1e-10)
        m = np.asarray(monarch.monarch_to_dense(w1, w2))[:, np.argsort(perm)]  # M x = monarch_matmul(x[perm])
        pad = lambda a: np.concatenate([a, np.zeros_like(a)], 0)
        y = np.linalg.solve(m, (m @ pad(u)) * (m @ pad(k)))[:L]  # M⁻¹(M u' ⊙ M k')
        assert np.max(np.abs(y.imag)) < 1e-10
        np.testing.assert_allclose(cm_conv(u[None], k, bl, br)[0], y.real, rtol=1e-10, atol=1e-10)


def test_inverse_and_monomial_basis(basis, rng):
    bl, br = (b.astype(np.float32) for b in basis)
    x = rng.normal(size=(2, 12, 3)).astype(np.float32)
    back = fftconv.basis_solve(fftconv.basis_apply(x, bl, br), bl, br)  # A⁻¹ A = I
    np.testing.assert_allclose(back, x, **F32_OP)
    for m in (1, 2, 3, 5, 8):  # the doubling inverse is exact for every block size
        raw = np.random.default_rng(m).normal(size=(2, m, m))
        with jax.enable_x64(True):
            np.testing.assert_allclose(fftconv.unit_lower_inverse(raw) @ (np.tril(raw, -1) + np.eye(m)),
                                       np.broadcast_to(np.eye(m), raw.shape), rtol=1e-12, atol=1e-12)  # fmt: skip
    k = rng.normal(size=(12, 3)).astype(np.float32)
    zero_l, zero_r = np.zeros_like(bl), np.zeros_like(br)  # monomial basis: exactly the causal FFT conv
    np.testing.assert_allclose(fftconv.causal_monarch_conv(x, k, zero_l, zero_r), fftconv.fftconv_naive(x, k), **F32_OP)


def _variants(bl, br):
    return {
        "a_fftconv_jnp": lambda u, k: fftconv.fftconv(u, k, impl="jnp_fft"),
        "a_fftconv_monarch": lambda u, k: fftconv.fftconv(u, k, impl="monarch"),
        "b_causal_monarch": lambda u, k: fftconv.causal_monarch_conv(u, k, bl, br),
    }


@pytest.mark.parametrize("variant", ["a_fftconv_jnp", "a_fftconv_monarch", "b_causal_monarch"])
def test_causality(variant, basis, rng):
    bl, br = basis
    L = 12
    k = rng.normal(size=(L, 1))
    with jax.enable_x64(True):
        op = _variants(bl, br)[variant]
        jac = np.asarray(jax.jit(jax.jacfwd(lambda u: op(u[None, :, None], k)[0, :, 0]))(rng.normal(size=(L,))))
        assert np.max(np.abs(np.triu(jac, 1))) <= 1e-12 * np.max(np.abs(jac))  # d y_t / d u_s = 0 for s > t
        assert np.min(np.abs(np.diag(jac))) > 0
    op = jax.jit(_variants(bl.astype(np.float32), br.astype(np.float32))[variant])
    u = rng.normal(size=(1, L, 1)).astype(np.float32)
    for t in range(L - 1):  # perturbing inputs after t never changes outputs <= t (f32)
        v = u.copy()
        v[:, t + 1 :] += rng.normal(size=v[:, t + 1 :].shape).astype(np.float32)
        np.testing.assert_allclose(op(v, k.astype(np.float32))[:, : t + 1], op(u, k.astype(np.float32))[:, : t + 1],
                                   **F32_OP)  # fmt: skip


def test_degree_graded_basis_is_not_causal(rng):
    """The guess "deg q_t = t" (a triangular basis in the other direction) breaks causality: order-grading is needed."""
    L, n = 6, 12
    c = np.triu(rng.normal(size=(n, n)), 1) + np.eye(n)  # column t: monomials Z^0..Z^t, so deg q_t = t
    k = rng.normal(size=(L,))

    def op(u):
        pad = lambda a: np.concatenate([a, np.zeros_like(a)])
        prod = np.convolve(c @ pad(u), c @ pad(k))[:n]
        return np.linalg.solve(c, prod)[:L]

    u = rng.normal(size=(L,))
    v = u.copy()
    v[-1] += 1.0
    assert np.max(np.abs(op(v)[: L - 1] - op(u)[: L - 1])) > 1e-3  # outputs before the change moved
