"""Train state: the mesh, the optimizer, and the model + optimizer created already sharded.

The model and its ``nnx.Optimizer`` are built inside one ``jax.jit`` under ``sharding.use(mesh, rules)``, so every
parameter and optimizer moment is born with its final sharding (STYLE §2.6; big_vision ``train.py`` "init" section).
The mesh stays Explicit: ``nnx.eval_shape`` of an ``nnx.Optimizer`` fails on Auto meshes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax import sharding
from lcjax.models.lm import LM, LMConfig
from lcjax.train.config import ExperimentConfig, MeshConfig, OptimConfig


def build_mesh(mesh_cfg: MeshConfig) -> jax.sharding.Mesh:
    """The four-axis Explicit mesh of ``config.mesh`` over the first ``num_devices`` devices (0 = all)."""
    devices = jax.devices()
    n = mesh_cfg.num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices are available")
    try:
        return sharding.make_mesh(
            data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, context=mesh_cfg.context, tensor=mesh_cfg.tensor,
            devices=devices[:n],
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None


def data_parallel_size(mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> int:
    """How many shards the batch dimension is split into (the mesh axes of ``act_batch``)."""
    return int(np.prod([mesh.shape[a] for a in rules.act_batch]))


@functools.lru_cache(maxsize=32)
def learning_rate_schedule(cfg: OptimConfig, num_steps: int, *, nan_at_step: int = 0) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``learning_rate * final_lr_fraction`` at ``num_steps``. The schedule is called with the number of updates done
    so far, so update ``s`` (completing step ``s``) uses ``schedule(s - 1)``.

    ``nan_at_step`` (a test hook, 0 = off) makes the update of that step use a NaN learning rate: the honest way to
    make a real run diverge on purpose, so tests can check that the trainer stops and keeps its last good checkpoint.
    Cached per arguments, so equal configs give the same function object (and hit the jit caches).
    """
    peak = cfg.learning_rate
    warmup = min(cfg.warmup_steps, num_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=peak * cfg.final_lr_fraction,
    )  # fmt: skip
    if not nan_at_step:
        return schedule
    return lambda count: jnp.where(count == nan_at_step - 1, jnp.nan, schedule(count))


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices only, not on norms' scales).

    Cached: the transformation is static data of ``nnx.Optimizer``, so reusing the object for an equal config lets
    a second run in the same process reuse the compiled steps.
    """
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer_for(cfg: ExperimentConfig) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """``(learning-rate schedule, optimizer)`` of an experiment (the same objects for equal configs)."""
    schedule = learning_rate_schedule(cfg.optim, cfg.num_steps, nan_at_step=cfg.inject_nan_at_step)
    return schedule, make_optimizer(cfg.optim, schedule)


# ``sharding.jit``: the active ShardingRules key the compilation (``nnx.logical_axis_rules`` is not part of jax's
# cache key; the mesh is), so the same config under another rule set is traced again.
@sharding.jit(static_argnames=("model_cfg", "seed"))
def _init_model(*, model_cfg: LMConfig, seed: int) -> LM:
    return LM(model_cfg, rngs=nnx.Rngs(seed))


@sharding.jit(static_argnames=("model_cfg", "seed", "tx"))
def _init_train_state(*, model_cfg: LMConfig, seed: int, tx: optax.GradientTransformation):
    model = LM(model_cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@sharding.jit(static_argnames=("tx", "wrt"))
def _init_optimizer(model: nnx.Module, *, tx: optax.GradientTransformation, wrt) -> nnx.Optimizer:
    return nnx.Optimizer(model, tx, wrt=wrt)


def create_model(model_cfg: LMConfig, seed: int, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> LM:
    """The model alone, born sharded (for eval / generate)."""
    with sharding.use(mesh, rules):
        return _init_model(model_cfg=model_cfg, seed=seed)


def create_train_state(
    cfg: ExperimentConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules
) -> tuple[LM, nnx.Optimizer]:
    """``(model, optimizer)`` created inside ``jax.jit`` under the mesh: parameters and moments born sharded."""
    with sharding.use(mesh, rules):
        return _init_train_state(model_cfg=cfg.model, seed=cfg.seed, tx=tx)


def create_optimizer(
    model: nnx.Module, tx: optax.GradientTransformation, wrt, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules
) -> nnx.Optimizer:
    """The optimizer of an already-built ``model`` over its ``wrt`` variables, moments sharded like them."""
    with sharding.use(mesh, rules):
        return _init_optimizer(model, tx=tx, wrt=wrt)
