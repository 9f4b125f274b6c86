"""lcjax.ops.rope without torch: the length switches are traceable, partial rotary passes the tail through, angles
stay float32 for bf16 inputs, static NTK is a theta change, and bad RopeConfigs raise naming the field.
(Parity with transformers: tests/parity/test_rope_torch.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ops import rope as rope_ops
from tests.tolerances import BF16, EXACT, F32_OP

DYNAMIC = rope_ops.RopeConfig(rope_type="dynamic", factor=2.0, max_position_embeddings=32)
LONGROPE = rope_ops.RopeConfig(rope_type="longrope", original_max_position_embeddings=32, factor=4.0,
                               short_factor=(1.0,) * 4, long_factor=(1.0, 2.0, 4.0, 8.0))  # fmt: skip


def x_and_positions(L, P=8, start=0, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(L), (2, L, 3, P)).astype(dtype)
    return x, start + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (2, L))


@pytest.mark.parametrize("cfg", [DYNAMIC, LONGROPE], ids=["dynamic", "longrope"])
def test_length_switch_is_traceable(cfg):
    """Under jit, seq_len = max(positions) + 1 picks the schedule; equal to the static frequencies at that length."""
    f = jax.jit(lambda x, p: rope_ops.rope(x, p, cfg))
    for L in (32, 33, 48):
        x, pos = x_and_positions(L)
        inv, s = rope_ops.rope_frequencies(8, cfg, seq_len=L)
        np.testing.assert_allclose(f(x, pos), rope_ops.apply_rope(x, pos, inv, s), **F32_OP)
    x, pos = x_and_positions(1, start=40)  # one decode step at position 40: seq_len 41, past the threshold
    long, s = rope_ops.rope_frequencies(8, cfg, seq_len=41)
    np.testing.assert_allclose(f(x, pos), rope_ops.apply_rope(x, pos, long, s), **F32_OP)
    short, _ = rope_ops.rope_frequencies(8, cfg)
    assert not np.allclose(long, short)


def test_static_ntk_is_dynamic_at_one_length():
    """Dynamic NTK at seq_len = L0 (2 - 1/s) uses base b s^(d/(d-2)), i.e. static NTK's theta."""
    theta = rope_ops.RopeConfig.static_ntk(10_000.0, 2.0, 8)
    assert theta == pytest.approx(10_000.0 * 2.0 ** (8 / 6))
    static, _ = rope_ops.rope_frequencies(8, rope_ops.RopeConfig(theta=theta))
    dynamic, _ = rope_ops.rope_frequencies(8, DYNAMIC, seq_len=48)
    np.testing.assert_allclose(dynamic, static, **F32_OP)


def test_partial_rotary_passes_the_tail_through():
    cfg = rope_ops.RopeConfig(partial_rotary_factor=0.5)
    x, pos = x_and_positions(5, P=16)
    y = rope_ops.rope(x, pos, cfg, head_dim=16)
    np.testing.assert_allclose(y[..., 8:], x[..., 8:], **EXACT)
    inv, s = rope_ops.rope_frequencies(16, cfg)
    assert inv.shape == (4,)
    np.testing.assert_allclose(y[..., :8], rope_ops.apply_rope(x[..., :8], pos, inv, s), **EXACT)


def test_angles_are_float32_for_bf16_inputs():
    """At positions ~4000 a bf16 angle would be off by up to 16 rad; float32 angles keep bf16 outputs close."""
    cfg = rope_ops.RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    x, pos = x_and_positions(4, start=4000)
    want = rope_ops.rope(x, pos, cfg)
    got = rope_ops.rope(x.astype(jnp.bfloat16), pos, cfg)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, **BF16)


def test_attention_factor_scales_cos_and_sin():
    """yarn's default 0.1 ln s + 1 multiplies the rotated vector's norm."""
    cfg = rope_ops.RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    x, pos = x_and_positions(3)
    ratio = jnp.linalg.norm(rope_ops.rope(x, pos, cfg), axis=-1) / jnp.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(ratio, 0.1 * np.log(4.0) + 1, **F32_OP)


def test_none_fields_are_resolved():
    a = rope_ops.RopeConfig(rope_type="yarn", factor=None, max_position_embeddings=128,
                            original_max_position_embeddings=32)
    assert a.factor == 4.0
    b = rope_ops.RopeConfig(rope_type="llama3", factor=8.0, max_position_embeddings=64)
    assert b.original_max_position_embeddings == 64


BAD = [
    (lambda: rope_ops.RopeConfig(rope_type="ntk-by-parts"), ValueError, "RopeConfig.rope_type"),
    (lambda: rope_ops.RopeConfig(rope_type="linear", factor=0.5), ValueError, r"RopeConfig.factor=0.5 is out of range"),
    (lambda: rope_ops.RopeConfig(rope_type="dynamic", factor=2.0), ValueError, "RopeConfig.max_position_embeddings is "
                                                                               "required for rope_type='dynamic'"),
    (lambda: rope_ops.RopeConfig(rope_type="llama3", factor=8.0), ValueError,
     "RopeConfig.original_max_position_embeddings is required"),
    (lambda: rope_ops.RopeConfig(rope_type="yarn", factor=None, original_max_position_embeddings=8), ValueError,
     r"RopeConfig.factor=None for rope_type='yarn' needs RopeConfig.max_position_embeddings"),
    (lambda: rope_ops.RopeConfig(rope_type="linear", factor=None), ValueError, "allowed for yarn/longrope only"),
    (lambda: rope_ops.RopeConfig(rope_type="longrope", original_max_position_embeddings=8, long_factor=(1.0,)),
     ValueError, "RopeConfig.short_factor is required"),
    (lambda: rope_ops.RopeConfig(rope_type="longrope", original_max_position_embeddings=8, short_factor=(1.0, 0.0),
                                 long_factor=(1.0, 1.0)), ValueError, r"RopeConfig.short_factor\[1\]=0.0"),
    (lambda: rope_ops.rotary_dim(16, LONGROPE), ValueError, r"RopeConfig.short_factor has 4 entries; rotary_dim/2 = 8"),
    (lambda: rope_ops.RopeConfig(partial_rotary_factor=0.0), ValueError, "RopeConfig.partial_rotary_factor=0.0"),
    (lambda: rope_ops.rotary_dim(6, rope_ops.RopeConfig(partial_rotary_factor=0.5)), ValueError, "must be even"),
    (lambda: rope_ops.RopeConfig(rope_type="yarn", factor=2.0, original_max_position_embeddings=8, beta_fast=1.0,
                                 beta_slow=32.0), ValueError, "RopeConfig.beta_fast=1.0 must be >= beta_slow"),
    (lambda: rope_ops.RopeConfig(rope_type="yarn", factor=2.0, original_max_position_embeddings=8,
                                 attention_factor=-1.0), ValueError, "RopeConfig.attention_factor=-1.0"),
    (lambda: rope_ops.RopeConfig(theta=0.0), ValueError, "RopeConfig.theta=0.0"),
    (lambda: rope_ops.RopeConfig.static_ntk(1e4, 0.5, 8), ValueError, "RopeConfig.static_ntk: factor"),
    (lambda: rope_ops.rope(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), rope_ops.RopeConfig(), head_dim=4),
     ValueError, "rope: x_BLHP head dim 8 != head_dim=4"),
]  # fmt: skip


@pytest.mark.parametrize("make, exc, match", BAD)
def test_bad_rope_inputs_raise(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
