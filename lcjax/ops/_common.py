"""Shared argument checks and mesh-axis handling of the ops (private).

Both kinds of sequence-parallel op use them: context-parallel attention (``ring_attention.py``,
``context_parallel.py``) and the Mamba-2 SSD and conv (``ssd.py``, ``conv.py``, ``ssd_context_parallel.py``). This
module imports no op module, so the imports of ``lcjax/ops`` run one way: every op module may use this one, and a
module above another (``ssd_context_parallel`` above ``ssd`` and ``conv``) imports only public names of it.

* Array checks (``require_float_array`` ...) in the idiom of ``lcjax.checks``: ValueError naming the argument (the
  ops run them through ``lcjax.checks.validated_by``, before the suite's runtime jaxtyping check).
* Axis names: ``check_axis_name`` (what ``jax.shard_map`` code accepts), ``context_axis_name`` (the mesh axes of
  the logical ``act_seq`` under the active rules, read through ``lcjax.sharding``, the one module that names mesh
  axes), and the ring collectives used by both (``axis_size``, ``axis_index``, ``send_to_next``, ``gather_shards``),
  each of which is the one-device identity for ``axis_name=None``.
* ``run_index``: the runs of segment ids, which are Mamba-2's documents (a change of id starts one).
* ``check_context_attention``: the arguments shared by ring, all-gather and dispatched context-parallel attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcjax import sharding
from lcjax.checks import require, require_optional_int
from lcjax.ops import masks, segments
from lcjax.typing import Array, Int

AxisName = str | tuple[str, ...] | None


# ---- arrays -----------------------------------------------------------------------------------------------------
def _shape(a) -> tuple:
    return tuple(getattr(a, "shape", ()))


def require_float_array(name: str, a, *, rank: int | None = None, min_rank: int | None = None) -> None:
    """``a`` is an array with a floating dtype (of rank ``rank``, or at least ``min_rank``)."""
    require(hasattr(a, "shape") and hasattr(a, "dtype"), f"{name}: expected an array, got {type(a).__name__}")
    require(rank is None or a.ndim == rank, f"{name}: expected rank {rank}, got shape {_shape(a)}")
    require(min_rank is None or a.ndim >= min_rank, f"{name}: expected rank >= {min_rank}, got shape {_shape(a)}")
    require(jnp.issubdtype(a.dtype, jnp.floating), f"{name}: expected a floating dtype, got {a.dtype}")


def require_shape(name: str, a, shape: tuple, what: str) -> None:
    """``a.shape == shape``; ``what`` spells the expected shape by its letters, e.g. ``"(B, L, H)"``."""
    require(_shape(a) == tuple(shape), f"{name}: expected shape {what} = {tuple(shape)}, got {_shape(a)}")


def require_optional_vector(name: str, a, n: int) -> None:
    """``a`` is None or a float array of shape ``(n,)`` (a per-head vector)."""
    if a is not None:
        require_float_array(name, a, rank=1)
        require_shape(name, a, (n,), "(H,)")


def require_ids(name: str, a, shape: tuple) -> None:
    """``a`` is None or an integer array of shape ``shape`` (document or segment ids ``(B, L)``)."""
    if a is not None:
        dtype = getattr(a, "dtype", type(a).__name__)
        require(hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.integer),
                f"{name}: expected an integer array of shape (B, L) = {tuple(shape)}, got {dtype}")  # fmt: skip
        require_shape(name, a, shape, "(B, L)")


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def run_index(ids_BL: Int[Array, "B L"]) -> Int[Array, "B L"]:
    """0, 1, 2, ...: the number of each token's run of equal ids in its row (``lcjax.ops.segments.run_starts``).

    This is how Mamba-2 reads segment ids: a document starts wherever the id changes, and a padding run (id 0) is
    a run of its own, so no state crosses it.
    """
    return jnp.cumsum(segments.run_starts(ids_BL), axis=1, dtype=jnp.int32) - 1


# ---- axis names -------------------------------------------------------------------------------------------------
def check_axis_name(owner: str, axis_name) -> None:
    """``axis_name`` is None, a mesh axis name or a non-empty tuple of names (ValueError naming ``owner``)."""
    ok = axis_name is None or isinstance(axis_name, str) or (
        isinstance(axis_name, tuple) and len(axis_name) > 0 and all(isinstance(a, str) for a in axis_name))  # fmt: skip
    require(ok, f"{owner}: axis_name={axis_name!r} is not allowed; allowed: a mesh axis name, a non-empty tuple of "
                "names, or None")  # fmt: skip


def context_axis_name() -> AxisName:
    """The mesh axes that shard the logical ``act_seq`` under the active mesh and rules, as a ``shard_map`` axis
    name: None (no mesh, or the sequence is not sharded), one name, or a tuple of names."""
    axes = sharding.mesh_axes("act_seq")
    return None if not axes else axes[0] if len(axes) == 1 else axes


def axis_size(axis_name: AxisName) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def axis_index(axis_name: AxisName):
    return jnp.zeros((), jnp.int32) if axis_name is None else lax.axis_index(axis_name)


def send_to_next(tree, axis_name: AxisName):
    """Every device sends its arrays to the next device on the ring (device r receives from r - 1, 0 from n - 1)."""
    if axis_name is None:
        return tree
    n = axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def gather_shards(x, axis_name: AxisName):
    """``[n, ...]``: x of every shard in device order (``[1, ...]`` on one device)."""
    return x[None] if axis_name is None else lax.all_gather(x, axis_name)


# ---- context-parallel attention ---------------------------------------------------------------------------------
def check_context_attention(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                            window=None, scale=None, block_q=None, block_kv=None, **_other):  # fmt: skip
    """The shared checks of ``ring_attention``, ``allgather_attention`` and ``context_parallel_attention``.

    Returns ``(q_segment_ids, kv_segment_ids, scale)`` as the kernels use them: int32 ids (None when neither is
    given) and the default scale filled. Keywords that only one entry point takes (``axis_name``, ``strategy``,
    ``causal``, ``return_lse``) are checked there.
    """
    for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        require(x is not None, f"{name} is required (int32 [B, local length]): context-parallel masks come from "
                               "positions, never from the device index")  # fmt: skip
    require((q_segment_ids is None) == (kv_segment_ids is None),
            "give both q_segment_ids and kv_segment_ids, or neither")  # fmt: skip
    _, _, qs, ks, scale = masks.check_attention_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)  # fmt: skip
    require_optional_int("block_q", block_q, min=1)
    require_optional_int("block_kv", block_kv, min=1)
    return (None, None, scale) if q_segment_ids is None else (qs, ks, scale)
