"""lcjax.ops.attention / attention_blockwise / masks: blockwise == dense reference == float64 numpy, splash in
interpret mode, decoding with a cache, lse merging, memory of the backward pass, input validation."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from lcjax.ops import attention as A
from lcjax.ops import attention_blockwise as AB
from lcjax.ops import masks
from tests.tolerances import BF16, F32_OP


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention configuration; ``pos``/``seg`` name the generators in ``make_inputs``."""

    B: int = 2
    L: int = 37
    S: int = 37
    H: int = 4
    K: int = 4
    P: int = 8
    causal: bool = True
    window: int | None = None
    pos: str = "default"  # default | sorted | permuted (zigzag-like, not monotone)
    seg: str = "none"  # none | packed (same docs in q, kv) | padded (kv padding -1) | orphan (rows that see nothing)


CASES = {
    "causal": Case(),
    "bidirectional_cross": Case(L=37, S=53, causal=False),
    "gqa_window": Case(H=4, K=2, window=5),
    "mqa_packed_segments": Case(H=4, K=1, L=29, S=29, seg="packed"),
    "padded_kv_bidir": Case(L=21, S=45, causal=False, seg="padded"),
    "custom_positions": Case(L=37, S=53, pos="sorted", K=2),
    "permuted_positions": Case(pos="permuted", seg="packed"),
    "window_bidir": Case(window=6, causal=False, L=30, S=41),
    "odd_head_dim": Case(P=5, H=3, K=1, L=19, S=23, causal=False),
    "fully_masked_rows": Case(L=37, S=53, seg="orphan", pos="sorted"),
    "short_query": Case(L=3, S=40, pos="sorted", seg="padded", K=2),
}


def make_inputs(case: Case, rng, dtype=jnp.float32):
    c = case
    q = rng.standard_normal((c.B, c.L, c.H, c.P)).astype(np.float32)
    k = rng.standard_normal((c.B, c.S, c.K, c.P)).astype(np.float32)
    v = rng.standard_normal((c.B, c.S, c.K, c.P)).astype(np.float32)
    kw = dict(causal=c.causal, window=c.window)
    if c.pos == "sorted":  # queries are the last positions (a chunk after a prefix), keys spread over the past
        kw["kv_positions"] = np.sort(rng.integers(0, c.S + 10, (c.B, c.S)), axis=1).astype(np.int32)
        kw["q_positions"] = np.sort(rng.integers(5, c.S + 10, (c.B, c.L)), axis=1).astype(np.int32)
    elif c.pos == "permuted":
        perm = np.stack([rng.permutation(c.L) for _ in range(c.B)]).astype(np.int32)
        kw["q_positions"] = kw["kv_positions"] = perm
    if c.seg == "packed":
        seg = np.sort(rng.integers(0, 3, (c.B, c.L)), axis=1).astype(np.int32)
        kw["q_segment_ids"] = kw["kv_segment_ids"] = seg
    elif c.seg == "padded":
        kv_seg = np.zeros((c.B, c.S), np.int32)
        kv_seg[:, c.S - 7:] = -1  # empty slots
        kv_seg[0, :3] = -1
        kw["kv_segment_ids"] = kv_seg
    elif c.seg == "orphan":
        kw["q_segment_ids"] = rng.integers(0, 3, (c.B, c.L)).astype(np.int32)  # segment 2 exists only in q
        kw["kv_segment_ids"] = rng.integers(0, 2, (c.B, c.S)).astype(np.int32)
    kw = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), kw


def numpy_attention(q, k, v, *, causal, window=None, q_positions=None, kv_positions=None, q_segment_ids=None,
                    kv_segment_ids=None, scale=None):
    """Float64 numpy attention written from the definition (GQA by repeating kv heads)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, L, H, P = q.shape
    S, K = k.shape[1], k.shape[2]
    qp = np.broadcast_to(np.arange(L), (B, L)) if q_positions is None else np.asarray(q_positions)
    kp = np.broadcast_to(np.arange(S), (B, S)) if kv_positions is None else np.asarray(kv_positions)
    qs = np.zeros((B, L)) if q_segment_ids is None else np.asarray(q_segment_ids)
    ks = np.zeros((B, S)) if kv_segment_ids is None else np.asarray(kv_segment_ids)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scale = 1 / np.sqrt(P) if scale is None else scale
    out, lse = np.zeros((B, L, H, P)), np.full((B, L, H), -np.inf)
    for b in range(B):
        for i in range(L):
            d = qp[b, i] - kp[b]
            ok = qs[b, i] == ks[b]
            if causal:
                ok &= d >= 0
            if window is not None:
                ok &= (d if causal else np.abs(d)) < window
            if not ok.any():
                continue
            for h in range(H):
                s = scale * k[b, ok, h] @ q[b, i, h]
                lse[b, i, h] = np.log(np.sum(np.exp(s - s.max()))) + s.max()
                out[b, i, h] = np.exp(s - lse[b, i, h]) @ v[b, ok, h]
    return out, lse


def _outputs_and_grads(fn, q, k, v, kw, g_out, g_lse):
    """One jitted call: out, lse and the VJP of (out, lse) with random cotangents (lse -inf rows get none)."""

    def run(q, k, v):
        (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_lse=True, **kw), q, k, v)
        return out, lse, vjp((g_out.astype(out.dtype), jnp.where(jnp.isfinite(lse), g_lse, 0.0)))

    return jax.jit(run)(q, k, v)


def _assert_lse_close(lse, lse_ref, tol):
    lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[fin], lse_ref[fin], **tol)


def _blockwise_small(q, k, v, **kw):  # small odd tiles: several q and kv tiles, padded last tiles, skipping
    return A.blockwise_attention(q, k, v, block_q=8, block_kv=12, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_reference_with_gradients(name, rng):
    q, k, v, kw = make_inputs(CASES[name], rng)
    out_shape, lse_shape = q.shape, q.shape[:3]
    g_out = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    g_lse = jnp.asarray(rng.standard_normal(lse_shape), jnp.float32)
    out_r, lse_r, grads_r = _outputs_and_grads(A.attention_reference, q, k, v, kw, g_out, g_lse)
    out_b, lse_b, grads_b = _outputs_and_grads(_blockwise_small, q, k, v, kw, g_out, g_lse)
    assert out_b.dtype == q.dtype and lse_b.dtype == jnp.float32 and lse_b.shape == lse_shape
    np.testing.assert_allclose(out_b, out_r, **F32_OP)
    _assert_lse_close(lse_b, lse_r, F32_OP)
    for g_b, g_r in zip(grads_b, grads_r):
        assert np.all(np.isfinite(g_b))
        np.testing.assert_allclose(g_b, g_r, **F32_OP)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64_numpy(name, rng):
    q, k, v, kw = make_inputs(CASES[name], rng)
    out_np, lse_np = numpy_attention(q, k, v, **kw)
    out, lse = A.attention_reference(q, k, v, return_lse=True, **kw)
    np.testing.assert_allclose(out, out_np, **F32_OP)
    _assert_lse_close(lse, lse_np, F32_OP)


def test_fully_masked_rows_are_zero_never_nan(rng):
    q, k, v, kw = make_inputs(CASES["fully_masked_rows"], rng)
    empty_BL = ~np.asarray(masks.make_mask(
        kw["q_positions"], kw["kv_positions"], kw["q_segment_ids"], kw["kv_segment_ids"], causal=True).any(-1))
    assert empty_BL.any() and not empty_BL.all()
    g_out, g_lse = jnp.ones(q.shape), jnp.ones(q.shape[:3])
    for impl in ("reference", "blockwise", "xla"):
        fn = functools.partial(A.dot_product_attention, impl=impl, block_q=8, block_kv=8)
        out, lse = map(np.asarray, _outputs_and_grads(fn, q, k, v, kw, g_out, g_lse)[:2])
        assert np.all(out[empty_BL] == 0.0) and np.all(np.isneginf(lse[empty_BL])), impl
        assert np.all(np.isfinite(out)) and not np.isnan(lse).any(), impl
    dq, dk, dv = _outputs_and_grads(_blockwise_small, q, k, v, kw, g_out, g_lse)[2]
    assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
    assert np.all(np.asarray(dq)[empty_BL] == 0.0)


@pytest.mark.parametrize(("name", "impl"), [("mqa_packed_segments", "auto"), ("mqa_packed_segments", "xla"),
                                           ("window_bidir", "xla"), ("short_query", "xla"),
                                           ("short_query", "blockwise")])
def test_dispatcher_impls_agree(name, impl, rng):
    q, k, v, kw = make_inputs(CASES[name], rng)
    out_r, lse_r = A.attention_reference(q, k, v, return_lse=True, **kw)
    out, lse = A.dot_product_attention(q, k, v, impl=impl, return_lse=True, block_q=16, block_kv=16, **kw)
    np.testing.assert_allclose(out, out_r, **F32_OP)
    _assert_lse_close(lse, lse_r, F32_OP)


def test_resolve_impl_rules():
    common = dict(head_dim=64, dtype=jnp.bfloat16, causal=True, window=None, custom_positions=False,
                  segment_ids=False, return_lse=False)
    auto = lambda L, S, backend, **kw: A.resolve_impl("auto", q_len=L, kv_len=S, backend=backend, **{**common, **kw})
    assert auto(1, 4096, "gpu") is A.Impl.REFERENCE  # decoding
    assert auto(1024, 1024, "gpu") is A.Impl.CUDNN
    assert auto(1024, 1024, "tpu") is A.Impl.SPLASH
    assert auto(1024, 1024, "cpu") is A.Impl.BLOCKWISE
    assert auto(1000, 1000, "tpu") is A.Impl.BLOCKWISE  # not a multiple of 128
    for change in (dict(custom_positions=True), dict(return_lse=True), dict(segment_ids=True),
                   dict(dtype=jnp.float32), dict(causal=False, window=64), dict(head_dim=256)):
        assert auto(1024, 1024, "gpu", **change) is A.Impl.BLOCKWISE, change
    assert auto(1024, 1024, "tpu", segment_ids=True) is A.Impl.SPLASH
    assert auto(1024, 1024, "tpu", return_lse=True) is A.Impl.BLOCKWISE
    # an explicit impl is returned as given when it can run here, and refused (ValueError) when it cannot
    explicit = lambda impl, backend, **kw: A.resolve_impl(impl, q_len=1024, kv_len=1024, backend=backend,
                                                          **{**common, **kw})
    assert explicit("cudnn", "gpu") is A.Impl.CUDNN and explicit("blockwise", "gpu") is A.Impl.BLOCKWISE
    assert explicit(A.Impl.SPLASH, "tpu") is A.Impl.SPLASH and explicit("splash_interpret", "cpu")
    with pytest.raises(ValueError, match="impl='splash' needs a TPU; the backend here is 'gpu'"):
        explicit("splash", "gpu")
    assert A.available_impls("cpu") == ("auto", "reference", "blockwise", "xla", "splash_interpret")


def test_cudnn_on_cpu_names_the_impls_available_here():
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN runs here")
    here = jax.default_backend()
    message = (f"impl='cudnn' needs a GPU (cuDNN); the backend here is '{here}'. Implementations available here: "
               f"{', '.join(repr(i.value) for i in A.available_impls())}")
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        A.dot_product_attention(q, q, q, impl="cudnn")


def test_causal_tiles_are_skipped(rng):
    """Keys that no query of a tile can see are never read: NaNs placed there do not reach those tiles' outputs."""
    q, k, v, _ = make_inputs(Case(B=1, L=32, S=32), rng)
    seg = jnp.asarray(np.repeat([[0, 1]], 16, axis=1), jnp.int32)  # two documents
    tiles = dict(block_q=8, block_kv=8)

    @jax.jit
    def run(q, k, v):
        return (A.blockwise_attention(q, k, v.at[:, 24:].set(jnp.nan), **tiles),  # causal: above the diagonal
                A.blockwise_attention(q, k, v.at[:, 16:].set(jnp.nan), causal=False, q_segment_ids=seg,
                                      kv_segment_ids=seg, **tiles),  # disjoint segment ranges
                A.blockwise_attention(q, k, v.at[:, :8].set(jnp.nan), window=4, **tiles))  # outside the window

    causal, segments, window = map(np.asarray, run(q, k, v))
    assert np.all(np.isfinite(causal[:, :24])) and np.all(np.isnan(causal[:, 24:]))
    assert np.all(np.isfinite(segments[:, :16]))
    assert np.all(np.isfinite(window[:, 16:]))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([None, 1, 3, 8]))
def test_tile_may_attend_is_sound(seed, causal, window):
    """False from the min/max test implies the exact mask of the tile is empty."""
    r = np.random.default_rng(seed)
    qp, kp = r.integers(0, 24, (2, 4)), r.integers(0, 24, (2, 5))
    qs, ks = r.integers(-1, 3, (2, 4)), r.integers(-1, 3, (2, 5))
    args = [jnp.asarray(x, jnp.int32) for x in (qp, kp, qs, ks)]
    if not bool(masks.tile_may_attend(*args, causal=causal, window=window)):
        assert not bool(masks.make_mask(*args, causal=causal, window=window).any())


def test_merge_and_split_kv_kernels_equal_full_attention(rng):
    """What ring attention does per hop: blockwise_fwd on kv chunks + merge_attention, then blockwise_bwd per
    chunk with the global lse/delta, summed, equals the full forward and the reference gradients."""
    q, k, v, kw = make_inputs(CASES["permuted_positions"], rng)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    cut = 20

    @jax.jit
    def split_kv(q, k, v, qp, kp, qs, ks):
        mk = dict(causal=True, window=None, block_q=8, block_kv=8)
        halves = (slice(0, cut), slice(cut, None))
        chunk = lambda h: masks.AttentionInputs(qp, kp[:, h], qs, ks[:, h], q.shape[-1] ** -0.5)
        parts = [AB.blockwise_fwd(q, k[:, h], v[:, h], chunk(h), **mk) for h in halves]
        out, lse = AB.merge_attention(*parts[0], *parts[1])
        delta = jnp.sum(dout * out, -1) - dlse
        grads = [AB.blockwise_bwd(q, k[:, h], v[:, h], dout, lse, delta, chunk(h), **mk) for h in halves]
        dq = grads[0][0] + grads[1][0]
        return out, lse, (dq, *(jnp.concatenate([g[i] for g in grads], 1) for i in (1, 2)))

    out, lse, grads = split_kv(q, k, v, kw["q_positions"], kw["kv_positions"], kw["q_segment_ids"],
                               kw["kv_segment_ids"])
    out_r, lse_r, grads_r = _outputs_and_grads(A.attention_reference, q, k, v, kw, dout, dlse)
    np.testing.assert_allclose(out, out_r, **F32_OP)
    _assert_lse_close(lse, lse_r, F32_OP)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g, g_r, **F32_OP)


def test_merge_attention_handles_empty_sides(rng):
    out = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
    lse = jnp.asarray([[[0.5, -jnp.inf], [-jnp.inf, -jnp.inf], [1.0, 2.0]]], jnp.float32)
    none = jnp.full_like(lse, -jnp.inf)

    @jax.jit
    def run(out, lse):
        identity = AB.merge_attention(out, lse, jnp.zeros_like(out), none)  # merging with "nothing seen"
        both_empty = AB.merge_attention(jnp.zeros_like(out), none, jnp.zeros_like(out), none)
        grads = jax.grad(lambda o, l: jnp.sum(AB.merge_attention(o, l, o, none)[0]), argnums=(0, 1))(out, lse)
        return identity, both_empty, grads

    (o, l), (o0, l0), grads = run(out, lse)
    np.testing.assert_array_equal(l, lse)
    np.testing.assert_allclose(o, jnp.where(jnp.isfinite(lse)[..., None], out, 0.0), **F32_OP)
    assert np.all(np.asarray(o0) == 0) and np.all(np.isneginf(np.asarray(l0)))
    assert all(np.all(np.isfinite(x)) for x in grads)


def test_gradient_residuals_and_memory_are_linear_in_length(capsys):
    """The blockwise VJP saves only q, k, v, out, lse (+ int32 positions / segment ids): nothing [L, S]-sized;
    its compiled temp memory grows ~linearly in L while the reference grows ~quadratically."""
    L = 256
    q, kv = jnp.zeros((1, L, 2, 16)), jnp.zeros((1, L, 1, 16))
    print_saved_residuals(lambda q, k, v: A.blockwise_attention(q, k, v, block_q=64, block_kv=64),
                                            q, kv, kv)
    saved = capsys.readouterr().out.strip().splitlines()
    assert len(saved) == 9, saved  # q, k, v, 4 index arrays, out, lse
    assert all(line.count(str(L)) == 1 for line in saved), saved  # no residual with both an L and an S axis

    def temp_bytes(fn, L):
        q, kv = jnp.zeros((1, L, 2, 16)), jnp.zeros((1, L, 1, 16))
        g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        return g.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    blockwise = lambda q, k, v: A.blockwise_attention(q, k, v, block_q=64, block_kv=64)  # noqa: E731
    ratio_blockwise = temp_bytes(blockwise, 2048) / temp_bytes(blockwise, 1024)
    ratio_reference = temp_bytes(A.attention_reference, 2048) / temp_bytes(A.attention_reference, 1024)
    assert ratio_blockwise < 2.5 and ratio_reference > 3.5, (ratio_blockwise, ratio_reference)


def test_decode_with_cache_equals_full_forward(rng):
    """Step-by-step decoding into a fixed-size cache (empty slots: segment -1) == the full causal forward, also
    for a sliding-window ring-buffer cache (slot = t mod W, positions stored with the keys)."""
    T, W, H, K, P = 9, 4, 4, 2, 8
    q, k, v, _ = make_inputs(Case(B=1, L=T, S=T, H=H, K=K, P=P), rng)
    for window, slots in ((None, 12), (W, W)):
        full = A.attention_reference(q, k, v, causal=True, window=window)

        @jax.jit
        def step(cache, t):
            k_cache, v_cache, kv_pos, kv_seg = cache
            slot = t % slots
            k_cache = k_cache.at[:, slot].set(lax.dynamic_index_in_dim(k, t, 1, keepdims=False))
            v_cache = v_cache.at[:, slot].set(lax.dynamic_index_in_dim(v, t, 1, keepdims=False))
            kv_pos, kv_seg = kv_pos.at[:, slot].set(t), kv_seg.at[:, slot].set(0)
            q_t, pos = lax.dynamic_slice_in_dim(q, t, 1, 1), jnp.full((1, 1), t, jnp.int32)
            kw = dict(q_positions=pos, kv_positions=kv_pos, kv_segment_ids=kv_seg, window=window)
            out = A.decode_attention(q_t, k_cache, v_cache, **kw)
            auto = A.dot_product_attention(q_t, k_cache, v_cache, **kw)  # impl="auto" takes the dense path
            return (k_cache, v_cache, kv_pos, kv_seg), (out[:, 0], auto[:, 0])

        cache = (jnp.zeros((1, slots, K, P)), jnp.zeros((1, slots, K, P)), jnp.zeros((1, slots), jnp.int32),
                 jnp.full((1, slots), -1, jnp.int32))
        for t in range(T):
            cache, (out, auto) = step(cache, jnp.int32(t))
            np.testing.assert_allclose(out, full[:, t], **F32_OP)
            np.testing.assert_allclose(auto, out, **F32_OP)


def test_splash_interpret_matches_reference(rng):
    """The Pallas splash kernel in interpret mode (CPU), GQA + causal + packed segments: out, lse (forward only)
    and gradients."""
    q, k, v, _ = make_inputs(Case(B=1, L=256, S=256, H=2, K=1, P=32), rng)
    seg = jnp.asarray(np.repeat([[0, 1]], 128, axis=1), jnp.int32)
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    g = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: A.dot_product_attention(q, k, v, impl="splash_interpret", **kw), q, k, v)
        lse = A.dot_product_attention(q, k, v, impl="splash_interpret", return_lse=True, **kw)[1]
        return out, lse, vjp(g)

    out, lse, grads = run(q, k, v)
    out_r, lse_r, grads_r = _outputs_and_grads(A.attention_reference, q, k, v, kw, g, jnp.zeros(q.shape[:3]))
    np.testing.assert_allclose(out, out_r, **F32_OP)
    np.testing.assert_allclose(lse, lse_r, **F32_OP)
    for g_s, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g_s, g_r, **F32_OP)


def test_bf16_inputs_are_finite_and_close(rng):
    """bf16 q/k/v: blockwise (bf16 matmul inputs, f32 accumulation) against the f32 reference on the same values."""
    q, k, v, kw = make_inputs(CASES["mqa_packed_segments"], rng, dtype=jnp.bfloat16)
    g_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    g_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    out, lse, grads = _outputs_and_grads(_blockwise_small, q, k, v, kw, g_out, g_lse)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_r, lse_r, grads_r = _outputs_and_grads(A.attention_reference, *f32, kw, g_out, g_lse)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(out.astype(jnp.float32), out_r, **BF16)
    _assert_lse_close(lse, lse_r, BF16)
    for g_b, g_r in zip(grads, grads_r):
        assert g_b.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g_b, np.float32)))
        np.testing.assert_allclose(np.asarray(g_b, np.float32), g_r, **BF16)


@settings(max_examples=3, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 16), st.integers(1, 16), st.booleans())
def test_blockwise_any_lengths_and_blocks(L, S, block_q, block_kv, causal):
    r = np.random.default_rng(L * 1000 + S)
    q, k, v, _ = make_inputs(Case(B=1, L=L, S=S, H=2, K=1, P=4, causal=causal), r)
    kv_pos = jnp.asarray(np.arange(S)[None] + max(L - S, 0), jnp.int32)  # end-aligned; early queries may see none
    kw = dict(causal=causal, q_positions=jnp.arange(L, dtype=jnp.int32)[None] + max(S - L, 0), kv_positions=kv_pos)
    out = A.blockwise_attention(q, k, v, block_q=block_q, block_kv=block_kv, **kw)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, **kw)[0], **F32_OP)


def _bad(**changes):
    """Arguments for dot_product_attention: valid tiny defaults with ``changes`` applied."""
    args = dict(q=jnp.zeros((1, 8, 4, 8)), k=jnp.zeros((1, 8, 2, 8)), v=jnp.zeros((1, 8, 2, 8)))
    args.update(changes)
    return args


BAD_INPUTS = {  # name: (arguments, text the message must contain, rejected by the jaxtyping annotations first)
    "q_rank": (_bad(q=jnp.zeros((8, 4, 8))), "q must have rank 4", True),
    "k_batch": (_bad(k=jnp.zeros((2, 8, 2, 8)), v=jnp.zeros((2, 8, 2, 8))), "k batch size", True),
    "head_dim": (_bad(k=jnp.zeros((1, 8, 2, 4)), v=jnp.zeros((1, 8, 2, 4))), "head dim", True),
    "v_shape": (_bad(v=jnp.zeros((1, 8, 2, 6))), "v must have the shape of k", True),
    "heads_not_divisible": (_bad(k=jnp.zeros((1, 8, 3, 8)), v=jnp.zeros((1, 8, 3, 8))), "multiple of k/v heads",
                            False),
    "int_dtype": (_bad(q=jnp.zeros((1, 8, 4, 8), jnp.int32)), "q must have a floating dtype", True),
    "mixed_dtype": (_bad(k=jnp.zeros((1, 8, 2, 8), jnp.bfloat16)), "share one dtype", False),
    "empty_length": (_bad(q=jnp.zeros((1, 0, 4, 8))), "non-empty", False),
    "q_positions_shape": (_bad(q_positions=jnp.zeros((1, 7), jnp.int32)), "q_positions must have shape", True),
    "kv_positions_dtype": (_bad(kv_positions=jnp.zeros((1, 8))), "kv_positions must have an integer dtype", True),
    "segment_ids_shape": (_bad(kv_segment_ids=jnp.zeros((8,), jnp.int32)), "kv_segment_ids must have shape", True),
    "window_zero": (_bad(window=0), "window must be a positive int", False),
    "window_negative": (_bad(window=-3), "window must be a positive int", False),
    "scale_nan": (_bad(scale=float("nan")), "scale must be a finite", False),
    "block_q_zero": (_bad(impl="blockwise", block_q=0), "block_q must be a positive int", False),
    "block_kv_negative": (_bad(impl="blockwise", block_kv=-1), "block_kv must be a positive int", False),
    "unknown_impl": (_bad(impl="flash3"), "impl='flash3' is not allowed; allowed: 'auto'", False),
    "splash_positions": (_bad(impl="splash_interpret", q_positions=jnp.zeros((1, 8), jnp.int32)),
                         "supports only default positions", False),
    "splash_length": (_bad(impl="splash_interpret"), "multiples of 128", False),
    "cudnn_segments": (_bad(impl="cudnn", q_segment_ids=jnp.zeros((1, 8), jnp.int32)), "cudnn", False),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(name, monkeypatch):
    args, message, typed = BAD_INPUTS[name]
    if typed:  # the test suite's runtime jaxtyping hook rejects these first (TypeCheckError); users without it
        monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # get our ValueError, checked here
    with pytest.raises(ValueError, match=message):
        A.dot_product_attention(**args)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU backend")
def test_cudnn_matches_reference_on_gpu(rng):  # pragma: no cover - CPU CI has no GPU
    q, k, v, _ = make_inputs(Case(B=2, L=256, S=256, H=4, K=2, P=64), rng, dtype=jnp.bfloat16)
    for kw in (dict(causal=True), dict(causal=True, window=64), dict(causal=False)):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        out = A.dot_product_attention(q, k, v, impl="cudnn", **kw)
        np.testing.assert_allclose(np.asarray(out, np.float32), A.attention_reference(*f32, **kw), **BF16)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="the compiled splash kernel needs a TPU backend")
def test_splash_matches_reference_on_tpu(rng):  # pragma: no cover - CPU CI has no TPU
    q, k, v, _ = make_inputs(Case(B=2, L=512, S=512, H=4, K=2, P=128), rng)
    seg = jnp.asarray(np.repeat([[0, 1]], 256, axis=1).repeat(2, axis=0), jnp.int32)
    cases = (dict(causal=True), dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
             dict(causal=False, window=100))
    for kw in cases:
        out = A.dot_product_attention(q, k, v, impl="splash", **kw)
        ref = A.attention_reference(q, k, v, **kw)
        np.testing.assert_allclose(out, ref, atol=BF16["atol"], rtol=BF16["rtol"])  # TPU default matmul precision
