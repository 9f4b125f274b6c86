"""The ``"mamba2_mlp"`` block of the decoder LM: ``x + mamba(norm(x))`` then ``x + mlp(norm(x))`` (HF Bamba).

Bamba (IBM, Princeton, UIUC; https://huggingface.co/ibm-fms/Bamba-9B) is a Mamba-2 / attention hybrid whose every
layer, Mamba or attention, ends in a pre-norm SwiGLU feed-forward. Checked against HF transformers 5.23.0
``models/bamba/modeling_bamba.py`` (``BambaDecoderLayer``, ``BambaMixer``, ``BambaMLP``, ``BambaRMSNorm``): the
Mamba-2 mixer is "Transformers are SSMs" (Dao & Gu 2024, https://arxiv.org/abs/2405.21060), the same math as HF's
``Mamba2Mixer`` with the block RMSNorm epsilon in the gated norm (``lcjax/layers/mamba2.py``). Both residual adds
run in the compute dtype, as HF's (``lcjax/models/blocks/mamba2.py`` adds in float32 instead, as ``Mamba2Block``
with ``residual_in_fp32``); in float32 the two agree.

Names follow HF Bamba (``input_layernorm``, ``mamba``, ``pre_ff_layernorm``, ``feed_forward``) so
``lcjax/convert/bamba.py`` maps ``model.layers.{i}.*`` one to one. The Bamba attention layers are lcjax's
``"attention"`` block (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``), which has the same
structure. Packed documents and caches as the ``"mamba2"`` block: ``segment_ids_BL`` become the mixer's ``seq_idx``
and the cache is the O(1) ``Mamba2State``; a one-token cached call takes the recurrent ``step``.
Dimension key (lcjax/typing.py): B batch, L length, D model.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from lcjax import sharding
from lcjax.layers.mamba2 import Mamba2, Mamba2Config, Mamba2State
from lcjax.models.blocks.common import BlockDims, check_mixer_width, check_mlp, make_mlp, make_norm
from lcjax.models.blocks.mamba2 import mix
from lcjax.typing import Array, Float, Int


class Mamba2MLPBlock(nnx.Module):
    """Pre-norm Mamba-2 mixer + pre-norm SwiGLU MLP, each with a residual; ``mixer`` is a ``Mamba2Config`` and the
    MLP width is ``BlockDims.mlp_dim`` (>= 1)."""

    mixer_config: ClassVar[type] = Mamba2Config

    @staticmethod
    def check(dims: BlockDims, mixer: Mamba2Config, *, max_seq_len: int, name: str) -> None:
        del max_seq_len
        check_mixer_width(name, mixer, dims)
        check_mlp("mamba2_mlp", dims)

    def __init__(self, dims: BlockDims, mixer: Mamba2Config, *, rngs: nnx.Rngs):
        self.input_layernorm = make_norm(dims)
        self.mamba = Mamba2(mixer, param_dtype=jnp.dtype(dims.param_dtype), rngs=rngs)
        self.pre_ff_layernorm = make_norm(dims)
        self.feed_forward = make_mlp(dims, rngs=rngs)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, positions_BL: Int[Array, "B L"] | None = None,
        segment_ids_BL: Int[Array, "B L"] | None = None, cache: Mamba2State | None = None,
    ) -> tuple[Float[Array, "B L D"], Mamba2State | None]:  # fmt: skip
        """``(x + mlp(norm(x)))`` after ``x <- x + mamba(norm(x))``, and the new cache; positions are unused."""
        del positions_BL
        y_BLD, cache = mix(self.mamba, self.input_layernorm(x_BLD), segment_ids_BL, cache)
        x_BLD = x_BLD + y_BLD.astype(x_BLD.dtype)
        x_BLD = x_BLD + self.feed_forward(self.pre_ff_layernorm(x_BLD)).astype(x_BLD.dtype)
        return sharding.shard(x_BLD, "act_batch", "act_seq", "act_embed"), cache

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> Mamba2State:
        """The zero recurrent state; ``length`` is accepted for the block interface and does not matter."""
        del length
        return self.mamba.init_state(batch, dtype)


__all__ = ["Mamba2MLPBlock"]
