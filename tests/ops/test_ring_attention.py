"""Ring and all-gather attention over 8 CPU devices against a dense float64 reference (out, lse, dq, dk, dv).

Inputs are permuted into a layout (contiguous / zigzag / striped), attention runs on the permuted, sequence-sharded
arrays, and the result is un-permuted and compared with dense float64 attention on the original order, with random
cotangents for both out and lse. The parametrization is a pairwise cover of strategy x layout x causal x GQA x
segment ids x window x head dim x ring size (including a non-power-of-two ring).
"""

import jax
import jax._src.ad_checkpoint as ad_checkpoint_internal  # saved_residuals (public only as print_saved_residuals)
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax.ops import context_parallel as cp
from lcjax.ops.ring_attention import default_block, ring_attention
from tests.tolerances import F32_RING

B, L = 2, 48


def dense_reference_f64(q, k, v, qp, kp, qs, ks, *, causal, window, scale):
    """Softmax attention from the definition, float64, GQA by repeating kv heads: (out [B,L,H,P], lse [B,L,H])."""
    R = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)
    s = jnp.einsum("blhp,bshp->bhls", q, k) * scale
    diff = qp[:, :, None] - kp[:, None, :]
    mask = qs[:, :, None] == ks[:, None, :]
    if causal:
        mask &= diff >= 0
    if window is not None:
        mask &= (diff if causal else jnp.abs(diff)) < window
    s = jnp.where(mask[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhls,bshp->blhp", jnp.exp(s - lse[..., None]), v)
    return out, jnp.swapaxes(lse, 1, 2)


def make_inputs(seed, H, K, Pd, segments):
    r = np.random.default_rng(seed)
    q, k, v = (r.normal(size=(B, L, h, Pd)).astype(np.float32) for h in (H, K, K))
    if segments:  # packed documents, positions restarting in each one (as lcjax.data.packing produces)
        seg = np.stack([np.repeat(np.arange(4), np.diff([0, *sorted(r.choice(np.arange(1, L), 3, replace=False)), L]))
                        for _ in range(B)]).astype(np.int32)
        pos = cp._positions_from_segments(seg, 1)
    else:
        seg = None
        pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    dout = r.normal(size=(B, L, H, Pd)).astype(np.float32)
    dlse = r.normal(size=(B, L, H)).astype(np.float32)
    return q, k, v, pos, seg, dout, dlse


def seq_mesh(n):
    return jax.make_mesh((n,), ("ctx",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:n])


def run_sharded(fn, mesh, q, k, v, pos, seg, dout, dlse, **kw):
    """(out, lse, dq, dk, dv) of ``fn`` (ring/allgather) under shard_map over ``ctx``; all arrays sharded on L."""
    spec = P(None, "ctx")
    has_seg = seg is not None

    def local(q, k, v, pos, *seg_):
        s = seg_[0] if has_seg else None
        return fn(q, k, v, axis_name="ctx", q_positions=pos, kv_positions=pos, q_segment_ids=s, kv_segment_ids=s,
                  return_lse=True, **kw)

    def attn(q, k, v, pos, *seg_):
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * (4 + has_seg), out_specs=(spec, spec),
                             check_vma=False)(q, k, v, pos, *seg_)

    @jax.jit
    def fwd_bwd(q, k, v, pos, dout, dlse, *seg_):
        (out, lse), vjp = jax.vjp(lambda q, k, v: attn(q, k, v, pos, *seg_), q, k, v)
        return out, lse, *vjp((dout, dlse))

    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))  # noqa: E731
        args = [put(x) for x in (q, k, v, pos, dout, dlse)] + ([put(seg)] if has_seg else [])
        return [np.asarray(x) for x in fwd_bwd(*args)]


CASES = [
    # strategy, layout, causal, (H, K), segments, window, head dim, n
    ("ring", "contiguous", True, (4, 2), False, None, 8, 8),
    ("ring", "zigzag", True, (4, 4), True, None, 5, 8),
    ("ring", "striped", True, (4, 1), False, 9, 8, 4),
    ("ring", "zigzag", False, (4, 2), True, 7, 8, 4),
    ("ring", "striped", False, (2, 2), True, None, 8, 8),
    ("ring", "contiguous", False, (4, 1), True, 5, 5, 6),  # non-power-of-two ring
    ("ring", "zigzag", True, (4, 2), False, 11, 8, 6),
    ("allgather", "zigzag", True, (4, 2), False, 9, 5, 8),
    ("allgather", "striped", False, (4, 1), True, None, 8, 4),
    ("allgather", "contiguous", True, (2, 2), True, 6, 8, 8),
]


def reference(q, k, v, pos, seg, dout, dlse, *, causal, window):
    """Dense float64 (out, lse, dq, dk, dv) on the original token order."""
    seg0 = np.zeros(pos.shape, np.int32) if seg is None else seg
    with jax.enable_x64():
        f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        ref_fn = lambda q, k, v: dense_reference_f64(  # noqa: E731
            q, k, v, pos, pos, seg0, seg0, causal=causal, window=window, scale=1 / np.sqrt(q.shape[-1]))
        (out, lse), vjp = jax.vjp(ref_fn, f64(q), f64(k), f64(v))
        return [np.asarray(x) for x in (out, lse, *vjp((f64(dout), f64(dlse))))]


def assert_matches(got, want):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, **F32_RING, err_msg=name)


@pytest.mark.parametrize("strategy,layout,causal,heads,segments,window,Pd,n", CASES)
def test_matches_dense_float64(strategy, layout, causal, heads, segments, window, Pd, n):
    H, K = heads
    inputs = make_inputs(10 * n + Pd + len(layout), H, K, Pd, segments)
    perm = cp.permutation(L, n, layout)
    pm = lambda x: None if x is None else x[:, perm]  # noqa: E731
    fn = cp.ring_attention if strategy == "ring" else cp.allgather_attention
    got = run_sharded(fn, seq_mesh(n), *(pm(x) for x in inputs), causal=causal, window=window)
    got = [cp.undo_layout(x, n=n, layout=layout) for x in got]
    assert_matches(got, reference(*inputs, causal=causal, window=window))


def test_single_device_path_and_explicit_blocks():
    """axis_name=None is plain blockwise attention; explicit tiles that do not divide the shard (padded) agree."""
    inputs = make_inputs(3, 4, 2, 8, True)
    q, k, v, pos, seg, dout, dlse = inputs
    want = reference(*inputs, causal=True, window=None)
    pos_, seg_ = jnp.asarray(pos), jnp.asarray(seg)
    out, lse = jax.jit(lambda q, k, v: ring_attention(q, k, v, axis_name=None, q_positions=pos_, kv_positions=pos_,
                                                      q_segment_ids=seg_, kv_segment_ids=seg_, return_lse=True,
                                                      block_q=7, block_kv=5))(q, k, v)
    assert_matches([out, lse], want[:2])
    assert_matches(run_sharded(cp.ring_attention, seq_mesh(4), *inputs, block_q=5, block_kv=4), want)


def test_default_block():
    assert default_block(6) == 3 and default_block(2048) == 512 and default_block(1536) == 384
    assert default_block(7) == 7 and default_block(1) == 1
    assert default_block(2 * 509) == 509  # a prime half: the half itself when it is <= the cap
    assert default_block(2 * 1031) == 512  # a large prime half: fall back to the cap (padded last tile)


# ---- structure: collectives and residuals ------------------------------------------------------------------------
def _count(jaxpr, names, mult=1, out=None):
    """Collective equations in a jaxpr and all sub-jaxprs, each weighted by the trip count of enclosing scans."""
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            out[eqn.primitive.name] = out.get(eqn.primitive.name, 0) + mult
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _count(sub.jaxpr, names, inner, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _count(sub, names, inner, out)
    return out


def _grad_jaxpr(fn, n, segments):
    mesh = seq_mesh(n)
    q, k, v, pos, seg, *_ = make_inputs(0, 4, 2, 8, segments)
    spec = P(None, "ctx")
    s_args = (seg,) if segments else ()

    def loss(q, k, v):
        def local(q, k, v, pos, *s):
            s = s[0] if s else None
            return fn(q, k, v, axis_name="ctx", q_positions=pos, kv_positions=pos, q_segment_ids=s, kv_segment_ids=s)

        out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * (4 + segments), out_specs=spec,
                            check_vma=False)(q, k, v, pos, *s_args)
        return jnp.sum(out)

    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))  # noqa: E731
        q, k, v, pos = (put(x) for x in (q, k, v, pos))
        s_args = tuple(put(x) for x in s_args)
        closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        residuals = ad_checkpoint_internal.saved_residuals(loss, q, k, v)
    return closed.jaxpr, residuals, (q, k, v)


@pytest.mark.parametrize("n,segments", [(8, False), (4, True)])
def test_ppermute_count(n, segments):
    jaxpr, _, _ = _grad_jaxpr(cp.ring_attention, n, segments)
    per_hop = 4 if segments else 3  # k, v, kv_positions (+ kv_segment_ids)
    forward = per_hop * (n - 1)  # no rotation after the last hop
    backward = (per_hop + 2) * (n - 1) + 2  # K/V again plus dk, dv; then one dk/dv shift home
    assert _count(jaxpr, {"ppermute", "all_gather"}) == {"ppermute": forward + backward}


def test_allgather_collectives():
    jaxpr, _, _ = _grad_jaxpr(cp.allgather_attention, 8, True)
    counts = _count(jaxpr, {"ppermute", "all_gather", "reduce_scatter", "psum_scatter"})
    assert counts.get("ppermute", 0) == 0
    assert counts["all_gather"] == 4  # k, v, kv positions, kv segment ids
    assert counts.get("reduce_scatter", 0) + counts.get("psum_scatter", 0) == 2  # dk, dv


def test_saved_residuals_are_local_only():
    """The backward pass keeps q, k, v, out, lse and positions: O(L/n) per device, nothing gathered or [T, T]."""
    _, residuals, (q, k, v) = _grad_jaxpr(cp.ring_attention, 8, False)
    sizes = sorted(int(np.prod(shape.shape)) for shape, _ in residuals)
    lse_size = B * L * q.shape[2]
    allowed = sorted([q.size, k.size, v.size, q.size, lse_size, B * L])  # q, k, v, out, lse, positions
    assert sum(sizes) <= sum(allowed), (sizes, allowed)
    assert max(sizes) <= q.size


# ---- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_inputs():
    q, k, v, pos, seg, *_ = (jnp.asarray(x) for x in make_inputs(0, 4, 2, 8, True))
    call = lambda **kw: ring_attention(q, k, v, **({"axis_name": None, "q_positions": pos,  # noqa: E731
                                                      "kv_positions": pos} | kw))
    with pytest.raises(ValueError, match="kv_positions must have shape"):
        call(kv_positions=pos[:, :-1])
    with pytest.raises(ValueError, match="q_positions is required"):
        call(q_positions=None)
    with pytest.raises(ValueError, match="window must be a positive int"):
        call(window=-1)
    with pytest.raises(ValueError, match="window must be a positive int"):
        cp.allgather_attention(q, k, v, axis_name=None, q_positions=pos, kv_positions=pos, window=0)
    with pytest.raises(ValueError, match="give both q_segment_ids and kv_segment_ids"):
        call(q_segment_ids=seg)
    with pytest.raises(ValueError, match="axis_name"):
        call(axis_name=3)
    with pytest.raises(ValueError, match="block_q"):
        call(block_q=0)
    with pytest.raises(ValueError, match="heads"):
        ring_attention(q[:, :, :3], k, v, axis_name=None, q_positions=pos, kv_positions=pos)
