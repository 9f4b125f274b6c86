"""Activation Beacon vs PyTorch: HF ``LlamaForCausalLM`` for inputs the beacons cannot reach, and a PyTorch reference
of the streaming algorithm written here from the paper / notes (HF Llama weights and modules, explicit beacon
interleaving or appending, additive float 4D masks, separate beacon projections), logits and beacon gradients."""

import jax
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests
from flax import nnx  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half  # noqa: E402

from lcjax.convert import llama as convert  # noqa: E402
from lcjax.layers.beacon import BeaconConfig, BeaconParam  # noqa: E402
from lcjax.models import beacon as beacon_lib  # noqa: E402
from lcjax.train import beacon as train_lib  # noqa: E402
from tests.tolerances import F32_GRAD_REL, F32_MODULE, max_rel_err  # noqa: E402

pytestmark = pytest.mark.torch
VOCAB, W = 101, 8


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    return model


def beacon_model(hf, **kw):
    cfg = BeaconConfig(**(dict(window=W, embed_init=2) | kw))
    m = beacon_lib.add_beacons(convert.llama_from_hf(hf), cfg, rngs=nnx.Rngs(0))
    state = nnx.state(m, BeaconParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(m, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return m


def torch_beacon_weights(m):
    """The beacon parameters as torch Linear weights ([out, in]) with requires_grad, per layer."""
    D = m.base.cfg.d_model
    t = lambda a: torch.tensor(np.asarray(a), requires_grad=True)
    layers = []
    for bl in m.beacon_layers:
        w = {}
        for name in m.cfg.beacon_params:
            a = np.asarray(getattr(bl, f"{name}_proj")[...])
            w[name] = t(a.reshape(a.shape[0] * a.shape[1], D).T if name == "o" else a.reshape(D, -1).T)
        layers.append(w)
    return t(np.asarray(m.beacon_embed_tokens[...])), layers


def chunk_slots(cfg, raw_ids, filled, complete):
    """[(token id or None for a beacon, window raw index or beacon number)] for one chunk."""
    slots = []
    for j, tok in enumerate(raw_ids):
        slots.append((tok, filled + j))
        if cfg.scheme == "interleave" and (filled + j + 1) % cfg.ratio == 0:
            slots.append((None, (filled + j + 1) // cfg.ratio - 1))
    if cfg.scheme == "step_expansion" and complete:
        slots += [(None, i) for i in range(cfg.window // cfg.ratio)]
    return slots


def torch_reference(hf, cfg, beacon_embed, beacon_w, tokens):
    """Raw-token logits [L, V] of one sequence, windows processed one at a time (whole windows per chunk)."""
    lm, L = hf.model, len(tokens)
    H, K = hf.config.num_attention_heads, hf.config.num_key_value_heads
    P = hf.config.hidden_size // H
    mem = [(torch.zeros(1, K, 0, P), torch.zeros(1, K, 0, P)) for _ in lm.layers]  # pre-RoPE keys, values
    sink = [None] * len(lm.layers)
    logits = []
    for start in range(0, L, cfg.window):
        raw = tokens[start : start + cfg.window]
        slots = chunk_slots(cfg, raw, 0, complete=len(raw) == cfg.window)
        is_b = torch.tensor([tok is None for tok, _ in slots])
        ids = torch.tensor([0 if tok is None else tok for tok, _ in slots])
        x = torch.where(is_b[:, None], beacon_embed, lm.embed_tokens(ids))[None]  # [1, U, D]
        n_mem = mem[0][0].shape[2] + (0 if sink[0] is None else cfg.sink_size)
        U = len(slots)
        pos = torch.arange(n_mem + U)
        allowed = torch.ones(U, n_mem + U, dtype=torch.bool)
        for u, (tok, idx) in enumerate(slots):
            for v, (tok2, idx2) in enumerate(slots):
                if cfg.scheme == "interleave":
                    ok = v <= u
                elif tok is None:  # step-expansion beacon idx: raw j < (idx + 1) * r, and itself
                    ok = (tok2 is not None and idx2 < (idx + 1) * cfg.ratio) or v == u
                else:
                    ok = tok2 is not None and idx2 <= idx
                allowed[u, n_mem + v] = ok
            if cfg.scheme == "step_expansion" and tok is None:
                pos[n_mem + u] = n_mem + (idx + 1) * cfg.ratio
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        new_kv = []
        for li, layer in enumerate(lm.layers):
            attn, bw = layer.self_attn, beacon_w[li]
            h = layer.input_layernorm(x)

            def proj(name, base_linear, h=h, bw=bw):
                y = base_linear(h)
                return torch.where(is_b[None, :, None], h @ bw[name].T, y) if name in bw else y

            q = proj("q", attn.q_proj).view(1, U, H, P).transpose(1, 2)
            k = proj("k", attn.k_proj).view(1, U, K, P).transpose(1, 2)
            v = proj("v", attn.v_proj).view(1, U, K, P).transpose(1, 2)
            new_kv.append((k, v))
            parts_k = ([] if sink[li] is None else [sink[li][0]]) + [mem[li][0], k]
            parts_v = ([] if sink[li] is None else [sink[li][1]]) + [mem[li][1], v]
            k_all, v_all = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
            cos, sin = lm.rotary_emb(x, pos[None])
            cos, sin = cos[:, None], sin[:, None]
            k_all = k_all * cos + rotate_half(k_all) * sin
            q = q * cos[:, :, n_mem:] + rotate_half(q) * sin[:, :, n_mem:]
            k_all, v_all = repeat_kv(k_all, H // K), repeat_kv(v_all, H // K)
            scores = q @ k_all.transpose(2, 3) / P**0.5 + mask
            out = (torch.softmax(scores.float(), dim=-1) @ v_all).transpose(1, 2).reshape(1, U, H * P)
            y = attn.o_proj(out)
            if "o" in bw:
                y = torch.where(is_b[None, :, None], out @ bw["o"].T, y)
            x = x + y
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits.append(hf.lm_head(lm.norm(x[0, ~is_b])))
        if len(raw) == cfg.window:  # window complete: keep the beacons (and, once, the sink), drop the raw K/V
            for li, (k, v) in enumerate(new_kv):
                if sink[li] is None and cfg.sink_size:
                    raw_idx = torch.nonzero(~is_b)[: cfg.sink_size, 0]
                    sink[li] = (k[:, :, raw_idx], v[:, :, raw_idx])
                mem[li] = (torch.cat([mem[li][0], k[:, :, is_b]], 2), torch.cat([mem[li][1], v[:, :, is_b]], 2))
    return torch.cat(logits, 0)


CASES = {
    "v2-interleave-r2-sink1": dict(scheme="interleave", ratio=2, train_ratios=(2,), sink_size=1),
    "v2-interleave-r4": dict(scheme="interleave", ratio=4, train_ratios=(4,)),
    "v1-step_expansion-r4-qkvo": dict(scheme="step_expansion", ratio=4, train_ratios=(4,),
                                      beacon_params=("q", "k", "v", "o")),
}  # fmt: skip


def test_inputs_beacons_cannot_reach_equal_hf(hf):
    """v1: up to one whole window (its beacons are appended but unseen by raw tokens) == HF, a full and a shorter
    row in one padded batch; v2: fewer tokens than the ratio r."""
    rng = np.random.default_rng(0)
    forward = jax.jit(lambda m, x, n: m(x, lengths_B=n))
    with torch.no_grad():
        for kw, lengths in ((CASES["v1-step_expansion-r4-qkvo"], (W, 5)), (CASES["v2-interleave-r4"], (3, 2))):
            t = rng.integers(0, VOCAB, (2, max(lengths))).astype(np.int32)
            ref = hf(torch.as_tensor(t, dtype=torch.long)).logits.numpy()  # causal: a prefix's logits are the same
            out = np.asarray(forward(beacon_model(hf, **kw), t, np.asarray(lengths, np.int32)))
            for b, n in enumerate(lengths):
                np.testing.assert_allclose(out[b, :n], ref[b, :n], **F32_MODULE)
                np.testing.assert_array_equal(out[b, n:], 0.0)


@pytest.mark.parametrize("case", ["v2-interleave-r2-sink1", "v1-step_expansion-r4-qkvo"])
def test_two_windows_match_torch_reference(hf, case):
    """A full window then a partial one, rows of different lengths in one padded batch: logits and the gradients of
    the raw-token loss w.r.t. every beacon parameter (they flow through window 1's beacons) match PyTorch."""
    m = beacon_model(hf, **CASES[case])
    lengths = np.array([W + 6, W + 3], np.int32)
    t = np.random.default_rng(1).integers(0, VOCAB, (2, W + 6)).astype(np.int32)
    batch = dict(inputs=t[:, :-1], targets=t[:, 1:], loss_mask=np.arange(W + 5)[None] < (lengths - 1)[:, None],
                 segment_ids=(np.arange(W + 5)[None] < lengths[:, None]).astype(np.int32))  # fmt: skip
    logits = np.asarray(jax.jit(lambda m, x, n: m(x, lengths_B=n))(m, t, lengths))
    loss, grads = jax.jit(jax.value_and_grad(lambda m, b: train_lib.beacon_loss(m, b)[0]))(m, batch)

    embed, layers = torch_beacon_weights(m)
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        ref = torch_reference(hf, m.cfg, embed, layers, t[b, :n].tolist())
        np.testing.assert_allclose(logits[b, :n], ref.detach().numpy(), **F32_MODULE)
        targets = torch.as_tensor(t[b, 1:n], dtype=torch.long)
        total = total + torch.nn.functional.cross_entropy(ref[: n - 1], targets, reduction="sum")
        count += n - 1
    (total / count).backward()
    np.testing.assert_allclose(loss, (total / count).item(), **F32_MODULE)

    got_embed = np.asarray(grads.beacon_embed_tokens[...])
    assert max_rel_err(got_embed, embed.grad.numpy()) <= F32_GRAD_REL
    D = m.base.cfg.d_model
    for li, bl in enumerate(grads.beacon_layers):
        for name, w in layers[li].items():
            g = np.asarray(getattr(bl, f"{name}_proj")[...])
            g = g.reshape(-1, D).T if name == "o" else g.reshape(D, -1).T
            if w.grad.abs().max() > 0:
                assert max_rel_err(g, w.grad.numpy()) <= F32_GRAD_REL, (li, name, max_rel_err(g, w.grad.numpy()))
            else:  # the last layer's beacon q/o feed nothing: zero in both
                assert np.abs(g).max() == 0 and li == len(layers) - 1 and name in ("q", "o"), (li, name)
