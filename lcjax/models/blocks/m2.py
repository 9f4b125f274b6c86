"""The ``"m2"`` block of the decoder LM: causal Monarch Mixer sequence mixing + SwiGLU MLP, both pre-norm residual.

"Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", Fu et al. 2023, https://arxiv.org/abs/2310.12109.
The sequence mixer is ``lcjax.layers.monarch_mixer.CausalM2Mixer`` (gated short conv + implicit long filter as a
causal FFT convolution, or the paper's causal Monarch parameterisation); the dimension mixer is the same SwiGLU MLP as
the attention block, so M2, attention and Mamba-2 LMs compare at equal width (``experiments/m2/``).

Decoding: the causal mixer has no recurrent state, so the cache keeps the normalised inputs of every token seen so far
(``[B, S, D]``, S = cache length) and each cached call re-runs the mixer over the whole buffer (empty slots carry the
segment id ``EMPTY_SEGMENT``) and reads the new positions. That is exact (outputs depend only on earlier inputs) and
costs O(S log S) per call; it exists so ``generate()`` works for M2 and hybrid LMs, not to be fast.
Dimension key (lcjax/typing.py): B batch, L length, S cache length, D model.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers.monarch_mixer import CausalM2Mixer, M2SequenceMixerConfig
from lcjax.models.blocks.common import BlockDims, check_mixer_width, check_mlp, make_mlp, make_norm
from lcjax.typing import Array, Float, Int

EMPTY_SEGMENT = 0  # cache slots not yet written are padding (lcjax.ops.segments.PADDING): never a document
_NAMES = ("act_batch", "act_kv_seq", "act_embed")


class M2Cache(NamedTuple):
    """Normalised mixer inputs ``h_BSD`` and their segment ids (``EMPTY_SEGMENT`` = empty slot); ``index`` = slots
    filled."""

    h_BSD: jax.Array
    segment_ids_BS: jax.Array
    index: jax.Array


class M2Block(nnx.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; ``mixer`` (a causal ``M2SequenceMixerConfig``) configures
    the sequence mixer."""

    mixer_config: ClassVar[type] = M2SequenceMixerConfig

    @staticmethod
    def check(dims: BlockDims, mixer: M2SequenceMixerConfig, *, max_seq_len: int, name: str) -> None:
        check_mixer_width(name, mixer, dims)
        checks.require(not mixer.bidirectional, f"{name}.bidirectional must be False (causal) in a decoder LM")
        checks.require(mixer.l_max >= max_seq_len, f"{name}.l_max={mixer.l_max} must be >= max_seq_len={max_seq_len}")
        check_mlp("m2", dims)

    def __init__(self, dims: BlockDims, mixer: M2SequenceMixerConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = make_norm(dims)
        self.mixer = CausalM2Mixer(mixer, rngs=rngs)
        self.post_mixer_layernorm = make_norm(dims)
        self.mlp = make_mlp(dims, rngs=rngs)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, positions_BL: Int[Array, "B L"] | None = None,
        segment_ids_BL: Int[Array, "B L"] | None = None, cache: M2Cache | None = None,
    ) -> tuple[Float[Array, "B L D"], M2Cache | None]:  # fmt: skip
        """``segment_ids_BL=None``: every row is one document."""
        B, L, _ = x_BLD.shape
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        h_BLD = self.input_layernorm(x_BLD)
        if cache is None:
            y_BLD = self.mixer(h_BLD, segment_ids_BL=segment_ids_BL, positions_BL=positions_BL)
        else:
            S = cache.h_BSD.shape[1]
            checks.require(L <= S, f"M2Block: {L} new tokens do not fit a cache of length {S}")

            def put(buf, new):
                new = sharding.shard(new.astype(buf.dtype), *_NAMES[: buf.ndim])
                return jax.lax.dynamic_update_slice_in_dim(buf, new, cache.index, axis=1)

            cache = M2Cache(put(cache.h_BSD, h_BLD), put(cache.segment_ids_BS, segment_ids_BL), cache.index + L)
            y_BSD = self.mixer(cache.h_BSD.astype(h_BLD.dtype), segment_ids_BL=cache.segment_ids_BS)
            y_BLD = jax.lax.dynamic_slice_in_dim(y_BSD, cache.index - L, L, axis=1)
        x_BLD = x_BLD + y_BLD.astype(x_BLD.dtype)
        x_BLD = x_BLD + self.mlp(self.post_mixer_layernorm(x_BLD))
        return sharding.shard(x_BLD, "act_batch", "act_seq", "act_embed"), cache

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> M2Cache:
        checks.require(length <= self.mixer.cfg.l_max,
                       f"M2Block.init_cache: length {length} exceeds the mixer's l_max={self.mixer.cfg.l_max}")
        h_BSD = sharding.shard(jnp.zeros((batch, length, self.mixer.cfg.d_model), dtype), *_NAMES)
        segment_ids_BS = sharding.shard(jnp.full((batch, length), EMPTY_SEGMENT, jnp.int32), *_NAMES[:2])
        return M2Cache(h_BSD=h_BSD, segment_ids_BS=segment_ids_BS, index=jnp.zeros((), jnp.int32))


__all__ = ["EMPTY_SEGMENT", "M2Block", "M2Cache"]
