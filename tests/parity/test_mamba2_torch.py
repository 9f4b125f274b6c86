"""lcjax Mamba2 mixer vs HF transformers 5.23.0 ``Mamba2Mixer`` (torch CPU fallback path), weights via convert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Mamba2Config as HFMamba2Config
from transformers.cache_utils import DynamicCache
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from lcjax.convert.mamba2 import mixer_config_from_hf, mixer_from_hf, mixer_params_from_hf, mixer_to_hf
from lcjax.ops import ssd as ssd_ops
from tolerances import EXACT, F32_GRAD_REL, F32_MODULE, F32_OP, max_rel_err

pytestmark = pytest.mark.torch

CASES = {  # chunk 8 with L = 37: the last chunk is partial
    "groups1": dict(n_groups=1),
    "groups2_bias": dict(n_groups=2, use_bias=True, use_conv_bias=False),
}


def hf_mixer(**overrides):
    """A tiny random HF mixer made non-trivial (HF inits A_log = ln(1..H), D = 1, norm = 1, conv bias = 0)."""
    torch.manual_seed(0)
    cfg = HFMamba2Config(
        vocab_size=97, hidden_size=32, expand=2, head_dim=8, num_heads=8, state_size=6, conv_kernel=4,
        chunk_size=8, num_hidden_layers=1, use_cache=False, **overrides,
    )  # fmt: skip
    m = Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        m.A_log.copy_(torch.log(torch.empty(8).uniform_(1, 16)))
        m.D.copy_(torch.randn(8))
        m.dt_bias.copy_(torch.randn(8) - 2.0)
        m.norm.weight.copy_(1 + 0.1 * torch.randn_like(m.norm.weight))
        for p in (m.conv1d.bias, m.in_proj.bias, m.out_proj.bias):
            if p is not None:
                p.copy_(0.1 * torch.randn_like(p))
    return cfg, m


forward = jax.jit(lambda m, x, state: m(x, state=state))
step = jax.jit(lambda m, x, state: m.step(x, state))


@pytest.mark.parametrize("case", CASES)
def test_forward_and_cached_decoding_match_hf(case):
    cfg, m = hf_mixer(**CASES[case])
    mixer = mixer_from_hf(m)
    assert mixer.cfg == mixer_config_from_hf(cfg)
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ref = m(x).numpy()
        cache = DynamicCache(config=cfg)  # HF's cache path: chunked prefill of 30, then 7 single-token updates
        ref_cached = [m(x[:, :30], cache_params=cache)]
        ref_cached += [m(x[:, t : t + 1], cache_params=cache) for t in range(30, 37)]
    y, _ = forward(mixer, jnp.asarray(x.numpy()), None)
    np.testing.assert_allclose(y, ref, **F32_MODULE)

    y_pre, state = forward(mixer, jnp.asarray(x[:, :30].numpy()), None)
    ys = [y_pre]
    for t in range(30, 37):
        y_t, state = step(mixer, jnp.asarray(x[:, t].numpy()), state)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), torch.cat(ref_cached, dim=1).numpy(), **F32_MODULE)
    np.testing.assert_allclose(state.ssm, cache.get_recurrent_state(0).numpy(), **F32_MODULE)
    conv_hf = cache.get_conv_state(0).numpy()[..., 1:]  # (B, conv_dim, K): the last K-1 raw inputs suffice
    conv = jnp.concatenate([a.reshape(2, 3, -1) for a in (state.conv_x, state.conv_B, state.conv_C)], axis=-1)
    np.testing.assert_allclose(jnp.swapaxes(conv, 1, 2), conv_hf, **F32_MODULE)


def test_dt_limit_matches_hf_chunked_path():
    cfg, m = hf_mixer(n_groups=2, time_step_limit=(0.0, 0.05))
    mixer = mixer_from_hf(m)
    assert mixer.cfg.dt_limit == (0.0, 0.05)
    x = torch.randn(1, 21, 32)
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(forward(mixer, jnp.asarray(x.numpy()), None)[0], ref, **F32_MODULE)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_torch_autograd(case):
    cfg, m = hf_mixer(**CASES[case])
    mixer = mixer_from_hf(m)
    x = torch.randn(2, 19, 32, requires_grad=True)
    w = torch.randn(2, 19, 32)
    (m(x) * w).sum().backward()
    ref = mixer_params_from_hf({k: p.grad for k, p in m.named_parameters()}, mixer.cfg)  # same rearrangement

    def loss(mixer, x):
        return jnp.sum(mixer(x)[0] * jnp.asarray(w.numpy()))

    g_mixer, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(mixer, jnp.asarray(x.detach().numpy()))
    grads = nnx.to_pure_dict(nnx.state(g_mixer, nnx.Param))
    flat_ref = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert flat.keys() == flat_ref.keys()
    for key in flat:
        assert max_rel_err(flat[key], flat_ref[key]) <= F32_GRAD_REL, key
    assert max_rel_err(g_x, x.grad.numpy()) <= F32_GRAD_REL


def test_export_round_trip_is_exact():
    _, m = hf_mixer(n_groups=2, use_bias=True)
    exported = mixer_to_hf(mixer_from_hf(m), prefix="backbone.layers.0.mixer.")
    ref = {f"backbone.layers.0.mixer.{k}": v.numpy() for k, v in m.state_dict().items()}
    assert exported.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(exported[key], ref[key], **EXACT)


def test_longmamba_resampling_matches_torch_interpolate():
    v = torch.sort(torch.rand(3, 10), descending=True).values
    for size in (10, 17, 64):
        ref = torch.nn.functional.interpolate(v[:, None], size=size, mode="linear", align_corners=False)[:, 0]
        np.testing.assert_allclose(ssd_ops._interpolate_linear(jnp.asarray(v.numpy()), size), ref.numpy(), **F32_OP)


def test_longmamba_calibration_matches_torch_reference():
    """Thresholds from the paper's recipe, transcribed in torch: clamp the top quantile, sort, resample, cut."""
    torch.manual_seed(1)
    delta = torch.nn.functional.softplus(torch.randn(2, 50, 3) - 1.0)
    A = -torch.rand(3) * 0.2
    lengths, top = (40, 120, 400), 0.2
    decay, theta = ssd_ops.longmamba_calibrate(jnp.asarray(delta.numpy()), jnp.asarray(A.numpy()),
                                               target_lengths=lengths, clamp_top=top)  # fmt: skip
    d = delta.permute(0, 2, 1)  # (B, H, L)
    kth = torch.topk(d, k=int(50 * top), dim=-1).values.min(dim=-1, keepdim=True).values
    d = torch.minimum(d, kth)
    budget = d.sum(-1)
    ref_theta = []
    for T in lengths:
        if T <= 50:
            ref_theta.append(torch.zeros(3))
            continue
        curve = torch.nn.functional.interpolate(torch.sort(d, descending=True, dim=-1).values.reshape(6, 1, 50),
                                                size=T, mode="linear", align_corners=False).reshape(2, 3, T)
        first = torch.argmax((curve.cumsum(-1) > budget[..., None]).int(), dim=-1) + 1
        ref_theta.append(torch.gather(curve, -1, first[..., None])[..., 0].mean(0))
    np.testing.assert_allclose(decay, torch.exp(A[None] * budget).mean(0).numpy(), **F32_OP)
    np.testing.assert_allclose(theta, torch.stack(ref_theta).numpy(), **F32_OP)
