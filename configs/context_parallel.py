"""Context parallelism: the MQAR attention LM with its sequence split over ``context`` (ring or all-gather attention).

Run on 8 CPU devices (context=4 x data=2)::

    JAX_NUM_CPU_DEVICES=8 python -m lcjax.train --config configs/context_parallel.py --workdir runs/cp
    JAX_NUM_CPU_DEVICES=8 python -m lcjax.train --config configs/context_parallel.py:smoke --workdir /tmp/cp_smoke
    JAX_NUM_CPU_DEVICES=8 lcjax train --config configs/context_parallel.py:impl=allgather,seq=256 --workdir runs/cp_ag

Variant keys: ``impl`` (``ring``: K/V blocks travel the ring, memory O(L/n) per device; ``allgather``: K/V gathered
once, fewer collectives, O(L) K/V per device; see ``lcjax/ops/context_parallel.py``), ``context`` and ``data``
(mesh axis sizes; their product must be the device count), ``seq`` (MQAR sequence length; a multiple of
``context``), ``smoke`` (tiny model, a few steps), and every other ``configs/mqar.py`` key is passed on
(``pairs``, ``d``, ``layers``, ``heads``, ``batch``, ``steps``, ``lr``).

``layout`` (``config.context_layout``: ``zigzag``, the default, balances causal work exactly; ``striped``;
``contiguous`` keeps device r on tokens [r·L/n, (r+1)·L/n)): the loop permutes every batch on the host
(``lcjax.ops.context_parallel.apply_layout``) before it goes to the devices. Ring and all-gather attention mask by
positions and segment ids only, so every layout gives the same loss.
"""

import dataclasses
import os

from lcjax.train.config import MeshConfig
from lcjax.train.config_io import load_config_file, parse_arg

MQAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py")


def get_config(arg=None):
    a = parse_arg(arg, lazy=True, impl="ring", layout="zigzag", context=4, data=2, smoke=False)
    if a.impl not in ("ring", "allgather"):
        raise ValueError(f"configs/context_parallel.py: impl={a.impl!r}; allowed: 'ring', 'allgather'")
    passed = {k: v for k, v in a.items() if k not in ("impl", "layout", "context", "data", "smoke")}
    variant = ",".join(["model=attention", *(["smoke"] if a.smoke else []), *(f"{k}={v}" for k, v in passed.items())])
    c = load_config_file(MQAR, variant)
    return dataclasses.replace(
        c, model=dataclasses.replace(c.model, context_impl=a.impl), mesh=MeshConfig(data=a.data, context=a.context),
        sharding="context_parallel", context_layout=a.layout,
    )  # fmt: skip
