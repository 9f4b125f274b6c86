"""The ``"attention"`` block of the decoder LM: pre-norm GQA self-attention + SwiGLU MLP (HF ``LlamaDecoderLayer``).

Checked against HF transformers 5.23.0 ``models/llama/modeling_llama.py`` (``LlamaDecoderLayer``): ``x + attn(norm(x))``
then ``x + mlp(norm(x))``. Names follow HF (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``)
so ``lcjax/convert/llama.py`` maps ``model.layers.{i}.*`` one to one. ``residual`` takes the attention as a function,
so models that attend differently (``lcjax/models/beacon.py``: beacon K/V and memory) reuse the residual structure.
Dimension key (lcjax/typing.py): B batch, L length, D model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from lcjax import sharding
from lcjax.layers.attention import Attention, AttentionConfig, KVCache, RingKVCache
from lcjax.models.blocks.common import BlockDims, check_mixer_width, check_mlp, make_mlp, make_norm
from lcjax.typing import Array, Float, Int


class AttentionBlock(nnx.Module):
    """Pre-norm transformer block; ``mixer`` (an ``AttentionConfig``) configures ``self_attn``."""

    mixer_config: ClassVar[type] = AttentionConfig

    @staticmethod
    def check(dims: BlockDims, mixer: AttentionConfig, *, max_seq_len: int, name: str) -> None:
        del max_seq_len
        check_mixer_width(name, mixer, dims)
        check_mlp("attention", dims)

    def __init__(self, dims: BlockDims, mixer: AttentionConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = make_norm(dims)
        self.self_attn = Attention(mixer, param_dtype=jnp.dtype(dims.param_dtype), rngs=rngs)
        self.post_attention_layernorm = make_norm(dims)
        self.mlp = make_mlp(dims, rngs=rngs)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, positions_BL: Int[Array, "B L"], segment_ids_BL: Int[Array, "B L"],
        cache: KVCache | RingKVCache | None = None,
    ) -> tuple[Float[Array, "B L D"], KVCache | RingKVCache | None]:  # fmt: skip
        attend = lambda h_BLD: self.self_attn(h_BLD, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                                              cache=cache)  # fmt: skip
        x_BLD, cache = self.residual(x_BLD, attend)
        return sharding.shard(x_BLD, "act_batch", "act_seq", "act_embed"), cache

    def residual(
        self, x_BLD: Float[Array, "B L D"], attend: Callable[[Float[Array, "B L D"]], tuple[Array, Any]]
    ) -> tuple[Float[Array, "B L D"], Any]:
        """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; ``attend(h) -> (y, aux)``, ``aux`` is passed through."""
        y_BLD, aux = attend(self.input_layernorm(x_BLD))
        x_BLD = x_BLD + y_BLD
        return x_BLD + self.mlp(self.post_attention_layernorm(x_BLD)), aux

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> KVCache | RingKVCache:
        return self.self_attn.init_cache(batch, length, dtype)


__all__ = ["AttentionBlock"]
