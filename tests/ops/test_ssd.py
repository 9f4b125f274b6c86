"""lcjax.ops.ssd and lcjax.ops.conv: chunked == naive == a float64 dense oracle, packing, states, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcjax.ops import conv as conv_ops
from lcjax.ops import ssd as ssd_ops
from tolerances import BF16, EXACT, F32_OP


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def run_ssd(x, dt, A, B, C, *, chunk_size, impl="chunked", **optional):
    """``ssd`` under one jit per shape (eager dispatch of every op is far slower on CPU)."""
    return ssd_ops.ssd(x, dt, A, B, C, chunk_size=chunk_size, impl=impl, **optional)


conv = jax.jit(conv_ops.causal_conv1d)


def make_inputs(rng, Bsz=2, L=19, H=4, P=3, G=2, N=5, dtype=np.float32):
    x = rng.normal(size=(Bsz, L, H, P))
    dt = np.log1p(np.exp(rng.normal(size=(Bsz, L, H)) - 1.0))  # softplus: positive
    A = -np.exp(rng.uniform(-1.0, 1.0, size=(H,)))
    B, C = rng.normal(size=(2, Bsz, L, G, N))
    return [jnp.asarray(a, dtype) for a in (x, dt, A, B, C)]


def dense_oracle(x, dt, A, B, C, *, D=None, S0=None, seq_idx=None):
    """float64 numpy: y_t = Σ_{s<=t, same doc} (C_t·B_s) exp(Σ_{s<k<=t} Δ_k A) Δ_s x_s + initial-state term."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    Bsz, L, H, P = x.shape
    G, N = B.shape[2:]
    seg = np.zeros((Bsz, L), int) if seq_idx is None else np.concatenate(
        [np.zeros((Bsz, 1), int), np.cumsum(np.diff(np.asarray(seq_idx), axis=1) != 0, axis=1)], axis=1)
    a = dt * A  # (B, L, H)
    y = np.zeros_like(x)
    final = np.zeros((Bsz, H, P, N))
    for b in range(Bsz):
        for h in range(H):
            g = h // (H // G)
            for t in range(L):
                for s in range(t + 1):
                    if seg[b, s] == seg[b, t]:
                        w = (C[b, t, g] @ B[b, s, g]) * np.exp(a[b, s + 1 : t + 1, h].sum()) * dt[b, s, h]
                        y[b, t, h] += w * x[b, s, h]
                if S0 is not None and seg[b, t] == 0:
                    y[b, t, h] += np.exp(a[b, : t + 1, h].sum()) * (np.asarray(S0, np.float64)[b, h] @ C[b, t, g])
            last = seg[b] == seg[b, -1]
            for s in np.flatnonzero(last):
                final[b, h] += np.exp(a[b, s + 1 :, h].sum()) * dt[b, s, h] * np.outer(x[b, s, h], B[b, s, g])
            if S0 is not None and seg[b, -1] == 0:
                final[b, h] += np.exp(a[b, :, h].sum()) * np.asarray(S0, np.float64)[b, h]
    if D is not None:
        y += np.asarray(D, np.float64)[None, None, :, None] * x
    return y, final


def random_seq_idx(rng, Bsz, L, n_docs):
    out = np.zeros((Bsz, L), np.int32)
    for b in range(Bsz):
        cuts = np.sort(rng.choice(np.arange(1, L), size=min(n_docs - 1, L - 1), replace=False)) if L > 1 else []
        for c in cuts:
            out[b, c:] += 1
    return jnp.asarray(out)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_matches_float64_dense_oracle(rng, impl):
    x, dt, A, B, C = make_inputs(rng, L=13)
    D = jnp.asarray(rng.normal(size=4), jnp.float32)
    S0 = jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32)
    seq = jnp.asarray([[0] * 4 + [1] * 2 + [2] * 7, [3] * 13], jnp.int32)
    y, final = run_ssd(x, dt, A, B, C, chunk_size=4, D_H=D, initial_state_BHPN=S0, seq_idx_BL=seq, impl=impl)
    y_ref, final_ref = dense_oracle(x, dt, A, B, C, D=D, S0=S0, seq_idx=seq)
    np.testing.assert_allclose(y, y_ref, **F32_OP)
    np.testing.assert_allclose(final, final_ref, **F32_OP)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    Bsz=st.integers(1, 2), L=st.integers(1, 40), groups_heads=st.sampled_from([(1, 1), (1, 3), (2, 2), (2, 4)]),
    P=st.integers(1, 4), N=st.integers(1, 5), Q=st.integers(1, 16), n_docs=st.integers(0, 4),
    with_S0=st.booleans(), with_D=st.booleans(), long_context=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_chunked_equals_naive(Bsz, L, groups_heads, P, N, Q, n_docs, with_S0, with_D, long_context, seed):
    rng = np.random.default_rng(seed)
    G, H = groups_heads
    x, dt, A, B, C = make_inputs(rng, Bsz, L, H, P, G, N)
    kw = dict(chunk_size=Q)
    if n_docs:
        kw["seq_idx_BL"] = random_seq_idx(rng, Bsz, L, n_docs)
    if with_S0:
        kw["initial_state_BHPN"] = jnp.asarray(rng.normal(size=(Bsz, H, P, N)), jnp.float32)
    if with_D:
        kw["D_H"] = jnp.asarray(rng.normal(size=H), jnp.float32)
    if long_context:  # Stuffed Mamba: extra forgetting and per-chunk state-norm clipping
        kw["decay_scale_H"] = jnp.asarray(rng.uniform(0.8, 1.0, size=H), jnp.float32)
        kw["max_state_norm_H"] = jnp.asarray(rng.uniform(0.5, 3.0, size=H), jnp.float32)
    y_n, f_n = run_ssd(x, dt, A, B, C, impl="naive", **kw)
    y_c, f_c = run_ssd(x, dt, A, B, C, impl="chunked", **kw)
    np.testing.assert_allclose(y_c, y_n, **F32_OP)
    np.testing.assert_allclose(f_c, f_n, **F32_OP)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_packed_equals_separate_runs(rng, impl):
    lengths = (5, 11, 13)  # not aligned to the chunk size 8
    x, dt, A, B, C = make_inputs(rng, Bsz=1, L=sum(lengths))
    S0 = jnp.asarray(rng.normal(size=(1, 4, 3, 5)), jnp.float32)
    seq = jnp.asarray([np.repeat([7, 2, 9], lengths)], jnp.int32)  # ids need not be sorted, only change
    y, final = run_ssd(x, dt, A, B, C, chunk_size=8, initial_state_BHPN=S0, seq_idx_BL=seq, impl=impl)
    start = 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        y_i, f_i = run_ssd(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size=8, impl=impl,
                           initial_state_BHPN=S0 if i == 0 else None)  # fmt: skip
        np.testing.assert_allclose(y[:, sl], y_i, **F32_OP)
        start += n
    np.testing.assert_allclose(final, f_i, **F32_OP)  # the last document's state

    def loss(x, dt, B, C):
        y, f = ssd_ops.ssd(x, dt, A, B, C, chunk_size=8, initial_state_BHPN=S0, seq_idx_BL=seq, impl=impl)
        return jnp.sum(y**2) + jnp.sum(f**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, dt, B, C)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_prefix_state_continues_suffix(rng):
    x, dt, A, B, C = make_inputs(rng, L=29)
    y, final = run_ssd(x, dt, A, B, C, chunk_size=8)
    y1, s1 = run_ssd(x[:, :12], dt[:, :12], A, B[:, :12], C[:, :12], chunk_size=8)
    y2, s2 = run_ssd(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], chunk_size=8, initial_state_BHPN=s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, **F32_OP)
    np.testing.assert_allclose(s2, final, **F32_OP)


def test_step_equals_scan(rng):
    x, dt, A, B, C = make_inputs(rng, L=6)
    D = jnp.asarray(rng.normal(size=4), jnp.float32)
    y, final = run_ssd(x, dt, A, B, C, chunk_size=4, D_H=D)
    S = jnp.zeros((2, 4, 3, 5), jnp.float32)
    for t in range(6):
        y_t, S = ssd_ops.ssd_step(S, x[:, t], dt[:, t], A, B[:, t], C[:, t], D_H=D)
        np.testing.assert_allclose(y_t, y[:, t], **F32_OP)
    np.testing.assert_allclose(S, final, **F32_OP)


def test_initial_state_decay_is_the_affine_response(rng):
    """The context-parallel building block: y(S0) - y(0) = d_t·(C_t·S0), final(S0) - final(0) = a·S0."""
    x, dt, A, B, C = make_inputs(rng, L=21)
    seq = jnp.asarray([[0] * 21, [0] * 9 + [1] * 12], jnp.int32)
    S0 = jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32)
    y0, f0 = run_ssd(x, dt, A, B, C, chunk_size=8, seq_idx_BL=seq)
    y1, f1 = run_ssd(x, dt, A, B, C, chunk_size=8, seq_idx_BL=seq, initial_state_BHPN=S0)
    d_BLH, a_BH = jax.jit(ssd_ops.initial_state_decay)(dt, A, seq_idx_BL=seq)
    CS_BLHP = jnp.einsum("BLGN,BGRPN->BLGRP", C, S0.reshape(2, 2, 2, 3, 5)).reshape(2, 21, 4, 3)
    np.testing.assert_allclose(y1 - y0, d_BLH[..., None] * CS_BLHP, **F32_OP)
    np.testing.assert_allclose(f1 - f0, a_BH[:, :, None, None] * S0, **F32_OP)
    assert float(jnp.max(jnp.abs(a_BH[1]))) == 0.0  # a boundary: nothing of S0 reaches the end


def test_gradients_chunked_equal_naive(rng):
    x, dt, A, B, C = make_inputs(rng, L=11)
    S0 = jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32)

    def loss(impl, *args):
        y, f = ssd_ops.ssd(*args, chunk_size=4, initial_state_BHPN=S0, impl=impl)
        return jnp.sum(jnp.sin(y)) + jnp.sum(f**2)

    g_n = jax.jit(jax.grad(lambda *a: loss("naive", *a), argnums=(0, 1, 2, 3, 4)))(x, dt, A, B, C)
    g_c = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3, 4)))(x, dt, A, B, C)
    for a, b in zip(g_c, g_n):
        np.testing.assert_allclose(a, b, **F32_OP)


def test_blocked_chunks_equal_naive(rng):
    """chunk_size a multiple of ``BLOCK``: dual-form blocks of 64 with states between them, clipping still after
    every chunk_size tokens; packing, initial state, skip, extra decay and gradients, L not a multiple of either."""
    L = 150
    x, dt, A, B, C = make_inputs(rng, Bsz=1, L=L, H=2, P=3, G=1, N=4)
    kw = dict(chunk_size=2 * ssd_ops.BLOCK, D_H=jnp.asarray(rng.normal(size=2), jnp.float32),
              initial_state_BHPN=jnp.asarray(rng.normal(size=(1, 2, 3, 4)), jnp.float32),
              seq_idx_BL=jnp.asarray([[0] * 40 + [1] * 110], jnp.int32),
              decay_scale_H=jnp.asarray([0.99, 1.0], jnp.float32),
              max_state_norm_H=jnp.asarray([2.0, 3.0], jnp.float32))  # fmt: skip

    def loss(impl, *args):
        y, f = ssd_ops.ssd(*args, impl=impl, **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(f**2), (y, f)

    grad = lambda impl: jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
    (g_n, (y_n, f_n)), (g_c, (y_c, f_c)) = grad("naive")(x, dt, A, B, C), grad("chunked")(x, dt, A, B, C)
    np.testing.assert_allclose(y_c, y_n, **F32_OP)
    np.testing.assert_allclose(f_c, f_n, **F32_OP)
    for a, b in zip(g_c, g_n):
        np.testing.assert_allclose(a, b, **F32_OP)


@pytest.mark.parametrize("Q", [5, ssd_ops.SEGSUM_MATMUL_MAX, 80])  # the matmul form up to 64, cumsum beyond
def test_stable_segsum_matches_direct_sums(rng, Q):
    a = -rng.exponential(size=(3, Q))
    out = np.asarray(jax.jit(ssd_ops._stable_segsum)(jnp.asarray(a, jnp.float32)))
    q, s = np.tril_indices(Q)
    ref = np.asarray([[a[b, j + 1 : i + 1].sum() for i, j in zip(q, s)] for b in range(3)])
    np.testing.assert_allclose(out[:, q, s], ref, **F32_OP)
    np.testing.assert_array_equal(out[:, s[s != q], q[s != q]], 0.0)  # above the diagonal


@pytest.mark.slow
def test_bf16_long_sequence_is_finite_and_close_to_f32():
    """L = 65,536 in bf16 (f32 accumulation): finite, and within bf16 error of the f32 result."""
    rng = np.random.default_rng(1)
    x, dt, A, B, C = make_inputs(rng, Bsz=1, L=65_536, H=2, P=4, G=1, N=4)
    seq = jnp.asarray((np.arange(65_536) // 20_000)[None], jnp.int32)
    f = jax.jit(lambda *a: ssd_ops.ssd(*a, chunk_size=64, seq_idx_BL=seq))
    y16, s16 = f(*(a.astype(jnp.bfloat16) for a in (x, dt, A, B, C)))
    y32, s32 = f(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, dt, A, B, C)))
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y16.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(s16)))
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y16, np.float32) / scale, np.asarray(y32) / scale, **BF16)
    np.testing.assert_allclose(s16 / jnp.max(jnp.abs(s32)), s32 / jnp.max(jnp.abs(s32)), **BF16)


def test_state_norm_clipping_bounds_the_state(rng):
    x, dt, A, B, C = make_inputs(rng, L=24)
    tau = jnp.full((4,), 0.25, jnp.float32)
    _, final = run_ssd(x, dt, A, B, C, chunk_size=8, max_state_norm_H=tau)
    _, unclipped = run_ssd(x, dt, A, B, C, chunk_size=8)
    norms = jnp.sqrt(jnp.sum(final**2, axis=(2, 3)))
    assert bool(jnp.all(norms <= 0.25 * (1 + 1e-5))) and bool(jnp.all(jnp.sqrt(jnp.sum(unclipped**2, (2, 3))) > 0.25))
    _, same = run_ssd(x, dt, A, B, C, chunk_size=8, max_state_norm_H=jnp.full((4,), jnp.inf, jnp.float32))
    np.testing.assert_allclose(same, unclipped, **EXACT)


def test_longmamba_filter(rng):
    delta = jnp.asarray(rng.uniform(0.0, 1.0, size=(2, 10, 4)), jnp.float32)
    global_H = jnp.asarray([True, False, True, False])
    out = ssd_ops.longmamba_filter(delta, global_H, jnp.full((4,), 0.5, jnp.float32))
    np.testing.assert_array_equal(out[..., 1::2], delta[..., 1::2])  # local heads: bit for bit
    np.testing.assert_array_equal(out[..., ::2], jnp.where(delta[..., ::2] > 0.5, delta[..., ::2], 0.0))
    # A filtered token (Δ = 0) leaves the state exactly unchanged.
    x, _, A, B, C = make_inputs(rng, L=1)
    S = jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32)
    _, S_next = ssd_ops.ssd_step(S, x[:, 0], jnp.zeros((2, 4), jnp.float32), A, B[:, 0], C[:, 0])
    np.testing.assert_array_equal(S_next, S)
    assert ssd_ops.nearest_length((1000, 2000, 4000), 2900) == 1 and ssd_ops.nearest_length((1000, 3000), 2000) == 0


def test_longmamba_calibrate_thresholds():
    """Δ ≡ 1 over L: the budget is L, so at T = 2L the kept top-L (all 1) must just exceed it."""
    delta = jnp.ones((1, 8, 2), jnp.float32) * jnp.asarray([1.0, 0.5])[None, None, :]
    A = jnp.asarray([-0.1, -1.0], jnp.float32)
    decay, theta = ssd_ops.longmamba_calibrate(delta, A, target_lengths=(4, 16))
    np.testing.assert_allclose(decay, np.exp([-0.8, -4.0]), **F32_OP)
    np.testing.assert_allclose(theta, [[0.0, 0.0], [1.0, 0.5]], **F32_OP)  # constant curve: θ = the value
    with pytest.raises(ValueError, match="target_lengths"):
        ssd_ops.longmamba_calibrate(delta, A, target_lengths=())


# ---- conv ---------------------------------------------------------------------------------------------------------
def test_causal_conv_matches_definition_and_streams(rng):
    x = jnp.asarray(rng.normal(size=(2, 9, 3, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    y, hist = conv(x, w, bias)
    xp = np.pad(np.asarray(x, np.float64), [(0, 0), (3, 0), (0, 0), (0, 0)])
    ref = sum(np.asarray(w, np.float64)[k] * xp[:, k : k + 9] for k in range(4)) + np.asarray(bias)
    np.testing.assert_allclose(y, ref, **F32_OP)
    np.testing.assert_array_equal(hist, x[:, -3:])
    y1, h1 = conv(x[:, :2], w, bias)  # shorter than the kernel: history zero-padded
    y2, h2 = conv(x[:, 2:], w, bias, history_BWE=h1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, **F32_OP)
    np.testing.assert_array_equal(h2, hist)


def test_causal_conv_packed_equals_separate(rng):
    x = jnp.asarray(rng.normal(size=(1, 9, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    hist0 = jnp.asarray(rng.normal(size=(1, 3, 5)), jnp.float32)
    seq = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 2, 2]], jnp.int32)
    y, hist = conv(x, w, history_BWE=hist0, seq_idx_BL=seq)
    ya, _ = conv(x[:, :5], w, history_BWE=hist0)
    yb, _ = conv(x[:, 5:7], w)
    yc, hc = conv(x[:, 7:], w)
    np.testing.assert_allclose(y, jnp.concatenate([ya, yb, yc], axis=1), **F32_OP)
    np.testing.assert_array_equal(hist, hc)  # only the last document's tokens survive


def test_causal_conv_gradients_match_autodiff_of_a_dense_definition(rng):
    """The hand-written backward (input, weight, bias, history; packed documents; both outputs' cotangents)."""
    x, hist0 = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 9, 3, 2), (2, 3, 3, 2)))
    w, bias = jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32), jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    seq = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 2, 2], [5] * 9], jnp.int32)
    gy, gh = jnp.asarray(rng.normal(size=(2, 9, 3, 2)), jnp.float32), jnp.asarray(rng.normal(size=(2, 3, 3, 2)))

    doc = np.concatenate([np.zeros((2, 3), int), [[0, 0, 0, 0, 1, 1, 1, 2, 2], [0] * 9]], axis=1)  # history: doc 0

    def dense(x, w, bias, hist0):  # y_t = Σ_k [doc(t) == doc(t - 3 + k)] u_{t+k} w_k + b over u = [history, x]
        u = jnp.concatenate([hist0, x], axis=1)
        t, src = np.arange(9)[:, None], np.arange(12)[None, :]
        y = bias[None, None]
        for k in range(4):
            T_BLS = (src == t + k)[None] & (doc[:, 3:, None] == doc[:, None, :])
            y = y + jnp.einsum("BLS,BSHP,HP->BLHP", T_BLS.astype(np.float32), u, w[k])
        last = doc[:, 9:] == doc[:, -1:]
        return y, jnp.where(last[:, :, None, None], u[:, 9:], 0.0)

    def loss(fn, *args):
        y, h = fn(*args)
        return jnp.sum(jnp.sin(y) * gy) + jnp.sum(h * gh)

    ours = lambda x, w, b, h: conv_ops.causal_conv1d(x, w, b, history_BWE=h, seq_idx_BL=seq)
    g = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3)))(x, w, bias, hist0)
    g_ref = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2, 3)))(x, w, bias, hist0)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, **F32_OP)


# ---- validation ---------------------------------------------------------------------------------------------------
def _bad_cases():
    """(field, args, kwargs, error): ValueError for a bad value, TypeError for a wrong Python type (lcjax.checks)."""
    ok = lambda: make_inputs(np.random.default_rng(0), Bsz=1, L=5, H=4, P=2, G=2, N=3)
    cases = []
    x, dt, A, B, C = ok()
    cases.append(("x_BLHP", (x[0], dt, A, B, C), {}, ValueError))
    cases.append(("dt_BLH", (x, dt[:, :4], A, B, C), {}, ValueError))
    cases.append(("A_H", (x, dt, A[:3], B, C), {}, ValueError))
    cases.append(("C_BLGN", (x, dt, A, B, C[..., :2]), {}, ValueError))
    B3, C3 = (jnp.concatenate([a, a[:, :, :1]], axis=2) for a in (B, C))
    cases.append(("groups", (x, dt, A, B3, C3), {}, ValueError))
    cases.append(("chunk_size", (x, dt, A, B, C), dict(chunk_size=0), ValueError))
    cases.append(("chunk_size", (x, dt, A, B, C), dict(chunk_size=2.0), TypeError))
    cases.append(("x_BLHP", (x.astype(jnp.int32), dt, A, B, C), {}, ValueError))
    cases.append(("D_H", (x, dt, A, B, C), dict(D_H=jnp.ones((3,))), ValueError))
    cases.append(("initial_state_BHPN", (x, dt, A, B, C), dict(initial_state_BHPN=jnp.ones((1, 4, 2, 2))), ValueError))
    cases.append(("seq_idx_BL", (x, dt, A, B, C), dict(seq_idx_BL=jnp.zeros((1, 5), jnp.float32)), ValueError))
    cases.append(("seq_idx_BL", (x, dt, A, B, C), dict(seq_idx_BL=jnp.zeros((1, 4), jnp.int32)), ValueError))
    cases.append(("impl", (x, dt, A, B, C), dict(impl="fast"), ValueError))
    return cases


@pytest.mark.parametrize("field,args,kwargs,error", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_value_error_naming_the_field(field, args, kwargs, error):
    kwargs = dict(chunk_size=4) | kwargs
    with pytest.raises(error, match=field):
        ssd_ops.ssd(*args, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(impl="fast"), "impl='fast' is not allowed; allowed: 'naive', 'chunked', 'context_parallel'"),
    (dict(impl=3), "impl=3 is not allowed"),
    (dict(impl="context_parallel", axis_name=7), "ssd: axis_name=7 is not allowed; allowed: a mesh axis name"),
    (dict(impl="context_parallel", axis_name=("context", 3)), r"ssd: axis_name=\('context', 3\) is not allowed"),
    (dict(impl="context_parallel", axis_name=()), r"ssd: axis_name=\(\) is not allowed"),
    (dict(impl="naive", axis_name="context"), "axis_name='context': only impl='context_parallel' takes a mesh axis"),
])  # fmt: skip
def test_bad_impl_or_axis_name_names_it(kwargs, message):
    x, dt, A, B, C = make_inputs(np.random.default_rng(0), Bsz=1, L=5, H=4, P=2, G=2, N=3)
    with pytest.raises(ValueError, match=message):
        ssd_ops.ssd(x, dt, A, B, C, chunk_size=4, **kwargs)


def test_conv_bad_inputs():
    x = jnp.ones((1, 5, 3))
    with pytest.raises(ValueError, match="w_WE"):
        conv_ops.causal_conv1d(x, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="history_BWE"):
        conv_ops.causal_conv1d(x, jnp.ones((4, 3)), history_BWE=jnp.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="seq_idx_BL"):
        conv_ops.causal_conv1d(x, jnp.ones((4, 3)), seq_idx_BL=jnp.zeros((1, 5), jnp.float32))
