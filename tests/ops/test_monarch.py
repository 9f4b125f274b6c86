"""Monarch ops: matmul == its dense matrix, rank-1 projection, DFT as a Monarch product == FFT, long convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from lcjax.ops import fftconv, monarch
from tolerances import BF16, C64_FFT, F32_OP


def dense_reference(w1, w2):
    """``P2 · blockdiag(w2) · P1 · blockdiag(w1)`` from explicit permutation matrices (numpy, float64)."""
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    perm_matrix = lambda a, b: np.eye(a * b)[np.arange(a * b).reshape(a, b).T.reshape(-1)]  # (a b) -> (b a)
    return perm_matrix(l, s) @ scipy.linalg.block_diag(*w2) @ perm_matrix(r, l) @ scipy.linalg.block_diag(*w1)


SHAPES = [(4, 3, 5, 6, 7, 2), (8, 8, 8, 8, 8, 8), (2, 6, 3, 4, 5, 3), (1, 4, 4, 2, 3, 2), (3, 2, 2, 1, 5, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_monarch_matmul_equals_dense(shape, rng):
    k, q, p, l, s, r = shape
    w1, w2 = rng.normal(size=(k, q, p)), rng.normal(size=(l, s, r))
    x = rng.normal(size=(2, 3, k * p))
    ref = x @ dense_reference(w1, w2).T
    np.testing.assert_allclose(monarch.monarch_to_dense(w1.astype(np.float32), w2.astype(np.float32)),
                               dense_reference(w1, w2), **F32_OP)  # fmt: skip
    for impl in ("bmm", "dense"):
        out = monarch.monarch_matmul(x.astype(np.float32), w1.astype(np.float32), w2.astype(np.float32), impl=impl)
        assert out.shape == (2, 3, l * s)
        np.testing.assert_allclose(out, ref, **F32_OP)
    with jax.enable_x64(True):
        np.testing.assert_allclose(monarch.monarch_matmul(x, w1, w2), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(k=st.integers(1, 5), q=st.integers(1, 5), p=st.integers(1, 5), s=st.integers(1, 5), data=st.data())
def test_monarch_matmul_property(k, q, p, s, data):
    l = data.draw(st.sampled_from([d for d in range(1, k * q + 1) if (k * q) % d == 0]))
    r = k * q // l
    rng = np.random.default_rng(k * 1000 + q * 100 + p * 10 + s)
    w1, w2, x = rng.normal(size=(k, q, p)), rng.normal(size=(l, s, r)), rng.normal(size=(4, k * p))
    with jax.enable_x64(True):
        out = monarch.monarch_matmul(x, w1, w2)
        np.testing.assert_allclose(out, x @ dense_reference(w1, w2).T, rtol=1e-12, atol=1e-12)


def test_monarch_project_is_exact_and_optimal(rng):
    k, l, s, p = 4, 3, 5, 6
    w1, w2 = rng.normal(size=(k, l, p)), rng.normal(size=(l, s, k))
    m = dense_reference(w1, w2)
    with jax.enable_x64(True):
        pw1, pw2 = monarch.monarch_project(m, k=k, l=l)
        np.testing.assert_allclose(monarch.monarch_to_dense(pw1, pw2), m, rtol=1e-12, atol=1e-12)  # exact on Monarch
        noisy = m + 0.3 * rng.normal(size=m.shape)
        pw1, pw2 = monarch.monarch_project(noisy, k=k, l=l)
        best = np.linalg.norm(noisy - np.asarray(monarch.monarch_to_dense(pw1, pw2)))
        for _ in range(8):  # no perturbed Monarch does better than the projection
            d1 = np.asarray(pw1) + 0.05 * rng.normal(size=pw1.shape)
            d2 = np.asarray(pw2) + 0.05 * rng.normal(size=pw2.shape)
            assert best <= np.linalg.norm(noisy - dense_reference(d1, d2)) + 1e-12
        # the permuted DFT matrix is exactly Monarch: projecting it recovers it
        n = 64
        perm, _, _ = monarch.dft_monarch_factors(n, 8)
        dft = np.fft.fft(np.eye(n))[:, perm]
        pw1, pw2 = monarch.monarch_project(dft, k=8, l=8)
        np.testing.assert_allclose(monarch.monarch_to_dense(pw1, pw2), dft, rtol=1e-12, atol=1e-12)


FFT_CASES = [(16, None), (32, None), (64, 4), (256, 16), (1024, None), (2048, 16), (4096, 64), (4096, 8), (48, 6),
             (15, 3)]  # fmt: skip  (b1 = None: the largest divisor <= sqrt(n); 32 -> 4 x 8)
fft_jit = jax.jit(monarch.monarch_fft, static_argnums=1, static_argnames="inverse")
conv_jit = jax.jit(fftconv.fftconv, static_argnames=("impl", "b1"))


def _rel_err(x, ref):
    return np.max(np.abs(np.asarray(x, np.complex128) - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("n, b1", FFT_CASES)
def test_monarch_fft_equals_fft(n, b1, rng):
    x = (rng.normal(size=(3, n)) + 1j * rng.normal(size=(3, n))).astype(np.complex64)
    ref = np.fft.fft(x.astype(np.complex128))
    out = fft_jit(x, b1)
    assert out.dtype == jnp.complex64
    assert _rel_err(out, ref) <= C64_FFT["rtol"]
    assert _rel_err(out, np.asarray(jnp.fft.fft(x), np.complex128)) <= C64_FFT["rtol"]
    assert _rel_err(fft_jit(x, b1, inverse=True), np.fft.ifft(x.astype(np.complex128))) <= C64_FFT["rtol"]
    perm, w1, w2 = monarch.dft_monarch_factors(n, b1)  # the same product through monarch_matmul
    assert _rel_err(jax.jit(monarch.monarch_matmul)(jnp.asarray(x)[..., perm], w1, w2), ref) <= C64_FFT["rtol"]


def test_monarch_fft_float64_and_real_input(rng):
    x = rng.normal(size=(2, 96))
    with jax.enable_x64(True):
        out = monarch.monarch_fft(x)
        assert out.dtype == jnp.complex128
        np.testing.assert_allclose(out, np.fft.fft(x), rtol=1e-10, atol=1e-10)
        xc = x + 1j * rng.normal(size=x.shape)
        back = monarch.monarch_fft(monarch.monarch_fft(xc), inverse=True)
        np.testing.assert_allclose(back, xc, rtol=1e-10, atol=1e-10)


def test_bad_inputs_raise_value_error(rng):
    w1, w2 = np.ones((4, 3, 5), np.float32), np.ones((6, 7, 2), np.float32)
    with pytest.raises(ValueError, match="k·p"):
        monarch.monarch_matmul(np.ones((2, 21), np.float32), w1, w2)
    with pytest.raises(ValueError, match="l·r"):
        monarch.monarch_matmul(np.ones((2, 20), np.float32), w1, np.ones((5, 7, 2), np.float32))
    with pytest.raises(ValueError, match="impl"):
        monarch.monarch_matmul(np.ones((2, 20), np.float32), w1, w2, impl="fast")
    with pytest.raises(ValueError, match="b1"):
        monarch.monarch_fft(np.ones((16,), np.complex64), 3)
    with pytest.raises(ValueError, match="b1"):
        monarch.monarch_fft(np.ones((16,), np.complex64), 0)
    with pytest.raises(ValueError, match="k"):
        monarch.monarch_project(np.ones((6, 10)), k=3, l=2)
    u = np.ones((2, 8, 3), np.float32)
    with pytest.raises(ValueError, match="k has shape"):
        fftconv.fftconv(u, np.ones((7, 3), np.float32))
    with pytest.raises(ValueError, match="k_rev"):
        fftconv.fftconv(u, np.ones((8, 3), np.float32), k_rev_LD=np.ones((8, 2), np.float32))
    with pytest.raises(ValueError, match="impl"):
        fftconv.fftconv(u, np.ones((8, 3), np.float32), impl="cufft")
    with pytest.raises(ValueError, match="b2"):
        fftconv.causal_monarch_shape(12, 5)
    with pytest.raises(ValueError, match="h·b2"):
        fftconv.causal_monarch_conv(u, np.ones((8, 3), np.float32), np.zeros((2, 3, 3)), np.zeros((2, 2)))


def loop_conv(u, k, k_rev):
    """The convolution sums written as Python loops (float64): the formulas of ``lcjax.ops.fftconv``."""
    L = u.shape[-2]
    y = np.zeros_like(u)
    for t in range(L):
        for s in range(L):
            if s <= t:
                y[..., t, :] += k[t - s] * u[..., s, :]
            elif k_rev is not None:
                y[..., t, :] += k_rev[s - t - 1] * u[..., s, :]
    return y


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fftconv_paths_equal_direct_sum(bidirectional, rng):
    L, D = 12, 3
    u, k, k_rev = rng.normal(size=(2, L, D)), rng.normal(size=(L, D)), rng.normal(size=(L, D))
    k_rev = k_rev if bidirectional else None
    ref = loop_conv(u, k, k_rev)
    with jax.enable_x64(True):
        for impl in ("naive", "jnp_fft", "monarch"):
            np.testing.assert_allclose(conv_jit(u, k, k_rev_LD=k_rev, impl=impl), ref, rtol=1e-10, atol=1e-10)
    f32 = lambda a: None if a is None else a.astype(np.float32)
    for impl in ("naive", "jnp_fft", "monarch"):
        np.testing.assert_allclose(conv_jit(f32(u), f32(k), k_rev_LD=f32(k_rev), impl=impl), ref, **F32_OP)
    if bidirectional:  # k_rev[L-1] never contributes
        k_rev2 = k_rev.copy()
        k_rev2[-1] += 5.0
        np.testing.assert_array_equal(fftconv.fftconv_naive(f32(u), f32(k), f32(k_rev2)),
                                      fftconv.fftconv_naive(f32(u), f32(k), f32(k_rev)))  # fmt: skip


@pytest.mark.parametrize("L", [256, 1024])
def test_fftconv_long_f32(L, rng):
    u, k, k_rev = rng.normal(size=(1, L, 2)), rng.normal(size=(L, 2)) / np.sqrt(L), rng.normal(size=(L, 2)) / np.sqrt(L)
    with jax.enable_x64(True):
        ref = np.asarray(jax.jit(fftconv.fftconv_naive)(u, k, k_rev))
    f32 = lambda a: a.astype(np.float32)
    for impl in ("jnp_fft", "monarch"):
        np.testing.assert_allclose(conv_jit(f32(u), f32(k), k_rev_LD=f32(k_rev), impl=impl), ref, **F32_OP)


def test_fftconv_bf16_input_computes_in_f32(rng):
    u, k = rng.normal(size=(1, 16, 2)).astype(np.float32), rng.normal(size=(16, 2)).astype(np.float32)
    y = fftconv.fftconv(jnp.asarray(u, jnp.bfloat16), k)
    assert y.dtype == jnp.bfloat16
    ref = fftconv.fftconv_naive(jnp.asarray(u, jnp.bfloat16).astype(jnp.float32), k)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, **BF16)
