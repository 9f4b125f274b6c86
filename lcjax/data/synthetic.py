"""Synthetic long-context tasks as pure NumPy generators, deterministic per (seed, split, example index).

Every example is regenerated independently from ``np.random.default_rng([seed, SPLITS[split], index])``, so a data
source over a task needs no storage, any example can be looked up alone, and the TFDS builders in
``tfds_builders.py`` write exactly these examples.

Tasks (one frozen, keyword-only config each; ``__post_init__`` checks every field with ``lcjax.checks``: ``TypeError``
for a wrong type, a bool included, ``ValueError`` for a bad value, both naming the field):

- ``MQARConfig``: multi-query associative recall, "Zoology: Measuring and Improving Recall in Efficient Language
  Models" (Arora et al. 2023, https://arxiv.org/abs/2312.04927), recipe of HazyResearch/zoology
  ``zoology/data/multiquery_ar.py`` (checked, not copied): keys from ``[1, V/2)``, values from ``[V/2, V)``, ``K``
  distinct keys written as ``k1 v1 ... kK vK``, then each key queried once at an even offset of the query region
  drawn without replacement with probability ``∝ (g + 1)^(power_a - 1)``; the answer (the key's value) is the
  target *at* the query key. Filler is 0 (Zoology Figure 2) or uniform over ``[0, V)`` (``random_non_queries``,
  Based / Mamba-2).
- ``InductionHeadsConfig``: Mamba App. E.1 (Gu & Dao 2023, https://arxiv.org/abs/2312.00752): random tokens, a
  trigger token (id 0) occurs exactly twice; at its second occurrence, the last input, the target is the token that
  followed its first occurrence.
- ``SelectiveCopyingConfig``: Mamba App. E.1 / state-spaces/s4 ``src/dataloaders/datasets/copying.py`` layout:
  ``num_tokens`` data tokens at sorted random positions among noise (id 0), then ``num_tokens`` markers
  (id ``vocab_size - 1``); at the markers the targets are the data tokens in order.
- ``PasskeyConfig``: token-level passkey retrieval after "Landmark Attention" §4.2 (Mohtashami & Jaggi 2023,
  https://arxiv.org/abs/2305.16300): filler, a needle ``[KEY d1 .. dD]`` at a chosen or random depth, more filler,
  then the query ``KEY`` after which the model must emit the digits. Token ids: digits 0..9, ``KEY`` = 10, filler
  ``[11, vocab_size)`` (uniform, or the filler range cycled like a repeated sentence).

Example convention (all tasks, and the batches of ``pipeline.py``): ``inputs`` int32 [L], ``targets`` int32 [L] and
``loss_mask`` bool [L]. The model reads ``inputs`` and is scored at position ``i`` on predicting ``targets[i]`` only
where ``loss_mask[i]``; elsewhere ``targets`` holds 0, a valid id that carries no meaning (no -100 sentinels, so
one-hot / gather never go out of range). "Task accuracy" (``accuracy_counts``): the fraction of answer positions
predicted exactly (``answer_accuracy``, Zoology's metric: with a fixed number of answers per example the mean of
per-example accuracies equals it) and the fraction of examples whose answers are all exact (``example_accuracy``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, SupportsIndex

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.checks import check_token_ids, require, require_bool, require_choice, require_float, require_int
from lcjax.typing import Bool, Int

SPLITS = {"train": 0, "validation": 1, "test": 2}
"""Split name -> the entry of the per-example seed sequence that separates held-out data from training data."""

Example = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------ task configs


@dataclass(frozen=True, kw_only=True)
class MQARConfig:
    """Multi-query associative recall (Zoology). Defaults: the Figure 2 cell T=64, K=4, V=8192, zero filler."""

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = False

    task = "mqar"

    def __post_init__(self):
        require_int("MQARConfig.seq_len", self.seq_len, min=4)
        require_int("MQARConfig.num_kv_pairs", self.num_kv_pairs, min=1)
        require_int("MQARConfig.vocab_size", self.vocab_size, min=4)
        require_bool("MQARConfig.random_non_queries", self.random_non_queries)
        require_float("MQARConfig.power_a", self.power_a, min=0, min_open=True, max=1)  # 1 = uniform placement
        require(self.seq_len % 2 == 0, f"MQARConfig.seq_len={self.seq_len} must be even (MQAR alternates key and "
                                       "value slots)")  # fmt: skip
        require(
            4 * self.num_kv_pairs <= self.seq_len,
            f"MQARConfig.num_kv_pairs={self.num_kv_pairs} needs seq_len >= 4 * num_kv_pairs = {4 * self.num_kv_pairs} "
            f"(2K context tokens plus K query slots among the (seq_len - 2K) / 2 even offsets); got {self.seq_len}",
        )
        require(
            self.vocab_size // 2 - 1 >= self.num_kv_pairs,
            f"MQARConfig.vocab_size={self.vocab_size} is too small for num_kv_pairs={self.num_kv_pairs}: distinct keys "
            f"come from [1, vocab_size // 2), so vocab_size must be >= 2 * num_kv_pairs + 2 = "
            f"{2 * self.num_kv_pairs + 2}",
        )

    @property
    def name(self) -> str:
        filler = "random" if self.random_non_queries else "zeros"
        return f"mqar_L{self.seq_len}_K{self.num_kv_pairs}_V{self.vocab_size}_a{self.power_a:g}_{filler}"


@dataclass(frozen=True, kw_only=True)
class InductionHeadsConfig:
    """Induction heads (Mamba App. E.1: trained at L=256 with vocab 16). Token 0 is the trigger."""

    seq_len: int = 256
    vocab_size: int = 16

    task = "induction_heads"

    def __post_init__(self):
        require_int("InductionHeadsConfig.seq_len", self.seq_len, min=3)
        require_int("InductionHeadsConfig.vocab_size", self.vocab_size, min=3)  # the trigger plus two ordinary tokens

    @property
    def name(self) -> str:
        return f"induction_heads_L{self.seq_len}_V{self.vocab_size}"


@dataclass(frozen=True, kw_only=True)
class SelectiveCopyingConfig:
    """Selective copying (Mamba App. E.1: length 4096, vocab 16 including noise and marker, 16 data tokens)."""

    seq_len: int = 256
    num_tokens: int = 16
    vocab_size: int = 16

    task = "selective_copying"

    def __post_init__(self):
        require_int("SelectiveCopyingConfig.seq_len", self.seq_len, min=2)
        require_int("SelectiveCopyingConfig.num_tokens", self.num_tokens, min=1)
        require_int("SelectiveCopyingConfig.vocab_size", self.vocab_size, min=3)  # noise 0, marker V-1, data [1, V-1)
        require(
            self.seq_len >= 2 * self.num_tokens,
            f"SelectiveCopyingConfig.seq_len={self.seq_len} must be >= 2 * num_tokens = {2 * self.num_tokens} "
            "(a context holding the data tokens, then one marker per data token)",
        )

    @property
    def name(self) -> str:
        return f"selective_copying_L{self.seq_len}_M{self.num_tokens}_V{self.vocab_size}"


PASSKEY_MARKER = 10
"""Token id of ``KEY`` in the passkey task; ids 0..9 are the digits and filler starts at 11."""


@dataclass(frozen=True, kw_only=True)
class PasskeyConfig:
    """Token-level passkey retrieval. ``depth`` in [0, 1] fixes the needle position (for depth x length grids);
    ``None`` draws it uniformly per example. ``filler="repeat"`` cycles the filler ids like a repeated sentence."""

    seq_len: int = 256
    num_digits: int = 5
    vocab_size: int = 32
    depth: float | None = None
    filler: Literal["random", "repeat"] = "random"

    task = "passkey"

    def __post_init__(self):
        require_int("PasskeyConfig.seq_len", self.seq_len, min=4)
        require_int("PasskeyConfig.num_digits", self.num_digits, min=1)
        require_int("PasskeyConfig.vocab_size", self.vocab_size, min=PASSKEY_MARKER + 2)
        require(
            self.seq_len >= 2 * (self.num_digits + 1),
            f"PasskeyConfig.seq_len={self.seq_len} must be >= 2 * (num_digits + 1) = {2 * (self.num_digits + 1)} "
            "(the needle KEY d1..dD and the query KEY d1..dD)",
        )
        if self.depth is not None:  # None: uniform
            require_float("PasskeyConfig.depth", self.depth, min=0, max=1)
        require_choice("PasskeyConfig.filler", self.filler, ("random", "repeat"))

    @property
    def name(self) -> str:
        depth = "u" if self.depth is None else f"{self.depth:g}"
        return f"passkey_L{self.seq_len}_D{self.num_digits}_V{self.vocab_size}_d{depth}_{self.filler}"


TaskConfig = MQARConfig | InductionHeadsConfig | SelectiveCopyingConfig | PasskeyConfig
TASKS: dict[str, type] = {
    cls.task: cls for cls in (MQARConfig, InductionHeadsConfig, SelectiveCopyingConfig, PasskeyConfig)
}


def make_task(task: str, **kwargs: Any) -> TaskConfig:
    """Builds a task config by name (``"mqar"``, ``"induction_heads"``, ``"selective_copying"``, ``"passkey"``)."""
    require_choice("make_task: task", task, sorted(TASKS))
    fields = {f.name for f in dataclasses.fields(TASKS[task])}
    unknown = sorted(set(kwargs) - fields)
    require(not unknown, f"make_task: unknown field(s) {unknown} for task={task!r}; allowed: {sorted(fields)}")
    return TASKS[task](**kwargs)


# ------------------------------------------------------------------------------------------------ generators


def _blank(seq_len: int) -> Example:
    return dict(
        inputs=np.zeros(seq_len, np.int32), targets=np.zeros(seq_len, np.int32), loss_mask=np.zeros(seq_len, bool)
    )


def mqar_example(cfg: MQARConfig, rng: np.random.Generator) -> Example:
    """One MQAR example: ``k1 v1 .. kK vK`` then each key once in the query region; targets = values at queries."""
    T, K, V = cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
    half = V // 2
    keys = 1 + rng.choice(half - 1, size=K, replace=False)
    values = half + rng.choice(V - half, size=K, replace=False)
    # K distinct query offsets, offset g with weight (g + 1)^(power_a - 1), drawn without replacement in order:
    # the top K of log-weight + Gumbel noise (Gumbel-top-k, the same law as K sequential weighted draws, 6x faster
    # than rng.choice(..., replace=False, p=...)).
    num_offsets = (T - 2 * K) // 2
    log_w = (cfg.power_a - 1) * np.log(np.arange(1, num_offsets + 1, dtype=np.float64))
    offsets = np.argsort(-(log_w + rng.gumbel(size=num_offsets)), kind="stable")[:K]
    ex = _blank(T)
    ex["inputs"][0 : 2 * K : 2] = keys
    ex["inputs"][1 : 2 * K : 2] = values
    queries = 2 * K + 2 * offsets
    ex["inputs"][queries] = keys
    ex["targets"][queries] = values
    ex["loss_mask"][queries] = True
    if cfg.random_non_queries:
        filler = ex["inputs"] == 0
        ex["inputs"][filler] = rng.integers(0, V, size=int(filler.sum()))
    return ex


def induction_heads_example(cfg: InductionHeadsConfig, rng: np.random.Generator) -> Example:
    """Tokens from ``[1, V)``; the trigger 0 at a random position p <= L-3 and at L-1; target at L-1 = x[p+1]."""
    L, V = cfg.seq_len, cfg.vocab_size
    ex = _blank(L)
    ex["inputs"][:] = rng.integers(1, V, size=L)
    p = int(rng.integers(0, L - 2))
    ex["inputs"][p] = 0
    ex["inputs"][L - 1] = 0
    ex["targets"][L - 1] = ex["inputs"][p + 1]
    ex["loss_mask"][L - 1] = True
    return ex


def selective_copying_example(cfg: SelectiveCopyingConfig, rng: np.random.Generator) -> Example:
    """Data tokens ``[1, V-1)`` at sorted random positions of a noise context, then markers with the data as targets."""
    L, M, V = cfg.seq_len, cfg.num_tokens, cfg.vocab_size
    context = L - M
    positions = np.sort(rng.choice(context, size=M, replace=False))
    data = rng.integers(1, V - 1, size=M)
    ex = _blank(L)
    ex["inputs"][positions] = data
    ex["inputs"][context:] = V - 1
    ex["targets"][context:] = data
    ex["loss_mask"][context:] = True
    return ex


def passkey_example(cfg: PasskeyConfig, rng: np.random.Generator) -> Example:
    """filler[:s] KEY d1..dD filler[s:] KEY d1..d(D-1), scored on d1..dD after the final KEY (teacher forcing)."""
    L, D, V = cfg.seq_len, cfg.num_digits, cfg.vocab_size
    digits = rng.integers(0, 10, size=D)
    num_filler = L + 1 - 2 * (D + 1)  # the token stream has L + 1 tokens before the one-step shift
    if cfg.filler == "random":
        filler = rng.integers(PASSKEY_MARKER + 1, V, size=num_filler)
    else:
        filler = PASSKEY_MARKER + 1 + np.arange(num_filler) % (V - PASSKEY_MARKER - 1)
    start = int(rng.integers(0, num_filler + 1)) if cfg.depth is None else round(cfg.depth * num_filler)
    needle = np.concatenate([[PASSKEY_MARKER], digits])
    stream = np.concatenate([filler[:start], needle, filler[start:], needle]).astype(np.int32)
    ex = _blank(L)
    ex["inputs"][:] = stream[:L]
    ex["targets"][L - D :] = stream[L + 1 - D :]
    ex["loss_mask"][L - D :] = True
    return ex


_GENERATORS: dict[type, Callable[[Any, np.random.Generator], Example]] = {
    MQARConfig: mqar_example,
    InductionHeadsConfig: induction_heads_example,
    SelectiveCopyingConfig: selective_copying_example,
    PasskeyConfig: passkey_example,
}


def _require_task(name: str, task: Any) -> None:
    if type(task) not in _GENERATORS:
        raise TypeError(f"{name} must be one of {[c.__name__ for c in _GENERATORS]}, got {type(task).__name__}")


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one example: ``default_rng([seed, SPLITS[split], index])``."""
    seed, index = require_int("seed", seed, min=0), require_int("index", index, min=0)
    require_choice("split", split, list(SPLITS))
    return np.random.default_rng([seed, SPLITS[split], index])


def generate(task: TaskConfig, index: int, *, seed: int, split: str = "train") -> Example:
    """Example ``index`` of ``split`` for ``task``: dict(inputs int32 [L], targets int32 [L], loss_mask bool [L])."""
    _require_task("generate: task", task)
    ex = _GENERATORS[type(task)](task, example_rng(seed, split, index))
    for key in ("inputs", "targets"):  # the generators' own contract, checked on every example (two reductions)
        check_token_ids(f"generate({task.name}): {key}", ex[key], task.vocab_size)
    return ex


class SyntheticSource:
    """In-memory grain ``RandomAccessDataSource`` over ``generate``: element ``i`` is example ``i`` of the split plus
    ``index`` (int64). Equal, record for record, to the TFDS dataset prepared from the same task, split and seed."""

    def __init__(self, task: TaskConfig, *, split: str, num_examples: int, seed: int = 0):
        _require_task("SyntheticSource: task", task)
        num_examples = require_int("SyntheticSource: num_examples", num_examples, min=1)
        seed = require_int("SyntheticSource: seed", seed, min=0)
        require_choice("SyntheticSource: split", split, list(SPLITS))
        self.task, self.split, self.num_examples, self.seed = task, split, num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: SupportsIndex) -> Example:
        i = int(index)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self!r}")
        return dict(generate(self.task, i, seed=self.seed, split=self.split), index=np.int64(i))

    def __getitems__(self, indices: list[int]) -> list[Example]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return (
            f"SyntheticSource({self.task.name}, split={self.split!r}, num_examples={self.num_examples}, "
            f"seed={self.seed})"
        )


# ------------------------------------------------------------------------------------------------ task accuracy

ArrayLike = np.ndarray | jax.Array


def accuracy_counts(
    predictions_BL: Int[ArrayLike, "B L"], targets_BL: Int[ArrayLike, "B L"], loss_mask_BL: Bool[ArrayLike, "B L"]
) -> dict[str, jax.Array]:
    """Summable task-accuracy counts for one batch (jit-friendly; sum them over batches and devices).

    ``predictions_BL`` is usually ``argmax(logits, -1)``. Rows without any answer position (eval padding) count for
    nothing. Returns int32 scalars ``answer_correct, answer_total, example_correct, example_total``.
    """
    mask_BL = jnp.asarray(loss_mask_BL, bool)
    correct_BL = (jnp.asarray(predictions_BL) == jnp.asarray(targets_BL)) & mask_BL
    answers_B = mask_BL.sum(-1, dtype=jnp.int32)
    has_answer_B = answers_B > 0
    all_correct_B = has_answer_B & (correct_BL.sum(-1, dtype=jnp.int32) == answers_B)
    return dict(
        answer_correct=correct_BL.sum(dtype=jnp.int32),
        answer_total=answers_B.sum(dtype=jnp.int32),
        example_correct=all_correct_B.sum(dtype=jnp.int32),
        example_total=has_answer_B.sum(dtype=jnp.int32),
    )


def accuracy_from_counts(counts: dict[str, Any]) -> dict[str, float]:
    """``answer_accuracy`` and ``example_accuracy`` from (summed) ``accuracy_counts``."""
    if int(counts["answer_total"]) == 0:
        raise ValueError("counts has answer_total=0: no answer positions were scored")
    return dict(
        answer_accuracy=float(counts["answer_correct"]) / float(counts["answer_total"]),
        example_accuracy=float(counts["example_correct"]) / float(counts["example_total"]),
    )
