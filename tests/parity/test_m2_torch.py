"""M2 vs PyTorch: a torch reference written here from the formulas (shared/notes/monarch_mixer.md §2-4), with the
released module names, so its ``state_dict`` has the released checkpoint keys and loads through ``lcjax.convert``.

Checks: the DFT as a Monarch product vs ``torch.fft.fft``; the FFT convolution vs upstream's rfft form; the Hyena
filter, the sequence mixer (bidirectional + residual, and causal) and the GLU: forward and every gradient vs
autograd; a tiny M2-BERT end to end (hidden states, MLM logits, pooled embedding).
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from lcjax.convert import m2_bert as convert
from lcjax.layers import m2_filter
from lcjax.layers import monarch_mixer as mm
from lcjax.models.m2_bert import M2BertConfig
from lcjax.ops import fftconv, monarch
from tolerances import C64_FFT, F32_GRAD_REL, F32_MODULE, F32_OP, F64, max_rel_err

pytestmark = pytest.mark.torch
torch.manual_seed(0)


# ---- the torch reference, from the formulas -------------------------------------------------------------------
class Sin(nn.Module):
    def __init__(self, order, w=10.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, order))

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = torch.linspace(0, 1, seq_len)[None, :, None]
        w = 2 * math.pi * torch.arange(seq_len)[None, :, None] / seq_len
        f = torch.linspace(1e-4, (emb_dim - 1) // 2 - 1, (emb_dim - 1) // 2)[None, None]
        z = torch.exp(-1j * f * w)
        self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1) + 0.1 * torch.randn(1, seq_len, emb_dim))
        self.register_buffer("t", t)


class Modulation(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.register_buffer("deltas", torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d)[None, None])


class Filter(nn.Module):
    def __init__(self, d, seq_len, emb_dim, order, bidirectional):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d))
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len)
        act = Sin(order)  # ONE Sin, shared by every activation slot of both MLPs
        with torch.no_grad():
            act.freq.add_(torch.randn(1, order))
        mlp = lambda: nn.Sequential(nn.Linear(emb_dim, order), act, nn.Linear(order, order), act,
                                    nn.Linear(order, order), act, nn.Linear(order, d, bias=False))  # fmt: skip
        self.implicit_filter = mlp()
        if bidirectional:
            self.implicit_filter_rev = mlp()
        self.modulation = Modulation(d)

    def kernel(self, L, rev=False):
        z, t = self.pos_emb.z[:, :L], self.pos_emb.t[:, :L]
        h = (self.implicit_filter_rev if rev else self.implicit_filter)(z)
        return (h * torch.exp(-t * self.modulation.deltas.abs()))[0].T  # (d, L)


def torch_conv(u_BDL, k_DL, k_rev_DL=None):
    """Upstream's rfft form: 2L kernel [k, 0] + [0, flip(k_rev)], spectrum / 2L, irfft with norm="forward"."""
    L = u_BDL.shape[-1]
    k = nn.functional.pad(k_DL, (0, L))
    if k_rev_DL is not None:
        k = k + nn.functional.pad(k_rev_DL.flip(-1), (L, 0))
    k_f = torch.fft.rfft(k, n=2 * L) / (2 * L)
    return torch.fft.irfft(torch.fft.rfft(u_BDL, n=2 * L) * k_f, n=2 * L, norm="forward")[..., :L]


class Mixer(nn.Module):
    def __init__(self, d, seq_len, emb_dim, order, bidirectional, residual):
        super().__init__()
        self.d, self.bidirectional, self.residual = d, bidirectional, residual
        self.in_linear, self.out_linear = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.short_filter = nn.Conv1d(3 * d, 3 * d, kernel_size=3, groups=3 * d, padding=2)
        self.filter_fn = Filter(d, seq_len, emb_dim, order, bidirectional)
        if residual:
            self.filter_fn2 = Filter(d, seq_len, emb_dim, order, bidirectional)

    def long_conv(self, x_BDL, filt):
        L = x_BDL.shape[-1]
        k_rev = filt.kernel(L, rev=True) if self.bidirectional else None
        return torch_conv(x_BDL, filt.kernel(L), k_rev) + x_BDL * filt.bias[None, :, None]

    def forward(self, u):
        L = u.shape[1]
        uc = self.short_filter(self.in_linear(u).transpose(1, 2))[..., :L]
        x1, x2, v = uc.split(self.d, dim=1)
        y = self.long_conv(v * x1, self.filter_fn) * x2
        if self.residual:
            y = y + self.long_conv(u.transpose(1, 2), self.filter_fn2)
        return self.out_linear(y.transpose(1, 2))


class BlockdiagLinear(nn.Module):
    def __init__(self, n_in, n_out, nblocks=4, bias=True):
        super().__init__()
        self.nb = nblocks
        self.weight = nn.Parameter(torch.randn(nblocks, n_out // nblocks, n_in // nblocks) / math.sqrt(n_in / nblocks))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out)) if bias else None

    def forward(self, x):
        y = torch.einsum("...kp,kqp->...kq", x.reshape(*x.shape[:-1], self.nb, -1), self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias


class GLU(nn.Module):
    def __init__(self, d, inner, nblocks=4):
        super().__init__()
        self.inner = inner
        self.gated_layers = BlockdiagLinear(d, 2 * inner, nblocks, bias=False)
        self.wo = BlockdiagLinear(inner, d, nblocks)
        self.layernorm = nn.LayerNorm(d, eps=1e-12)
        with torch.no_grad():
            self.layernorm.weight.add_(0.1 * torch.randn(d))
            self.layernorm.bias.add_(0.1 * torch.randn(d))

    def forward(self, x):
        h = self.gated_layers(x)
        h = nn.functional.gelu(h[..., : self.inner]) * h[..., self.inner :]
        return self.layernorm(self.wo(h) + x)


class Layer(nn.Module):
    def __init__(self, cfg, bidirectional=True, residual=True):
        super().__init__()
        self.attention = Mixer(cfg.d_model, cfg.max_position_embeddings, cfg.emb_dim, cfg.filter_order,
                               bidirectional, residual)  # fmt: skip
        self.mlp = GLU(cfg.d_model, cfg.d_ff, cfg.nblocks)

    def forward(self, h):
        return self.mlp(self.attention(h))


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None])

    def forward(self, ids, token_types):
        h = self.word_embeddings(ids) + self.token_type_embeddings(token_types)
        return self.LayerNorm(h + self.position_embeddings(self.position_ids[:, : ids.shape[1]]))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList([Layer(cfg) for _ in range(cfg.n_layers)])


class Bert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings, self.encoder = Embeddings(cfg), Encoder(cfg)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, ids, token_types, mask):
        h = self.embeddings(ids, token_types)
        for layer in self.encoder.layer:
            h = layer(h)
        m = mask.float()
        pooled = torch.tanh(self.pooler.dense((h * m[..., None]).sum(1) / m.sum(1, keepdim=True)))  # pool_all
        return h, pooled


class ForMaskedLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.bert = Bert(cfg)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        t = self.cls.predictions.transform = nn.Module()
        t.dense, t.LayerNorm = nn.Linear(cfg.d_model, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.cls.predictions.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def forward(self, ids, token_types, mask):
        h, pooled = self.bert(ids, token_types, mask)
        p = self.cls.predictions
        logits = p.decoder(p.transform.LayerNorm(nn.functional.gelu(p.transform.dense(h))))
        return h, logits, pooled


# ---- helpers ----------------------------------------------------------------------------------------------------
def load(module, params: dict):
    """Set every Param of ``module`` from ``params`` (path tuple -> array); all must be used."""
    for path, var in nnx.to_flat_state(nnx.state(module, (nnx.Param, m2_filter.Buffer))):
        var.value = jnp.asarray(params.pop(path), var.value.dtype)
    assert not params, sorted(params)[:4]
    return module


def layer_arrays(named: dict, cfg: M2BertConfig, part: str) -> dict:
    """torch-named arrays of layer 0 (``attention.*``/``mlp.*``) -> lcjax paths under ``part`` via the converter."""
    full = {f"encoder.layer.0.{k}": v for k, v in named.items()}
    layer = Layer(cfg, cfg.bidirectional, cfg.residual_long_conv)
    for k, v in layer.state_dict().items():  # fill the other half of the layer (unused) so the map is complete
        full.setdefault(f"encoder.layer.0.{k}", v.detach().numpy())
    for k, v in list(full.items()):  # named_parameters lists the shared Sin once; a state_dict has six copies
        if k.endswith("implicit_filter.1.freq") and k[len("encoder.layer.0.") :] in named:
            for mlp in ("implicit_filter", "implicit_filter_rev"):
                for j in (1, 3, 5):
                    full[k.replace("implicit_filter.1.freq", f"{mlp}.{j}.freq")] = v
    full = {k: np.asarray(v) for k, v in full.items()}
    out = convert._layer_params(full, 0, cfg, set())
    return {k[1:]: v for k, v in out.items() if k[0] == part}


def torch_named(module, prefix, grads=False):
    return {f"{prefix}{k}": (p.grad if grads else p).detach().numpy().copy() for k, p in module.named_parameters()}


def cfg_tiny(**kw):
    return M2BertConfig.tiny(**kw)


# ---- ops --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, b1", [(16, None), (32, None), (256, 8), (1024, None), (2048, 16), (4096, None)])
def test_monarch_fft_vs_torch(n, b1):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(2, n)) + 1j * rng.normal(size=(2, n))).astype(np.complex64)
    ref = torch.fft.fft(torch.from_numpy(x)).numpy()
    out = np.asarray(jax.jit(monarch.monarch_fft, static_argnums=1)(x, b1))
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) <= C64_FFT["rtol"]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fftconv_vs_torch_rfft_form(bidirectional):
    rng = np.random.default_rng(1)
    L, D = 64, 3
    u, k, kr = (rng.normal(size=s).astype(np.float32) for s in [(2, L, D), (L, D), (L, D)])
    kr = kr if bidirectional else None
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, -1, -2)))
    ref = torch_conv(t(u), t(k), t(kr)).numpy().swapaxes(-1, -2)
    for impl in ("jnp_fft", "monarch"):
        np.testing.assert_allclose(fftconv.fftconv(u, k, k_rev_LD=kr, impl=impl), ref, **F32_OP)


# ---- layers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [True, False])
def test_sequence_mixer_forward_and_grads(bidirectional):
    """Bidirectional + residual (M2-BERT) and causal (``bidirectional=False``, the causal FFT-conv form (a))."""
    cfg = cfg_tiny(bidirectional=bidirectional, residual_long_conv=bidirectional)
    ref = Mixer(cfg.d_model, 16, cfg.emb_dim, cfg.filter_order, bidirectional, bidirectional)
    cls = mm.M2SequenceMixer if bidirectional else mm.CausalM2Mixer
    mixer = load(nnx.eval_shape(lambda: cls(cfg.sequence_mixer_config(), rngs=nnx.Rngs(0))),
                 layer_arrays(torch_named(ref, "attention."), cfg, "mixer"))  # fmt: skip
    rng = np.random.default_rng(2)
    x, cot = rng.normal(size=(2, 12, cfg.d_model)).astype(np.float32), rng.normal(size=(2, 12, cfg.d_model))
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = ref(xt)
    (out_t * torch.from_numpy(cot.astype(np.float32))).sum().backward()
    loss = lambda m, v: jnp.sum(m(v) * cot.astype(np.float32))
    (g_mixer, g_x), out = jax.jit(jax.grad(loss, argnums=(0, 1)))(mixer, x), jax.jit(lambda m, v: m(v))(mixer, x)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **F32_MODULE)
    assert max_rel_err(g_x, xt.grad.numpy()) <= F32_GRAD_REL
    ref_grads = layer_arrays(torch_named(ref, "attention.", grads=True), cfg, "mixer")
    ref_grads = {k: v for k, v in ref_grads.items() if k[-1] not in ("t", "deltas")}  # buffers: no gradient
    grads = dict(nnx.to_flat_state(nnx.state(g_mixer, nnx.Param)))
    assert set(grads) == set(ref_grads)  # every parameter, including z, the skip D and the shared freq
    for path, g in grads.items():
        assert max_rel_err(g.value, ref_grads[path]) <= F32_GRAD_REL, path
    # the filter alone, at L = l_max and L < l_max
    for L in (16, 9):
        k, k_rev = mixer.filter_fn.kernels(L)
        np.testing.assert_allclose(k, ref.filter_fn.kernel(L).detach().numpy().T, **F32_OP)
        if bidirectional:
            np.testing.assert_allclose(k_rev, ref.filter_fn.kernel(L, rev=True).detach().numpy().T, **F32_OP)


def test_dimension_mixer_forward_and_grads():
    cfg = cfg_tiny()
    ref = GLU(cfg.d_model, cfg.d_ff)
    glu = load(nnx.eval_shape(lambda: mm.M2DimensionMixer(cfg.dimension_mixer_config(), rngs=nnx.Rngs(0))),
               layer_arrays(torch_named(ref, "mlp."), cfg, "mlp"))  # fmt: skip
    rng = np.random.default_rng(3)
    x, cot = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32), rng.normal(size=(2, 5, cfg.d_model))
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = ref(xt)
    (out_t * torch.from_numpy(cot.astype(np.float32))).sum().backward()
    np.testing.assert_allclose(jax.jit(lambda m, v: m(v))(glu, x), out_t.detach().numpy(), **F32_MODULE)
    g_glu, g_x = jax.jit(jax.grad(lambda m, v: jnp.sum(m(v) * cot.astype(np.float32)), argnums=(0, 1)))(glu, x)
    assert max_rel_err(g_x, xt.grad.numpy()) <= F32_GRAD_REL
    ref_grads = layer_arrays(torch_named(ref, "mlp.", grads=True), cfg, "mlp")
    for path, g in nnx.to_flat_state(nnx.state(g_glu, nnx.Param)):
        assert max_rel_err(g.value, ref_grads[path]) <= F32_GRAD_REL, path


def test_tiny_m2_bert_end_to_end_from_torch_state_dict():
    """float64: equal to 1e-10 (the math). float32: per layer the tests above hold 1e-5; across two layers of
    random N(0, 1) weights torch's own f32 error is ~2e-5, so lcjax f32 must be as close to the f64 truth as torch's."""
    cfg = cfg_tiny()
    ref = ForMaskedLM(cfg)
    ref64 = copy.deepcopy(ref).double()
    rng = np.random.default_rng(4)
    ids, types = rng.integers(0, cfg.vocab_size, size=(2, 16)), rng.integers(0, 2, size=(2, 16))
    ones = np.ones((2, 16), np.int64)

    def released(module):
        sd = {"bert." + k if not k.startswith(("bert.", "cls.")) else k: v for k, v in module.state_dict().items()}
        sd["bert.encoder.layer.0.attention.flashfft.twiddle_factors_fft_32_32"] = torch.zeros(4, 4)  # skipped
        return sd

    def run_torch(module):
        with torch.no_grad():
            return [a.numpy() for a in module(*(torch.from_numpy(a) for a in (ids, types, ones)))]

    @jax.jit
    def forward(m, i, tt):
        h = m(i, token_type_ids_BL=tt)
        return h, m.mlm_logits(h), m.pooled(h, jnp.ones(i.shape, bool))

    truth, torch32 = run_torch(ref64), run_torch(ref)
    with jax.enable_x64(True):
        model64 = convert.m2_bert_from_state_dict(released(ref64), param_dtype=np.float64)  # torch tensors as is
        for out, want in zip(forward(model64, ids, types), truth):
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, want, **F64)
    model = convert.m2_bert_from_state_dict(released(ref))
    for out, want, theirs in zip(forward(model, ids.astype(np.int32), types.astype(np.int32)), truth, torch32):
        ours_err, torch_err = np.max(np.abs(out - want)), np.max(np.abs(theirs - want))
        assert ours_err <= 2 * torch_err + F32_OP["atol"], (ours_err, torch_err)
