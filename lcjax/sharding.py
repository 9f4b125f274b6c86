"""The one sharding vocabulary of lcjax: mesh axes, logical axis names, rule presets, and the helpers that apply them.

Three layers, as in MaxText's sharding guide: physical mesh axes (``data, fsdp, context, tensor``); logical axis
names carried by every parameter and activation; and ``ShardingRules``, the one table that maps logical names to
mesh axes. Nothing else in lcjax names a mesh axis. ``to_pspec`` refuses two logical axes of one array on the same
mesh axis (jax-llm-examples ``logical_to_physical``).

Usage::

    mesh = sharding.make_mesh(fsdp=-1, tensor=2)
    with sharding.use(mesh, ShardingRules.fsdp_tp()):
        model = jax.jit(lambda: LM(cfg, rngs=nnx.Rngs(0)))()      # parameters are born sharded

With no mesh set, ``param`` and ``shard`` do nothing special, so a single layer builds and runs anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lcjax import checks

MESH_AXES = ("data", "fsdp", "context", "tensor")
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "ssm_state", "conv", "layers")
ACT_AXES = (
    "act_batch",
    "act_seq",  # query / token positions; sharded by context parallelism
    "act_kv_seq",  # key/value positions seen by one device's queries (gathered for plain attention)
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_head_dim",
    "act_mlp",
    "act_vocab",
    "act_state",
)
LOGICAL_AXES = PARAM_AXES + ACT_AXES

MeshAxes = tuple[str, ...]
Logical = str | None


def _normalize(name: str, value: Any) -> MeshAxes:
    axes = (value,) if isinstance(value, str) else tuple(value or ())
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(f"ShardingRules.{name}: unknown mesh axis {axis!r}; allowed: {MESH_AXES}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"ShardingRules.{name}: mesh axis repeated in {axes}")
    return tuple(sorted(axes, key=MESH_AXES.index))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingRules:
    """Maps each logical axis name to a tuple of mesh axes (empty = replicated).

    Presets compose with ``|`` (per logical axis, the union of mesh axes): ``ShardingRules.fsdp() |
    ShardingRules.context_parallel()``. Mesh axes of size 1 are harmless, so one rule set serves any mesh shape.
    """

    vocab: MeshAxes | str = ()
    embed: MeshAxes | str = ()
    mlp: MeshAxes | str = ()
    heads: MeshAxes | str = ()
    kv_heads: MeshAxes | str = ()
    head_dim: MeshAxes | str = ()
    ssm_state: MeshAxes | str = ()
    conv: MeshAxes | str = ()
    layers: MeshAxes | str = ()
    act_batch: MeshAxes | str = ()
    act_seq: MeshAxes | str = ()
    act_kv_seq: MeshAxes | str = ()
    act_embed: MeshAxes | str = ()
    act_heads: MeshAxes | str = ()
    act_kv_heads: MeshAxes | str = ()
    act_head_dim: MeshAxes | str = ()
    act_mlp: MeshAxes | str = ()
    act_vocab: MeshAxes | str = ()
    act_state: MeshAxes | str = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _normalize(f.name, getattr(self, f.name)))

    # ---- presets --------------------------------------------------------------------------------------------
    @classmethod
    def single(cls) -> ShardingRules:
        """Everything replicated."""
        return cls()

    @classmethod
    def dp(cls) -> ShardingRules:
        """Data parallel: batch over ``data``, parameters replicated."""
        return cls(act_batch="data")

    @classmethod
    def fsdp(cls) -> ShardingRules:
        """Fully sharded data parallel: batch over ``data`` and ``fsdp``, parameters' ``embed`` axis over ``fsdp``."""
        return cls(act_batch=("data", "fsdp"), embed="fsdp")

    @classmethod
    def tp(cls) -> ShardingRules:
        """Tensor (Megatron) parallel: heads, MLP width and vocabulary over ``tensor``."""
        return cls(
            vocab="tensor", mlp="tensor", heads="tensor", kv_heads="tensor",
            act_heads="tensor", act_kv_heads="tensor", act_mlp="tensor", act_vocab="tensor",
        )  # fmt: skip

    @classmethod
    def fsdp_tp(cls) -> ShardingRules:
        return cls.fsdp() | cls.tp()

    @classmethod
    def context_parallel(cls) -> ShardingRules:
        """Sequence over ``context`` (ring / all-gather attention, sequence-parallel SSM); batch over ``data``."""
        return cls(act_batch="data", act_seq="context")

    @classmethod
    def from_name(cls, name: str) -> ShardingRules:
        """``"fsdp+context_parallel"`` -> the union of the named presets."""
        presets = {"single": cls.single, "dp": cls.dp, "fsdp": cls.fsdp, "tp": cls.tp, "fsdp_tp": cls.fsdp_tp,
                   "context_parallel": cls.context_parallel}  # fmt: skip
        rules = cls()
        for part in name.split("+"):
            if part not in presets:
                raise ValueError(f"sharding rules: unknown preset {part!r}; allowed: {sorted(presets)}")
            rules = rules | presets[part]()
        return rules

    def __or__(self, other: ShardingRules) -> ShardingRules:
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        return ShardingRules(**{k: tuple(dict.fromkeys(v)) for k, v in merged.items()})

    # ---- resolution -----------------------------------------------------------------------------------------
    def mesh_axes(self, logical: Logical) -> MeshAxes:
        if logical is None:
            return ()
        if logical not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {logical!r}; allowed: {LOGICAL_AXES} or None")
        return getattr(self, logical)

    def to_pspec(self, *logical: Logical) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry these logical names."""
        used: dict[str, str] = {}
        spec = []
        for name in logical:
            axes = self.mesh_axes(name)
            for axis in axes:
                if axis in used:
                    raise ValueError(
                        f"logical axes {used[axis]!r} and {name!r} of one array both map to mesh axis {axis!r}"
                    )
                used[axis] = name
            spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*spec)

    def as_flax_rules(self) -> tuple[tuple[str, Any], ...]:
        """Rules for ``nnx.logical_axis_rules`` (every logical name listed; None = replicated)."""
        out = []
        for name in LOGICAL_AXES:
            axes = getattr(self, name)
            out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
        return tuple(out)


# ---- mesh -----------------------------------------------------------------------------------------------------
def make_mesh(
    *, data: int = 1, fsdp: int = 1, context: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None,
    axis_type: AxisType = AxisType.Explicit,
) -> jax.sharding.Mesh:  # fmt: skip
    """A mesh with the four lcjax axes. One size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    for name, size in sizes.items():
        checks.require_int(f"make_mesh: {name}", size, min=-1)
        checks.require(size != 0, f"make_mesh: {name}=0 must be a positive int or -1")
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {rest}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if rest:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by the other axes' product {known}")
        sizes[rest[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"make_mesh: axis sizes {sizes} multiply to {total}, but there are {len(devices)} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES), devices=devices)


# ---- active rules ---------------------------------------------------------------------------------------------
_RULES: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar("lcjax_sharding_rules", default=None)


def current_rules() -> ShardingRules:
    return _RULES.get() or ShardingRules.single()


@contextlib.contextmanager
def use_rules(rules: ShardingRules) -> Iterator[ShardingRules]:
    token = _RULES.set(rules)
    try:
        with nnx.logical_axis_rules(rules.as_flax_rules()):
            yield rules
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh, rules: ShardingRules) -> Iterator[jax.sharding.Mesh]:
    """Set the mesh (``jax.set_mesh``) and the logical rules together."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield mesh


def jit(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` whose cache is keyed by the active ``ShardingRules`` as well (use it for functions that read them).

    ``shard``, ``param`` and the context-parallel dispatch read the rules set by ``use``/``use_rules`` while a
    function is traced. The rules live in a context variable that ``jax.jit``'s cache cannot see (the mesh it does
    see), so a plain ``jax.jit`` reused under other rules silently replays the trace made under the first ones.
    ``sharding.jit`` passes the rules active at call time as a hidden static argument and re-enters them inside the
    trace. It takes ``jax.jit``'s keyword arguments (``static_argnames``, ``donate_argnames``, ...) and works as a
    decorator with or without them. Users who jit their own functions over lcjax modules under changing rules should
    use it, or pass the rules as a static argument themselves.
    """
    if fun is None:
        return lambda f: jit(f, **jit_kwargs)
    sig = inspect.signature(fun)
    params = list(sig.parameters.values())
    hidden = inspect.Parameter("_lcjax_rules", inspect.Parameter.KEYWORD_ONLY)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, hidden)

    def traced(*args, _lcjax_rules: ShardingRules, **kwargs):
        with use_rules(_lcjax_rules):
            return fun(*args, **kwargs)

    traced.__signature__ = sig.replace(parameters=params)
    traced.__name__ = getattr(fun, "__name__", "jitted")
    static = jit_kwargs.pop("static_argnames", ())
    static = (static,) if isinstance(static, str) else tuple(static)
    jitted = jax.jit(traced, static_argnames=(*static, "_lcjax_rules"), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted(*args, _lcjax_rules=current_rules(), **kwargs)

    call.lower = lambda *args, **kwargs: jitted.lower(*args, _lcjax_rules=current_rules(), **kwargs)
    call.eval_shape = lambda *args, **kwargs: jitted.eval_shape(*args, _lcjax_rules=current_rules(), **kwargs)
    return call


def _abstract_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def mesh_active() -> bool:
    return _abstract_mesh() is not None


def mesh_axes(logical: Logical) -> MeshAxes:
    """Mesh axes (of size > 1 in the active mesh) that a logical axis maps to; () without a mesh."""
    mesh = _abstract_mesh()
    if mesh is None:
        return ()
    return tuple(a for a in current_rules().mesh_axes(logical) if mesh.shape[a] > 1)


def axis_size(logical: Logical) -> int:
    """Number of shards of a logical axis under the active mesh (1 without a mesh)."""
    mesh = _abstract_mesh()
    return int(np.prod([mesh.shape[a] for a in mesh_axes(logical)])) if mesh is not None else 1


def pspec(*logical: Logical) -> PartitionSpec:
    """PartitionSpec of ``logical`` under the active rules, restricted to the mesh's non-manual axes."""
    spec = current_rules().to_pspec(*logical)
    mesh = _abstract_mesh()
    if mesh is None:
        return spec
    manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
    if not manual:
        return spec

    def keep(entry):
        if entry is None:
            return None
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in manual)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return PartitionSpec(*(keep(e) for e in spec))


def named_sharding(*logical: Logical, mesh: jax.sharding.Mesh | None = None) -> NamedSharding:
    mesh = mesh if mesh is not None else jax.sharding.get_mesh()
    return NamedSharding(mesh, current_rules().to_pspec(*logical))


# ---- parameters and activations -------------------------------------------------------------------------------
def param(value: jax.Array, *logical: Logical, **metadata) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names; born sharded when a mesh is active."""
    if len(logical) != value.ndim:
        raise ValueError(f"param: {len(logical)} logical axes {logical} for an array of rank {value.ndim}")
    for name in logical:
        if name is not None and name not in PARAM_AXES:
            raise ValueError(f"param: unknown parameter axis {name!r}; allowed: {PARAM_AXES} or None")
    var = nnx.Param(value, out_sharding=tuple(logical), eager_sharding=mesh_active(), **metadata)
    # Record eager_sharding=False whatever the context: the metadata then does not depend on whether a mesh was
    # active (models built with and without one have the same pytree structure, so checkpoints and gradients line
    # up), and Variables that NNX later derives from this one (optimizer moments) inherit the array's sharding
    # instead of requiring a mesh. Under a mesh the value above is already sharded.
    var.set_metadata(eager_sharding=False)
    return var



def read(var: nnx.Variable, dtype: Any = None) -> jax.Array:
    """A parameter's value as the computation uses it: cast to ``dtype``, then all-gathered over the batch axes.

    FSDP shards parameters over the same mesh axes as the batch (``act_batch``); at use, those axes are gathered
    (and the backward pass reduce-scatters the gradient), while tensor-parallel axes stay sharded. Inside a scan
    over stacked layers the leading ``layers`` name is dropped. Without a mesh this is ``var[...]``.
    """
    x = var[...]
    if dtype is not None:
        x = x.astype(dtype)
    mesh = _abstract_mesh()
    if mesh is None:
        return x
    names = tuple(var.get_metadata().get("out_sharding") or (None,) * x.ndim)
    if len(names) == x.ndim + 1 and names[0] == "layers":
        names = names[1:]
    batch_axes = set(current_rules().act_batch)
    spec = [
        tuple(a for a in ((e,) if isinstance(e, str) else e) if a not in batch_axes) if e is not None else ()
        for e in pspec(*names)
    ]
    spec = PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in spec))
    types = {t for t in mesh.axis_types if t != AxisType.Manual}
    if types == {AxisType.Explicit}:
        return jax.sharding.reshard(x, spec)
    if not types:
        return x
    return jax.lax.with_sharding_constraint(x, spec)

def _check_divisible(x_shape, spec, logical, mesh):
    for dim, entry, name in zip(x_shape, spec, logical):
        if entry is None:
            continue
        n = int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))
        if dim % n:
            raise ValueError(f"shard: dimension {name!r} of size {dim} is not divisible by its mesh axes {entry} ({n})")


def shard(x: jax.Array, *logical: Logical) -> jax.Array:
    """Constrain an activation to the sharding of its logical axes. A no-op without a mesh."""
    if x.ndim != len(logical):
        raise ValueError(f"shard: {len(logical)} logical axes {logical} for an array of rank {x.ndim}")
    mesh = _abstract_mesh()
    if mesh is None:
        return x
    spec = pspec(*logical)
    _check_divisible(x.shape, spec, logical, mesh)
    types = {t for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
    if types == {AxisType.Explicit}:
        return jax.sharding.reshard(x, spec)
    if not types:  # fully manual (inside shard_map over every axis)
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def shard_map(
    f: Callable, *, in_specs: Any, out_specs: Any, check_vma: bool = False
) -> Callable:
    """``jax.shard_map`` over the whole active mesh with specs given as tuples of logical names.

    ``in_specs``/``out_specs`` are pytrees whose leaves are tuples of logical names (one per array dimension) or
    None for a replicated/non-array leaf. Inputs are resharded to the specs first (Explicit meshes require it).
    Without a mesh ``f`` runs as is, on the whole arrays: the single-device path.
    """
    if not mesh_active():
        return f
    is_leaf = lambda s: s is None or (isinstance(s, tuple) and all(isinstance(a, str | None) for a in s))
    to_p = lambda s: PartitionSpec() if s is None else pspec(*s)
    in_p = jax.tree.map(to_p, in_specs, is_leaf=is_leaf)
    out_p = jax.tree.map(to_p, out_specs, is_leaf=is_leaf)

    def call(*args):
        def place(s, a):
            if not isinstance(a, jax.Array | np.ndarray):
                return a
            return shard(a, *((None,) * a.ndim if s is None else s))

        args = jax.tree.map(place, in_specs, args, is_leaf=is_leaf)
        return jax.shard_map(f, in_specs=in_p, out_specs=out_p, check_vma=check_vma)(*args)

    return call


def logical_metadata(tree: Any) -> Any:
    """The ``out_sharding`` logical names of every Variable in an NNX state/module (for checks and restores)."""
    return jax.tree.map(
        lambda v: v.get_metadata().get("out_sharding"), nnx.state(tree), is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def einsum(spec: str, *operands: jax.Array, out: Sequence[Logical], **kwargs) -> jax.Array:
    """``jnp.einsum`` whose result carries the sharding of the logical axes ``out``.

    On Explicit meshes a contraction over a dimension sharded in both operands is ambiguous, so every layer einsum
    states its output sharding (STYLE §2.4). Without a mesh this is plain ``jnp.einsum``.
    """
    if not mesh_active():
        return jnp.einsum(spec, *operands, **kwargs)
    return jnp.einsum(spec, *operands, out_sharding=pspec(*out), **kwargs)


def take(table: jax.Array, indices: jax.Array, *, out: Sequence[Logical]) -> jax.Array:
    """``table[indices]`` (rows of an embedding table) with the output sharding of ``out``."""
    sharding_ = pspec(*out) if mesh_active() else None
    return table.at[indices].get(out_sharding=sharding_, mode="promise_in_bounds")
