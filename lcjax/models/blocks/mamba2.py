"""The ``"mamba2"`` block of the decoder LM: ``x + mixer(norm(x))`` (HF transformers ``Mamba2Block``).

"Transformers are SSMs", Dao & Gu 2024, https://arxiv.org/abs/2405.21060. Checked against HF transformers 5.23.0
``models/mamba2/modeling_mamba2.py`` (``Mamba2Block``, ``Mamba2RMSNorm``) and state-spaces/mamba
``mamba_ssm/models/mixer_seq_simple.py`` (``create_block``): pre-norm RMSNorm, the Mamba-2 mixer, and the residual
add in float32 (``residual_in_fp32``). The sum is cast back to the compute dtype so that every block of a hybrid
pattern (and a ``lax.scan`` carry) sees one dtype; in float32 this is HF exactly.

Names follow HF (``norm``, ``mixer``) so ``lcjax/convert/mamba2.py`` maps ``backbone.layers.{i}.norm`` and
``backbone.layers.{i}.mixer.*`` one to one. The block obeys the LM block interface: packed documents come in as
``segment_ids_BL`` and become the mixer's ``seq_idx`` (a change of id starts a new document); the cache is the
mixer's O(1) ``Mamba2State`` (no length axis). A cached call with one token takes the recurrent ``step``; longer
cached calls (prefill, multi-token continuation) run the chunked SSD from the carried state.
Dimension key (lcjax/typing.py): B batch, L length, D model.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from lcjax import sharding
from lcjax.layers.mamba2 import Mamba2, Mamba2Config, Mamba2State
from lcjax.models.blocks.common import BlockDims, check_mixer_width, make_norm
from lcjax.typing import Array, Float, Int


def mix(
    mixer: Mamba2, h_BLD: Float[Array, "B L D"], segment_ids_BL: Int[Array, "B L"] | None, cache: Mamba2State | None
) -> tuple[Float[Array, "B L D"], Mamba2State | None]:
    """The mixer under the LM block interface (shared by every block holding a Mamba-2 mixer): a cached one-token
    call takes the recurrent ``step`` (O(1) in the context); anything else runs the chunked SSD from the carried
    state, returning the new state only when a cache was given."""
    if cache is not None and h_BLD.shape[1] == 1:
        y_BD, cache = mixer.step(h_BLD[:, 0], cache)
        return y_BD[:, None], cache
    y_BLD, state = mixer(h_BLD, seq_idx_BL=segment_ids_BL, state=cache)
    return y_BLD, None if cache is None else state


class Mamba2Block(nnx.Module):
    """Pre-norm residual Mamba-2 block; ``mixer`` (a ``Mamba2Config``) configures the mixer. No MLP (``mlp_dim``
    is unused), as upstream."""

    mixer_config: ClassVar[type] = Mamba2Config

    @staticmethod
    def check(dims: BlockDims, mixer: Mamba2Config, *, max_seq_len: int, name: str) -> None:
        del max_seq_len
        check_mixer_width(name, mixer, dims)

    def __init__(self, dims: BlockDims, mixer: Mamba2Config, *, rngs: nnx.Rngs):
        self.norm = make_norm(dims)
        self.mixer = Mamba2(mixer, param_dtype=jnp.dtype(dims.param_dtype), rngs=rngs)

    def __call__(
        self, x_BLD: Float[Array, "B L D"], *, positions_BL: Int[Array, "B L"] | None = None,
        segment_ids_BL: Int[Array, "B L"] | None = None, cache: Mamba2State | None = None,
    ) -> tuple[Float[Array, "B L D"], Mamba2State | None]:  # fmt: skip
        """``(x + mixer(norm(x)), new cache)``; positions are unused (the recurrence is order-aware by itself)."""
        del positions_BL
        y_BLD, cache = mix(self.mixer, self.norm(x_BLD), segment_ids_BL, cache)
        x_BLD = (x_BLD.astype(jnp.float32) + y_BLD.astype(jnp.float32)).astype(x_BLD.dtype)
        return sharding.shard(x_BLD, "act_batch", "act_seq", "act_embed"), cache

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> Mamba2State:
        """The zero recurrent state; ``length`` is accepted for the block interface and does not matter."""
        del length
        return self.mixer.init_state(batch, dtype)


__all__ = ["Mamba2Block", "mix"]
