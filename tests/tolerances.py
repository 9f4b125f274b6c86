"""The one tolerance table of the lcjax test suite.

Never loosen an entry to make a test pass: a failure means a bug to find. Each entry says what it compares.
``atol``/``rtol`` are passed to ``np.testing.assert_allclose`` (or the test's own norm, as stated).
"""

import numpy as np

# f32, a single op against its naive reference or a float64 oracle.
F32_OP = dict(atol=1e-5, rtol=1e-5)
# f32, a composite module (several ops, a whole LM) against PyTorch / HF transformers (issue texts: max abs <= 1e-5).
F32_MODULE = dict(atol=1e-5, rtol=1e-5)
# f32 gradients of a composite module against torch autograd: relative error of each parameter's gradient,
# ||g - g_ref||_inf / max(||g_ref||_inf, tiny) <= 1e-4.
F32_GRAD_REL = 1e-4
# Exact equality (bitwise): sharded vs unsharded where no reduction order changes, round trips, resume.
EXACT = dict(atol=0.0, rtol=0.0)
# f32 across device counts: collectives reorder sums (psum / all-gather matmuls), measured ~1e-6 on 8 CPU devices.
F32_SHARDED = dict(atol=1e-5, rtol=1e-5)
# f32 ring / context-parallel vs dense float64 reference (out, lse, dq, dk, dv).
F32_RING = dict(atol=1e-5, rtol=1e-5)
# Complex64 FFT-type transforms (monarch_fft vs jnp.fft / torch.fft), relative to the output scale.
C64_FFT = dict(atol=1e-5, rtol=1e-5)
# bf16 inputs with f32 accumulation against an f32 oracle: bf16 has 8 mantissa bits (eps = 2^-8 = 3.9e-3).
BF16 = dict(atol=2e-2, rtol=2e-2)


def max_rel_err(x, ref, tiny=1e-12):
    """max |x - ref| / max(max |ref|, tiny): the norm used for F32_GRAD_REL."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), tiny))
# float64 computations against float64 references (exact algebra up to rounding; e.g. causal Monarch, M2-BERT in f64).
F64 = dict(atol=1e-10, rtol=1e-10)
# A real checkpoint (SmolLM2-135M GGUF, Q4_1 dequantized to f32): lcjax vs transformers' own GGUF load on ~512 tokens,
# 30 layers, logits reaching ~40 (issue 12: max abs <= 5e-4); perplexities equal to this many significant digits.
SMOLLM2_LOGITS = dict(atol=5e-4, rtol=0.0)
SMOLLM2_PPL_DIGITS = 4
# f32 values computed by the same formula as the reference in the same order (RoPE inverse frequencies vs
# transformers' ROPE_INIT_FUNCTIONS): a few ulps of relative error at most.
F32_ULP = dict(atol=0.0, rtol=1e-6)
