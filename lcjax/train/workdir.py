"""Run-directory services: the trained model of a ``lcjax train`` workdir, its held-out evaluation, and generation.

A workdir holds ``config.json`` (the run's experiment config) and ``checkpoints/`` (``checkpoint.py``). These
functions rebuild ``LM(config.model)``, restore the latest readable checkpoint into it and use the trainer's own
input pipeline and eval step (``loop.py``), so ``lcjax eval`` reports exactly what the run's final eval reported.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from lcjax import checks, sharding
from lcjax.train import checkpoint as ckpt_lib
from lcjax.train import loop
from lcjax.train import state as state_lib
from lcjax.train.config import ExperimentConfig, config_from_json


def load_experiment(workdir: str | os.PathLike) -> ExperimentConfig:
    """The experiment config of the run in ``workdir`` (its ``config.json``)."""
    path = os.path.join(os.fspath(workdir), loop.CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(
            f"workdir {os.fspath(workdir)!r} has no {loop.CONFIG_FILE} (was it written by `lcjax train`?)"
        )
    with open(path) as f:
        return config_from_json(f.read())


TOKENIZER_FILE = "tokenizer.json"  # a text run's tokenizer, when it is not the byte tokenizer


def workdir_tokenizer(workdir: str | os.PathLike, cfg: ExperimentConfig, spec: str | None = None):
    """The tokenizer of a text run (``None`` for a synthetic-task run, whose prompts are ids): ``spec`` (``"byte"``,
    a ``tokenizer.json`` or a ``.gguf``) if given, else the workdir's ``tokenizer.json`` if it has one, else bytes.
    Its ``vocab_size`` must fit the model's embedding table."""
    from lcjax.data.tokenizers import load_tokenizer

    if cfg.data.kind != "text":
        checks.require(spec is None, f"--tokenizer: the run in {os.fspath(workdir)!r} is a synthetic-task run "
                       f"(config.data.kind={cfg.data.kind!r}); its prompts are token ids")  # fmt: skip
        return None
    if spec is None:
        own = os.path.join(os.fspath(workdir), TOKENIZER_FILE)
        spec = own if os.path.isfile(own) else "byte"
    tok = load_tokenizer(spec)
    checks.require(tok.vocab_size <= cfg.model.vocab_size, f"tokenizer {spec!r}: vocab_size={tok.vocab_size} exceeds "
                   f"the model's vocab_size={cfg.model.vocab_size}")  # fmt: skip
    return tok


def restore_trained(workdir: str | os.PathLike, *, single_device: bool = False):
    """``(cfg, mesh, rules, model, step)``: the model of the latest readable checkpoint in ``workdir``, on the
    run's mesh, or replicated on one device (``single_device``; orbax reshards on restore)."""
    cfg = load_experiment(workdir)
    if single_device:
        mesh, rules = sharding.make_mesh(devices=jax.devices()[:1]), sharding.ShardingRules.single()
    else:
        mesh, rules = state_lib.build_mesh(cfg.mesh), cfg.rules
    model = state_lib.create_model(cfg.model, cfg.seed, mesh, rules)
    ckpt = ckpt_lib.Checkpointer(os.path.join(os.fspath(workdir), loop.CHECKPOINT_DIR), keep=cfg.keep_checkpoints)
    try:
        step, _ = ckpt.restore_latest(model=model)
    finally:
        ckpt.close()
    if step is None:
        raise ValueError(f"workdir {os.fspath(workdir)!r} holds no checkpoint")
    return cfg, mesh, rules, model, step


def evaluate_workdir(workdir: str | os.PathLike) -> dict[str, Any]:
    """The held-out evaluation of the latest checkpoint in ``workdir`` (``lcjax eval``)."""
    cfg, mesh, rules, model, step = restore_trained(workdir)
    cfg.check_data_parallel(state_lib.data_parallel_size(mesh, rules))
    _, eval_ds = loop.make_datasets(cfg)
    text = cfg.data.kind == "text"
    eval_fn = functools.partial(loop.eval_step, objective=loop.NextTokenLoss(z_loss=cfg.z_loss), text=text)
    with sharding.use(mesh, rules):
        result = loop.evaluate(model, eval_ds, eval_fn, loop.batch_placer(cfg, mesh, rules), text=text)
    return dict(step=step, **result)


def generate_workdir(
    workdir: str | os.PathLike, prompt_tokens: list[int], *, max_new_tokens: int, temperature: float = 0.0,
    seed: int = 0,
) -> tuple[ExperimentConfig, list[int]]:  # fmt: skip
    """Continue one prompt with the latest checkpoint's model (``lcjax generate``); returns the new token ids.

    Runs on one device with replicated parameters: one prompt has no batch to shard, and the LM's KV-cache
    update does not yet accept a batch sharded over a mesh axis (``ShardingTypeError`` in ``dynamic_update_slice``).
    """
    from lcjax.models.lm import generate

    cfg, mesh, rules, model, _ = restore_trained(workdir, single_device=True)
    checks.require(len(prompt_tokens) > 0, "generate: the prompt is empty; give at least one token")
    checks.check_token_ids("generate: prompt", np.asarray(prompt_tokens), cfg.model.vocab_size)
    with sharding.use(mesh, rules):
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        prompt = jax.device_put(np.asarray([prompt_tokens], np.int32), replicated)
        rng = jax.random.key(seed)
        out = generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng)
    return cfg, [int(t) for t in np.asarray(jax.device_get(out))[0]]
