"""Beacon-only training: ratio sampling per window, loss on raw tokens, base parameters frozen.

The recipe of Activation Beacon (https://arxiv.org/abs/2401.03462; FlagOpen/FlagEmbedding
``research/Long_LLM/activation_beacon/main/train.py`` with ``only_train_beacon=True``): next-token cross-entropy on
the raw tokens of every window of a sample, processed as one differentiable forward (gradients flow through the
earlier windows' beacon K/V), a fresh compression ratio per window drawn from a mix, and only the beacon parameters
(``BeaconParam``: beacon embedding and beacon q/k/v(/o) projections) updated.

Freezing is enforced twice: ``beacon_loss`` stops gradients at every non-beacon variable (so ``jax.grad`` of it
w.r.t. the whole model is exactly zero there), and ``train_beacons`` / ``make_train_step`` give the optimizer the
``BeaconParam`` state only (``nnx.split(model, BeaconParam, ...)``), so no optimizer rule (weight decay included)
can touch a base weight. A trainer that uses ``nnx.Optimizer`` should pass ``wrt=BeaconParam``.

Unlike upstream there is no separate "training mode": the loss is computed on exactly the computation used at
inference (beacons also in the last window, no masking of the first window's labels), and ratios come from an
explicit PRNG key instead of a global ``np.random`` state.

The second half runs the CPU passkey experiment of ``configs/beacon.py`` (``build_base`` -> ``evaluate_base`` ->
``beacon_stage``; ``python -m lcjax.train.beacon --config configs/beacon.py``), with a minimal full-parameter loop
(``pretrain_lm``) for the base model.
Dimension key (lcjax/typing.py): B batch, L length, N windows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax import data
from lcjax.layers.beacon import _ADAPT, BeaconConfig, BeaconParam
from lcjax.models.beacon import BeaconLM, add_beacons
from lcjax.models.lm import LM, LMConfig
from lcjax.ops import rope as rope_ops
from lcjax.ops.losses import token_cross_entropy
from lcjax.typing import Array, Int

__all__ = ["beacon_loss", "beacon_stage", "build_base", "evaluate_base", "lengths_from_batch", "make_train_step",
           "passkey_accuracy", "pretrain_lm", "run", "sample_ratios", "train_beacons"]


def sample_ratios(
    cfg: BeaconConfig, key: jax.Array, lengths_B: Int[Array, " B"], n_windows: int, *, max_positions: int | None = None
) -> Int[Array, "B N"]:
    """A ratio for every example and window [B, n_windows], drawn from ``cfg.train_ratios`` by ``cfg.ratio_mix``.

    ``step_random``: independent per window (repeated entries act as weights); ``instance_random``: one per example;
    ``sequence``: window w gets ``train_ratios[w % len]``; ``adapt-N``: per example the smallest ratio with
    ``(max_positions - W) * r + W >= length + N`` (the largest if none), which needs ``max_positions``.
    """
    choices = jnp.asarray(cfg.train_ratios, jnp.int32)
    B = lengths_B.shape[0]
    mix = cfg.ratio_mix
    if mix == "step_random":
        return jax.random.choice(key, choices, shape=(B, n_windows))
    if mix == "instance_random":
        return jnp.broadcast_to(jax.random.choice(key, choices, shape=(B, 1)), (B, n_windows))
    if mix == "sequence":
        return jnp.broadcast_to(choices[jnp.arange(n_windows) % choices.shape[0]][None], (B, n_windows))
    m = _ADAPT.match(mix)
    if m is None:  # BeaconConfig validates the mix; this guards direct misuse
        raise ValueError(f"sample_ratios: unknown BeaconConfig.ratio_mix={mix!r}")
    if max_positions is None:
        raise ValueError(
            f"sample_ratios: ratio_mix={mix!r} needs max_positions (the base model's LMConfig.max_seq_len)"
        )
    candidates = jnp.asarray(sorted(r for r in cfg.train_ratios if r > 0) or [max(cfg.train_ratios)], jnp.int32)
    W = cfg.window
    fits_BC = (max_positions - W) * candidates[None, :] + W >= lengths_B[:, None] + int(m.group(1))
    first_B = jnp.where(fits_BC.any(axis=1), jnp.argmax(fits_BC, axis=1), candidates.shape[0] - 1)
    return jnp.broadcast_to(candidates[first_B][:, None], (B, n_windows))


def lengths_from_batch(batch: Mapping[str, Any]) -> Int[Array, " B"]:
    """Real tokens per row of an ``lcjax.data`` batch: positions with ``segment_ids > 0`` (padding is at the end)."""
    return jnp.sum(jnp.asarray(batch["segment_ids"]) > 0, axis=1, dtype=jnp.int32)


def _frozen_base(model: BeaconLM) -> BeaconLM:
    """The same model with ``stop_gradient`` on every variable that is not a ``BeaconParam``."""
    graphdef, beacon, rest = nnx.split(model, BeaconParam, ...)
    return nnx.merge(graphdef, beacon, jax.tree.map(jax.lax.stop_gradient, rest))


def beacon_loss(
    model: BeaconLM, batch: Mapping[str, Any], ratios_BN: Int[Array, "B N"] | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(mean cross-entropy over batch["loss_mask"], metrics)`` of the raw-token logits, base weights frozen.

    ``batch`` has ``inputs``, ``targets``, ``loss_mask`` and optionally ``segment_ids`` (right padding = 0);
    ``ratios_BN``: one ratio per example and window (default ``cfg.ratio``).
    """
    inputs = jnp.asarray(batch["inputs"])
    lengths_B = lengths_from_batch(batch) if "segment_ids" in batch else None
    logits_BLV = _frozen_base(model)(inputs, lengths_B=lengths_B, ratios_BN=ratios_BN)
    weights_BL = jnp.asarray(batch["loss_mask"]).astype(jnp.float32)
    total, count = token_cross_entropy(logits_BLV, jnp.asarray(batch["targets"]), weights_BL)
    loss = total / jnp.maximum(count, 1.0)
    correct = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == jnp.asarray(batch["targets"])) * weights_BL)
    return loss, {"loss": loss, "tokens": count, "accuracy": correct / jnp.maximum(count, 1.0)}


def make_train_step(model: BeaconLM, tx: optax.GradientTransformation) -> tuple[Callable, Any, Any, Any]:
    """``(step, beacon_state, opt_state, (graphdef, rest))`` for a functional loop over the beacon parameters only.

    ``step(beacon_state, opt_state, rest, batch, key) -> (beacon_state, opt_state, metrics)`` is jitted, donates the
    beacon and optimizer state (not ``rest``, the base weights, which is never an output) and samples each window's
    ratio from ``key``. Rebuild the model with ``nnx.merge(graphdef, beacon_state, rest)`` (see ``train_beacons``).
    """
    graphdef, beacon, rest = nnx.split(model, BeaconParam, ...)
    cfg = model.cfg
    max_positions = model.base.cfg.max_seq_len
    opt_state = tx.init(beacon)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(beacon, opt_state, rest, batch, key):
        inputs = jnp.asarray(batch["inputs"])
        B, L = inputs.shape
        lengths_B = lengths_from_batch(batch) if "segment_ids" in batch else jnp.full((B,), L, jnp.int32)
        ratios_BN = sample_ratios(cfg, key, lengths_B, -(-L // cfg.window), max_positions=max_positions)

        def loss_fn(beacon):
            return beacon_loss(nnx.merge(graphdef, beacon, rest), batch, ratios_BN)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(beacon)
        updates, opt_state = tx.update(grads, opt_state, beacon)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(beacon, updates), opt_state, metrics

    return step, beacon, opt_state, (graphdef, rest)


def train_beacons(
    model: BeaconLM, batches: Iterable[Mapping[str, np.ndarray]], *, steps: int, tx: optax.GradientTransformation,
    seed: int = 0, log_every: int = 0, log: Callable[[str], None] = print,
) -> tuple[BeaconLM, list[dict[str, float]]]:
    """Train the beacon parameters of ``model`` for ``steps`` batches; returns the trained model and per-step metrics.

    A small self-contained loop (the shared trainer can do the same with ``beacon_loss`` and
    ``nnx.Optimizer(model, tx, wrt=BeaconParam)``). Stops with an error on a non-finite loss.
    """
    if steps < 1:
        raise ValueError(f"train_beacons: steps={steps} must be >= 1")
    step, beacon, opt_state, (graphdef, rest) = make_train_step(model, tx)
    key = jax.random.key(seed)
    history: list[dict[str, float]] = []
    it = iter(batches)
    t0 = time.perf_counter()
    for i in range(steps):
        batch = {k: np.asarray(v) for k, v in next(it).items()}
        beacon, opt_state, metrics = step(beacon, opt_state, rest, batch, jax.random.fold_in(key, i))
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"train_beacons: non-finite loss {metrics['loss']} at step {i}")
        metrics["step"], metrics["time_s"] = i, time.perf_counter() - t0
        history.append(metrics)
        if log_every and (i % log_every == 0 or i == steps - 1):
            log(f"step {i:5d}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}  {metrics['time_s']:.1f}s")
    return nnx.merge(graphdef, beacon, rest), history


# ---------------------------------------------------------------------------------------------------------------
# Passkey experiment: pretrain (or convert) a base LM, add beacons, train them, evaluate beyond the base window
# ---------------------------------------------------------------------------------------------------------------
def _adamw(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=weight_decay))


def pretrain_lm(
    model: LM, batches: Iterable[Mapping[str, np.ndarray]], *, steps: int, tx: optax.GradientTransformation,
    log_every: int = 0, log: Callable[[str], None] = print,
) -> tuple[LM, list[dict[str, float]]]:
    """Plain next-token training of every parameter of a base ``LM`` (full attention), loss on ``loss_mask``.

    A minimal loop for the CPU experiment (the shared trainer, ``lcjax.train.loop``, is the general one)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch):
        def loss_fn(params):
            logits_BLV = nnx.merge(graphdef, params, rest)(batch["inputs"])
            w_BL = batch["loss_mask"].astype(jnp.float32)
            total, count = token_cross_entropy(logits_BLV, batch["targets"], w_BL)
            acc = jnp.sum((jnp.argmax(logits_BLV, -1) == batch["targets"]) * w_BL) / jnp.maximum(count, 1.0)
            return total / jnp.maximum(count, 1.0), acc

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": acc}

    history, it, t0 = [], iter(batches), time.perf_counter()
    for i in range(steps):
        batch = {k: jnp.asarray(np.asarray(v)) for k, v in next(it).items() if k in ("inputs", "targets", "loss_mask")}
        params, opt_state, metrics = step(params, opt_state, rest, batch)
        metrics = {k: float(v) for k, v in metrics.items()} | {"step": i, "time_s": time.perf_counter() - t0}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"pretrain_lm: non-finite loss {metrics['loss']} at step {i}")
        history.append(metrics)
        if log_every and (i % log_every == 0 or i == steps - 1):
            m = metrics
            log(f"base step {i:5d}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  {m['time_s']:.1f}s")
    return nnx.merge(graphdef, params, rest), history


def passkey_accuracy(
    logits_fn: Callable[[np.ndarray], jax.Array], task: data.PasskeyConfig, *, num_examples: int, batch_size: int,
    seed: int = 0, window: int | None = None,
) -> dict[str, float]:
    """Teacher-forced passkey accuracy on the test split: ``digit_accuracy`` (answer digits predicted exactly),
    ``example_accuracy`` (all digits of an example right; chance 10^-num_digits) and ``digit_accuracy_by_position``
    (per answer digit, in order).

    With ``window`` (a beacon window W), also ``digit_accuracy_far`` / ``digit_accuracy_near`` and ``far_fraction``:
    the same split by whether the needle's marker lies in an earlier window than the final query (so a beacon model
    has it only in compressed memory) or in the query's own window.
    """
    examples = [data.generate(task, i, seed=seed, split="test") for i in range(num_examples)]
    counts = dict(digits=0, right=0, examples_right=0, far_digits=0, far_right=0, far_examples=0)
    by_position = np.zeros(task.num_digits)
    for lo in range(0, num_examples, batch_size):
        chunk = examples[lo : lo + batch_size]
        inputs = np.stack([e["inputs"] for e in chunk])
        targets = np.stack([e["targets"] for e in chunk])
        mask = np.stack([e["loss_mask"] for e in chunk])
        right = (np.asarray(logits_fn(inputs)).argmax(-1) == targets) & mask
        counts["digits"] += int(mask.sum())
        counts["right"] += int(right.sum())
        counts["examples_right"] += int((right.sum(1) == mask.sum(1)).sum())
        by_position += right[:, -task.num_digits :].sum(0)  # the answers are the last num_digits positions
        if window is not None:
            needle = np.argmax(inputs == data.synthetic.PASSKEY_MARKER, axis=1)  # the first marker: the needle
            far = needle // window < (inputs.shape[1] - 1) // window
            counts["far_examples"] += int(far.sum())
            counts["far_digits"] += int(mask[far].sum())
            counts["far_right"] += int(right[far].sum())
    out = {"digit_accuracy": counts["right"] / counts["digits"],
           "example_accuracy": counts["examples_right"] / num_examples,
           "digit_accuracy_by_position": (by_position / num_examples).tolist()}  # fmt: skip
    if window is not None:
        near_digits = counts["digits"] - counts["far_digits"]
        out |= dict(
            far_fraction=counts["far_examples"] / num_examples,
            digit_accuracy_far=counts["far_right"] / counts["far_digits"] if counts["far_digits"] else None,
            digit_accuracy_near=(counts["right"] - counts["far_right"]) / near_digits if near_digits else None,
        )  # fmt: skip
    return out


def _with_max_len(model: LM, max_seq_len: int) -> LM:
    """The same weights in an ``LM`` whose ``max_seq_len`` allows longer inputs (RoPE has no learned positions)."""
    longer = nnx.eval_shape(lambda: LM(dataclasses.replace(model.cfg, max_seq_len=max_seq_len), rngs=nnx.Rngs(0)))
    nnx.update(longer, nnx.state(model))
    return longer


def _task(c, seq_len: int) -> data.PasskeyConfig:
    return data.PasskeyConfig(seq_len=seq_len, **dict(c.data.task_args))


def _evaluate(c, fn, L: int) -> dict[str, float]:
    return passkey_accuracy(fn, _task(c, L), num_examples=c.eval.num_examples, batch_size=c.eval.batch_size,
                            seed=c.seed, window=int(c.beacon.window))  # fmt: skip


def build_base(c, log: Callable[[str], None] = print) -> tuple[LM, list[dict[str, float]]]:
    """The base LM of ``config.base``: pretrained here on ``base.seq_len``-token passkey data (``source="train"``)
    or converted from a local HF Llama checkpoint (``source="hf_dir"``). Returns ``(model, training history)``."""
    if c.base.source == "train":
        model_kw = dict(c.model)
        model_kw["rope"] = rope_ops.RopeConfig(**dict(model_kw.get("rope", {})))
        base = LM(LMConfig(**model_kw), rngs=nnx.Rngs(c.seed))
        train_ds, _ = data.synthetic_datasets(_task(c, c.base.seq_len), global_batch_size=c.base.batch_size,
                                              num_train=c.base.num_train, num_validation=8, seed=c.seed)  # fmt: skip
        return pretrain_lm(base, train_ds, steps=c.base.steps, tx=_adamw(c.base.lr, c.base.steps, c.base.weight_decay),
                           log_every=c.log_every, log=log)  # fmt: skip
    if c.base.source == "hf_dir":
        from lcjax.convert.llama import llama_from_pretrained_dir

        return llama_from_pretrained_dir(c.base.hf_dir), []
    raise ValueError(f"config.base.source={c.base.source!r}; allowed: 'train', 'hf_dir'")


def evaluate_base(c, base: LM) -> dict[int, dict[str, float]]:
    """Passkey accuracy of the base alone (full attention) at every ``eval.lengths``, beyond its window too."""
    lengths = [int(n) for n in c.eval.lengths]
    long_base = _with_max_len(base, max(lengths + [base.cfg.max_seq_len]))
    fn = jax.jit(lambda m, x: m(x))
    return {L: _evaluate(c, lambda x: fn(long_base, x), L) for L in lengths}


def beacon_stage(c, base: LM, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Add beacons (``config.beacon``) to ``base``, evaluate them untrained, train them (``config.train``, on
    ``data.seq_len``-token passkey data) and evaluate again, at every ``eval.lengths`` x ``eval.ratios``."""
    bcfg = BeaconConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(c.beacon).items()})
    model = add_beacons(base, bcfg, rngs=nnx.Rngs(c.seed))
    fn = jax.jit(lambda m, x, n, r: m(x, lengths_B=n, ratios_BN=r))
    lengths, ratios = [int(n) for n in c.eval.lengths], [int(r) for r in c.eval.ratios]

    def evaluate(m, ratio, L):
        n_windows = -(-L // bcfg.window)
        return _evaluate(c, lambda x: fn(m, x, np.full(x.shape[0], L, np.int32),
                                         np.full((x.shape[0], n_windows), ratio, np.int32)), L)  # fmt: skip

    out: dict[str, Any] = {"beacon_init": {r: {L: evaluate(model, r, L) for L in lengths} for r in ratios}}
    train_ds, _ = data.synthetic_datasets(_task(c, c.data.seq_len), global_batch_size=c.train.batch_size,
                                          num_train=c.data.num_train, num_validation=8, seed=c.seed + 1)  # fmt: skip
    t0 = time.perf_counter()
    model, out["beacon_history"] = train_beacons(
        model, train_ds, steps=c.train.steps, tx=_adamw(c.train.lr, c.train.steps, c.train.weight_decay),
        seed=c.seed, log_every=c.log_every, log=log,
    )  # fmt: skip
    out["train_s"] = time.perf_counter() - t0
    out["beacon"] = {r: {L: evaluate(model, r, L) for L in lengths} for r in ratios}
    for r in ratios:
        log(f"beacon r={r}: " + ", ".join(f"L={L}: {v['digit_accuracy']:.3f}" for L, v in out["beacon"][r].items()))
    return out


def run(config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment of ``configs/beacon.py``: ``build_base``, ``evaluate_base``, ``beacon_stage``. JSON-able."""
    t_start = time.perf_counter()
    base, history = build_base(config, log)
    out: dict[str, Any] = {"config": config.to_dict(), "base_history": history, "base": evaluate_base(config, base)}
    log(f"base (trained window {base.cfg.max_seq_len}): "
        + ", ".join(f"L={L}: {r['digit_accuracy']:.3f}" for L, r in out["base"].items()))  # fmt: skip
    out |= beacon_stage(config, base, log)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m lcjax.train.beacon --config configs/beacon.py[:ARG] [--out results.json]``."""
    import argparse
    import json

    from lcjax.train.config import load_config_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="FILE[:ARG], e.g. configs/beacon.py:smoke")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    path, _, arg = args.config.partition(":")
    results = run(load_config_file(path, arg or None))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
