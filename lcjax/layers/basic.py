"""Small building blocks shared by every model: RMSNorm, token embedding, SwiGLU MLP.

RMSNorm: Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467 (HF ``LlamaRMSNorm``: normalise in float32, cast
back, then scale). SwiGLU: Shazeer 2020, https://arxiv.org/abs/2002.05202 (HF ``LlamaMLP``).
Dimension key (lcjax/typing.py): B batch, L length, D model, F MLP width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import checks, sharding
from lcjax.typing import Array, Float, Int


def normal_init(key: jax.Array, shapes: dict[str, tuple[int, ...]], *, std: float, dtype=jnp.float32) -> dict:
    """Independent N(0, std²) arrays of the given shapes from ONE flat draw.

    XLA:CPU compiles each distinct random-normal shape separately (0.6–4 s each on the dev box, worse for rank ≥ 3),
    so a module draws all its weights at once and slices.
    """
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    flat = jax.random.normal(key, (sum(sizes),), dtype) * jnp.asarray(std, dtype)
    out, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """``weight * (x / rms(x))`` over the last axis, normalised in float32 (HF ``LlamaRMSNorm``)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        checks.require_int("RMSNorm: dim", dim, min=1)
        self.eps = checks.require_float("RMSNorm: eps", eps, min=0.0, min_open=True)
        self.weight = sharding.param(jnp.ones((dim,), param_dtype), "embed")

    def __call__(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        return rms_norm(x, sharding.read(self.weight), self.eps)


class Embedding(nnx.Module):
    """Token embedding ``[V, D]``; ``attend`` reuses it as the output projection (tied embeddings)."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        checks.require_int("Embedding: vocab_size", vocab_size, min=1)
        checks.require_int("Embedding: dim", dim, min=1)
        w_VD = normal_init(rngs.params(), {"w": (vocab_size, dim)}, std=0.02, dtype=param_dtype)["w"]  # HF Llama init
        self.vocab_size = vocab_size
        self.weight = sharding.param(w_VD, "vocab", "embed")

    def __call__(self, tokens_BL: Int[Array, "B L"], dtype=jnp.float32) -> Float[Array, "B L D"]:
        return sharding.take(sharding.read(self.weight), tokens_BL, out=("act_batch", "act_seq", "act_embed")).astype(dtype)

    def attend(self, x_BLD: Float[Array, "B L D"], *, seq: str | None = "act_seq") -> Float[Array, "B L V"]:
        """Logits against the embedding table; ``seq``: the logical name of the length axis."""
        w_VD = sharding.read(self.weight, x_BLD.dtype)
        return sharding.einsum("BLD,VD->BLV", x_BLD, w_VD, out=("act_batch", seq, "act_vocab"))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
        checks.require_int("MLP: dim", dim, min=1)
        checks.require_int("MLP: hidden", hidden, min=1)
        checks.require_bool("MLP: bias", bias)
        w = normal_init(rngs.params(), {"gate": (dim, hidden), "up": (dim, hidden), "down": (hidden, dim)}, std=0.02,
                        dtype=param_dtype)  # fmt: skip
        self.gate_proj = sharding.param(w["gate"], "embed", "mlp")
        self.up_proj = sharding.param(w["up"], "embed", "mlp")
        self.down_proj = sharding.param(w["down"], "mlp", "embed")
        self.bias = bias
        if bias:
            self.gate_bias = sharding.param(jnp.zeros((hidden,), param_dtype), "mlp")
            self.up_bias = sharding.param(jnp.zeros((hidden,), param_dtype), "mlp")
            self.down_bias = sharding.param(jnp.zeros((dim,), param_dtype), "embed")

    def __call__(self, x_BLD: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        dt = x_BLD.dtype
        act = ("act_batch", "act_seq", "act_mlp")
        gate_BLF = sharding.einsum("BLD,DF->BLF", x_BLD, sharding.read(self.gate_proj, dt), out=act)
        up_BLF = sharding.einsum("BLD,DF->BLF", x_BLD, sharding.read(self.up_proj, dt), out=act)
        if self.bias:
            gate_BLF = gate_BLF + sharding.read(self.gate_bias, dt)[None, None]
            up_BLF = up_BLF + sharding.read(self.up_bias, dt)[None, None]
        h_BLF = jax.nn.silu(gate_BLF) * up_BLF
        y_BLD = sharding.einsum("BLF,FD->BLD", h_BLF, sharding.read(self.down_proj, dt), out=("act_batch", "act_seq", "act_embed"))
        return y_BLD + sharding.read(self.down_bias, dt)[None, None] if self.bias else y_BLD

