"""Array type aliases and the one dimension-letter key used across lcjax.

Tensor names carry their shape as a suffix (``x_BLD``, ``h_BHPN``) and einsum strings use the same letters, so a
reader can check every contraction by eye (Shazeer, "Shape Suffixes — Good Coding Style"; nanodo ``model.py``).
Public functions annotate their arrays with jaxtyping; the test suite turns on runtime checking with beartype.

Dimension key:
  B  batch                     L  length (queries / tokens)      S  key / value length (cache or KV shard)
  D  model width               E  inner width (mixer expansion)   F  MLP hidden width
  V  vocabulary                H  query heads                     K  key/value heads
  R  query heads per KV head   P  head dim                        N  state size (SSM)
  G  groups (SSM B/C groups)   C  chunks                          Q  chunk length
  W  conv width                T  stacked layers (scan axis)
"""

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "PRNGKeyArray", "PyTree", "Shaped", "DIMENSION_KEY"]

DIMENSION_KEY = {
    "B": "batch",
    "L": "length",
    "S": "key/value length",
    "D": "model width",
    "E": "inner width",
    "F": "MLP hidden width",
    "V": "vocabulary",
    "H": "query heads",
    "K": "key/value heads",
    "R": "query heads per key/value head",
    "P": "head dim",
    "N": "state size",
    "G": "groups",
    "C": "chunks",
    "Q": "chunk length",
    "W": "conv width",
    "T": "stacked layers",
}
