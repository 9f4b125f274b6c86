"""The residual blocks of the decoder LM and their registry (``LMConfig.block_pattern`` names keys of ``BLOCKS``).

Each block is built from ``BlockDims`` (model-wide sizes) and its own mixer config, never from ``LMConfig``
(``lcjax/models/blocks/common.py`` states the interface). Adding a block type is one file in this package and one
line below; ``LMConfig`` then accepts ``block_pattern=(..., "name")`` with ``mixers={"name": <its config>}`` and
validates it through the block's ``check``.
"""

from lcjax.models.blocks.attention import AttentionBlock
from lcjax.models.blocks.common import BlockDims
from lcjax.models.blocks.m2 import M2Block, M2Cache
from lcjax.models.blocks.mamba2 import Mamba2Block
from lcjax.models.blocks.mamba2_mlp import Mamba2MLPBlock

BLOCKS: dict[str, type] = {
    "attention": AttentionBlock,  # mixer config: LMConfig's flat attention fields (LMConfig.attention)
    "mamba2": Mamba2Block,
    "m2": M2Block,
    "mamba2_mlp": Mamba2MLPBlock,  # Mamba-2 + SwiGLU MLP (HF Bamba)
}

__all__ = ["BLOCKS", "AttentionBlock", "BlockDims", "M2Block", "M2Cache", "Mamba2Block"]
