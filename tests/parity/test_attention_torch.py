"""Attention ops against ``torch.nn.functional.scaled_dot_product_attention`` in float64: out, lse and the
gradients dq, dk, dv of a random-cotangent loss on both. The torch side builds its own float mask from the rule
in ``lcjax.ops.masks`` and repeats kv heads for GQA/MQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcjax.ops import attention as A
from tests.ops.test_attention_ops import CASES, make_inputs
from tests.tolerances import F32_OP

pytestmark = pytest.mark.torch

# Torch's SDPA has no defined output for a query that sees no key, so the rows-without-keys case is left to the
# float64 numpy test in test_attention_ops.py.
TORCH_CASES = [name for name in CASES if name != "fully_masked_rows"]


def torch_attention(q, k, v, g_out, g_lse, *, causal, window=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None):
    """Float64 torch: SDPA output, logsumexp of the masked scores, and autograd of sum(out·g_out + lse·g_lse)."""
    t = lambda x: torch.tensor(np.asarray(x, np.float64), requires_grad=True)  # noqa: E731
    q_t, k_t, v_t = t(q), t(k), t(v)
    B, L, H, P = q_t.shape
    S, K = k_t.shape[1], k_t.shape[2]
    qp = torch.arange(L).expand(B, L) if q_positions is None else torch.tensor(np.asarray(q_positions))
    kp = torch.arange(S).expand(B, S) if kv_positions is None else torch.tensor(np.asarray(kv_positions))
    qs = torch.zeros(B, L) if q_segment_ids is None else torch.tensor(np.asarray(q_segment_ids))
    ks = torch.zeros(B, S) if kv_segment_ids is None else torch.tensor(np.asarray(kv_segment_ids))
    allowed = qs[:, :, None] == ks[:, None, :]
    diff = qp[:, :, None] - kp[:, None, :]
    if causal:
        allowed = allowed & (diff >= 0)
    if window is not None:
        allowed = allowed & ((diff if causal else diff.abs()) < window)
    bias = torch.zeros(B, 1, L, S, dtype=torch.float64).masked_fill(~allowed[:, None], torch.finfo(torch.float64).min)
    qh = q_t.transpose(1, 2)  # [B, H, L, P]
    kh = k_t.transpose(1, 2).repeat_interleave(H // K, dim=1)  # query head h uses kv head h // (H // K)
    vh = v_t.transpose(1, 2).repeat_interleave(H // K, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias).transpose(1, 2)
    lse = torch.logsumexp(qh @ kh.transpose(-1, -2) / P**0.5 + bias, dim=-1).transpose(1, 2)  # [B, L, H]
    cotangent = lambda g: torch.tensor(np.asarray(g, np.float64))  # noqa: E731
    ((out * cotangent(g_out)).sum() + (lse * cotangent(g_lse)).sum()).backward()
    return [x.detach().numpy() for x in (out, lse, q_t.grad, k_t.grad, v_t.grad)]


def _jax_outputs_and_grads(fn, q, k, v, kw, g_out, g_lse):
    def run(q, k, v):
        (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_lse=True, **kw), q, k, v)
        return (out, lse, *vjp((g_out, g_lse)))

    return jax.jit(run)(q, k, v)


# blockwise on every case; the reference on a subset (blockwise == reference is tested on all in test_attention_ops)
PARAMS = [(name, "blockwise") for name in TORCH_CASES] + [
    (name, "reference") for name in ("causal", "gqa_window", "padded_kv_bidir", "custom_positions")]


@pytest.mark.parametrize(("name", "impl"), PARAMS)
def test_attention_matches_torch_sdpa(name, impl, rng):
    q, k, v, kw = make_inputs(CASES[name], rng)
    g_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    g_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    expected = torch_attention(q, k, v, g_out, g_lse, **kw)
    fn = (lambda *a, **kw_: A.blockwise_attention(*a, block_q=8, block_kv=12, **kw_)) if impl == "blockwise" \
        else A.attention_reference
    got = _jax_outputs_and_grads(fn, q, k, v, kw, g_out, g_lse)
    for what, x, x_t in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(np.asarray(x), x_t, err_msg=what, **F32_OP)
