"""Context-parallel layouts (permutations, batch application), load balance, and the global-array dispatcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax import sharding
from lcjax.ops import context_parallel as cp
from lcjax.ops.attention import attention_reference
from tests.tolerances import EXACT, F32_RING


# ---- permutations ---------------------------------------------------------------------------------------------------
def test_permutations_match_the_published_tables():
    zigzag = [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    striped = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
    np.testing.assert_array_equal(cp.permutation(16, 4, "zigzag"), zigzag)
    np.testing.assert_array_equal(cp.permutation(8, 2, "zigzag"), [0, 1, 6, 7, 2, 3, 4, 5])  # MaxText cp=2 docstring
    np.testing.assert_array_equal(cp.permutation(16, 4, "striped"), striped)
    np.testing.assert_array_equal(cp.permutation(12, 3, "contiguous"), np.arange(12))


@pytest.mark.parametrize("layout", list(cp.Layout))
@pytest.mark.parametrize("L,n", [(48, 8), (24, 6), (16, 1)])
def test_permutation_formulas_and_inverse(layout, L, n):
    perm, inv = cp.permutation(L, n, layout), cp.inverse_permutation(L, n, layout)
    np.testing.assert_array_equal(np.sort(perm), np.arange(L))
    np.testing.assert_array_equal(perm[inv], np.arange(L))
    T, c, p = L // n, L // (2 * n), np.arange(L)
    r, t = p // T, p % T
    expected = {
        "contiguous": p,
        "striped": r + n * t,  # device r holds tokens r, r + n, r + 2n, ...
        "zigzag": np.where(t < c, r * c + t, (2 * n - 1 - r) * c + (t - c)),  # chunks r and 2n-1-r
    }[layout]
    np.testing.assert_array_equal(perm, expected)
    if layout == "striped":  # inverse closed form: o -> (o mod n) T + o // n
        np.testing.assert_array_equal(inv, (p % n) * T + p // n)


def test_apply_layout_batch_round_trip_and_positions():
    r = np.random.default_rng(0)
    seg = np.asarray([[1] * 10 + [2] * 6, [1] * 16], np.int32)
    batch = dict(inputs=r.integers(0, 9, (2, 16)).astype(np.int32), targets=r.integers(0, 9, (2, 16)).astype(np.int32),
                 loss_mask=r.random((2, 16)) < 0.5, segment_ids=seg)
    out = cp.apply_layout(batch, n=4, layout="zigzag")
    perm = cp.permutation(16, 4, "zigzag")
    assert set(out) == set(batch) | {"positions"}
    want_pos = np.asarray([list(range(10)) + list(range(6)), list(range(16))], np.int32)
    np.testing.assert_array_equal(out["positions"], want_pos[:, perm])  # positions of the unpermuted sequence
    for key in batch:
        assert out[key].dtype == batch[key].dtype
        np.testing.assert_array_equal(cp.undo_layout(out[key], n=4, layout="zigzag"), batch[key])
    given = cp.apply_layout(out | {"positions": want_pos}, n=2, layout="striped")  # given positions are permuted
    np.testing.assert_array_equal(given["positions"], want_pos[:, cp.permutation(16, 2, "striped")])
    x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    back = cp.undo_layout(cp.apply_layout({"x": x}, n=4, layout="striped")["x"], n=4, layout="striped")
    np.testing.assert_allclose(back, x, **EXACT)


def test_layout_errors():
    with pytest.raises(ValueError, match="divisible by 8 for layout='zigzag'"):
        cp.permutation(12, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by 5"):
        cp.permutation(12, 5, "striped")
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.permutation(16, 4, "diagonal")
    with pytest.raises(ValueError, match="permutation: n=0 is out of range; allowed: >= 1"):
        cp.permutation(16, 0, "contiguous")
    with pytest.raises(TypeError, match="permutation: n must be an int"):  # lcjax.checks: True is not an int
        cp.permutation(16, True, "contiguous")
    with pytest.raises(ValueError, match="same length"):
        cp.apply_layout({"a": np.zeros((2, 8)), "b": np.zeros((2, 4))}, n=2, layout="zigzag")
    with pytest.raises(ValueError, match="length axis"):
        cp.apply_layout({"a": np.zeros((2, 8)), "step": np.zeros(())}, n=2, layout="zigzag")


# ---- load balance ----------------------------------------------------------------------------------------------------
def _layout_positions(L, n, layout, B=1):
    return np.broadcast_to(cp.permutation(L, n, layout), (B, L))


def test_zigzag_balances_causal_work():
    """Score tiles the ring kernel computes per device (its own skip rules): zigzag max/mean <= 1.05."""
    L, n = 128, 8
    work = {lay: cp.ring_work(_layout_positions(L, n, lay), _layout_positions(L, n, lay), n=n) for lay in cp.Layout}
    ratio = {lay: w.max() / w.mean() for lay, w in work.items()}
    assert ratio["zigzag"] <= 1.05, work["zigzag"]
    # tiles are half a shard (default_block): zigzag computes 3 tiles on the diagonal hop and 2 on every other one
    np.testing.assert_array_equal(work["zigzag"], 3 + 2 * (n - 1))
    np.testing.assert_array_equal(work["contiguous"], 3 + 4 * np.arange(n))  # device r sees r full blocks
    assert ratio["contiguous"] > 1.8
    # striped: balanced, but a tile spans n·block positions, so only the (q tile 0, kv tile 1) pair is ever skipped
    np.testing.assert_array_equal(work["striped"], 3 * n)
    assert work["zigzag"].sum() == work["contiguous"].sum()  # zigzag balances without extra work
    # bidirectional: every tile everywhere
    np.testing.assert_array_equal(cp.ring_work(_layout_positions(L, n, "zigzag"), _layout_positions(L, n, "zigzag"),
                                               n=n, causal=False), 4 * n)


def test_pair_balance_closed_forms():
    """Unmasked (q, k) pairs per device (note §2): contiguous (2L-T+1)/(L+1), striped 1+(n-1)/(L+1), zigzag 1."""
    L, n = 128, 8
    T = L // n
    ratio = {}
    for lay in cp.Layout:
        w = cp.pair_work(_layout_positions(L, n, lay), n=n)
        assert w.sum() == L * (L + 1) // 2
        ratio[lay] = w.max() / w.mean()
    np.testing.assert_allclose(ratio["contiguous"], (2 * L - T + 1) / (L + 1), rtol=1e-12)
    np.testing.assert_allclose(ratio["striped"], 1 + (n - 1) / (L + 1), rtol=1e-12)
    assert ratio["zigzag"] == 1.0


# ---- dispatcher ------------------------------------------------------------------------------------------------------
def test_dispatcher_under_mesh_and_without():
    r = np.random.default_rng(1)
    B, L, H, K, Pd, n = 2, 32, 4, 2, 8, 4
    q, k, v = (jnp.asarray(r.normal(size=(B, L, h, Pd)), jnp.float32) for h in (H, K, K))
    perm = cp.permutation(L, n, "zigzag")
    pos = jnp.broadcast_to(jnp.asarray(perm), (B, L))
    want = attention_reference(q[:, perm], k[:, perm], v[:, perm], q_positions=pos, kv_positions=pos, window=10)
    mesh = sharding.make_mesh(context=n, data=2)
    with sharding.use(mesh, sharding.ShardingRules.context_parallel()):
        args = [sharding.shard(x[:, perm], "act_batch", "act_seq", None, None) for x in (q, k, v)]
        pos_s = sharding.shard(pos, "act_batch", "act_seq")
        for strategy in ("ring", "allgather"):
            got = jax.jit(lambda q, k, v, p, s=strategy: cp.context_parallel_attention(
                q, k, v, q_positions=p, kv_positions=p, window=10, strategy=s))(*args, pos_s)
            assert got.sharding.spec[:2] == ("data", "context")
            np.testing.assert_allclose(got, want, **F32_RING)
        with pytest.raises(ValueError, match="divisible by the context-parallel size 4"):
            cp.context_parallel_attention(q[:, :30], k[:, :30], v[:, :30], q_positions=pos[:, :30],
                                          kv_positions=pos[:, :30])
        with pytest.raises(ValueError, match="strategy must be one of"):
            cp.context_parallel_attention(q, k, v, q_positions=pos, kv_positions=pos, strategy="ulysses")
    got = cp.context_parallel_attention(q[:, perm], k[:, perm], v[:, perm], q_positions=pos, kv_positions=pos,
                                        window=10)  # no mesh: one device
    np.testing.assert_allclose(got, want, **F32_RING)
