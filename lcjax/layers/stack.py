"""Stacking identical layers along a leading ``layers`` axis, and scanning over the stack.

``nnx.vmap(transform_metadata=...)`` leaves rank-r sharding names on rank-(r+1) arrays in NNX tree mode (STYLE
§2.1, google/flax#5112), so a restore driven by that metadata shards the wrong dimension. ``stack`` builds the
copies with a plain ``jax.vmap`` over parameter keys and prepends ``"layers"`` to every Variable's
``out_sharding`` itself (as MaxText ``nnx_scan.py`` does), so metadata rank == array rank always.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

from lcjax import checks

M = TypeVar("M", bound=nnx.Module)


def stack(make: Callable[[nnx.Rngs], M], n: int, *, rngs: nnx.Rngs) -> M:
    """``n`` independently initialised copies of ``make(rngs)``, every Variable stacked on a leading axis."""
    checks.require_int("stack: n", n, min=1)
    keys = jax.random.split(rngs.params(), n)
    stacked = jax.vmap(lambda key: make(nnx.Rngs(params=key)))(keys)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable):
            names = var.get_metadata().get("out_sharding")
            if names is not None:
                var.set_metadata(out_sharding=("layers", *names))
    return stacked


def scan(
    stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any, xs: Any = None,
    *, remat: bool = False,
) -> tuple[Any, Any]:  # fmt: skip
    """``lax.scan`` over the leading axis of a stacked module: ``body(layer, carry, x) -> (carry, y)``.

    The module is split into its graph definition and state, and each step merges one slice back, so nothing
    depends on NNX graph semantics inside the transform.
    """
    graphdef, state = nnx.split(stacked)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat:
        step = jax.checkpoint(step)
    return jax.lax.scan(step, carry, (state, xs))
