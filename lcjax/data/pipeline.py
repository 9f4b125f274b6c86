"""grain input pipelines: batched synthetic tasks and packed byte-level text, sharded per process, checkpointable.

Every pipeline yields dicts of NumPy arrays with the same five keys, shaped ``[B_local, L]`` where
``B_local = global_batch_size // process_count``:

=============  =====  ===========================================================================================
key            dtype  meaning
=============  =====  ===========================================================================================
inputs         int32  token ids the model reads
targets        int32  the id to predict at each position; meaningful only where ``loss_mask`` (0 / PAD elsewhere)
loss_mask      bool   positions scored by the loss and by task accuracy
segment_ids    int32  1, 2, ... per packed document piece, 0 on padding (synthetic examples: all 1, eval padding 0)
positions      int32  position within the segment, restarting at 0 (synthetic examples: 0 .. L-1)
=============  =====  ===========================================================================================

Segment ids carry lcjax's one meaning (``lcjax/ops``, every model): a document is a run of equal positive ids, a row
never reuses an id, 0 is padding and belongs to no document. Token ids are checked wherever the pipeline knows the
vocabulary: the tokenizer's output against ``tokenizer.vocab_size`` (text), every example against ``vocab_size``
(``batched_dataset``; ``synthetic_datasets`` passes the task's), so an out-of-range id fails here, naming the
pipeline, rather than being clamped by the model's embedding gather.

Pipelines (all return a ``grain.IterDataset``; ``iter(ds)`` gives an iterator with ``get_state()`` /
``set_state()``):

- ``batched_dataset(source, ...)``: fixed-length examples (``SyntheticSource``, ``synthetic_tfds_source``, any
  random-access source of ``inputs/targets/loss_mask`` dicts). Shuffling is a seeded global permutation, reshuffled
  every epoch. Sharding is by global batch: process p gets rows ``[p·B_local, (p+1)·B_local)`` of every global batch,
  so concatenating the process batches in process order gives exactly the single-process batch.
  ``drop_remainder=False`` (eval) pads the last global batch with examples whose ``loss_mask`` is all False and
  ``segment_ids`` 0, so every batch has one shape and every process the same number of batches.
- ``packed_text_dataset(documents, ...)``: training on text; documents are shuffled, sharded per process (process
  p takes every P-th document of the shuffled, repeated stream, so one epoch is partitioned between processes),
  tokenized and packed by the streaming packer of ``packing.py``. Processes pack independently, so unlike
  ``batched_dataset`` the global batch depends on the process count.
- ``packed_text_eval_dataset(documents, ...)``: one pass, unshuffled; the packing layout is computed up front, rows are
  sharded and padded like ``batched_dataset(drop_remainder=False)``, so processes stay in step.
- ``synthetic_datasets(task, ...)``: the train and eval datasets of a synthetic task in one call.

Checkpointing the iterator (grain 0.2.18, orbax-checkpoint 0.12.8; each process writes its own
``process_<i>-of-<n>.json``)::

    ocp.args.Composite(state=ocp.args.StandardSave(...), data=grain.checkpoint.CheckpointSave(train_iter))
    ocp.args.Composite(state=ocp.args.StandardRestore(...), data=grain.checkpoint.CheckpointRestore(fresh_iter))

where ``fresh_iter = iter(<the same pipeline>)``; the restored iterator continues exactly. ``worker_count > 0`` runs
grain worker processes (``mp_prefetch``); grain reads absl flags there, so the program must run under ``absl.app.run``
or call ``absl.flags.FLAGS.mark_as_parsed()`` first, behind an ``if __name__ == "__main__"`` guard (otherwise
``UnparsedFlagAccessError``). Tests use ``worker_count=0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, SupportsIndex

import grain
import numpy as np

from lcjax.checks import check_token_ids, require, require_bool, require_int, require_optional_int
from lcjax.data import packing
from lcjax.data.synthetic import SyntheticSource, TaskConfig
from lcjax.data.text import ByteTokenizer
from lcjax.data.tokenizers import Tokenizer

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def default_read_options() -> grain.ReadOptions:
    """Two prefetch threads, a few batches ahead (grain's default of 16 threads x 500 elements is for big hosts)."""
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _processes(fn: str, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_count = require_int(f"{fn}: process_count", process_count, min=1)
    process_index = require_int(f"{fn}: process_index", process_index, min=0)
    require(process_index < process_count,
            f"{fn}: process_index={process_index} must be < process_count={process_count}")  # fmt: skip
    return process_index, process_count


def _local_batch_size(fn: str, global_batch_size: int, process_count: int) -> int:
    require_int(f"{fn}: global_batch_size", global_batch_size, min=1)
    require(
        global_batch_size % process_count == 0,
        f"{fn}: global_batch_size={global_batch_size} must be divisible by process_count={process_count}",
    )
    return global_batch_size // process_count


def _check_run(fn: str, *, seed: int, num_epochs: int | None, worker_count: int) -> None:
    """The arguments every training pipeline takes: seed >= 0, num_epochs None or >= 1, worker_count >= 0."""
    require_int(f"{fn}: seed", seed, min=0)
    require_optional_int(f"{fn}: num_epochs", num_epochs, min=1)
    require_int(f"{fn}: worker_count", worker_count, min=0)
    if worker_count:
        from absl import flags

        require(flags.FLAGS.is_parsed(),
                f"{fn}: worker_count={worker_count} starts grain worker processes, which read absl flags: run under "
                "absl.app.run or call absl.flags.FLAGS.mark_as_parsed() first (or use worker_count=0)")  # fmt: skip


def _finish(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    if worker_count:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_exit_with_parent)
    return ds


def _exit_with_parent(worker_index: int, worker_count: int, *, poll_s: float = 0.5) -> None:
    """grain worker init: a daemon thread ends this worker once its parent (the trainer) is gone.

    grain's workers are ``daemon`` processes, which Python stops only when the parent exits normally; after a
    SIGKILL of the trainer they would live on (about 260 MB each), re-parented to init. ``prctl(PR_SET_PDEATHSIG)``
    would fire when the parent *thread* that started the worker ends (grain starts them from its own threads), so
    the worker polls ``os.getppid()`` instead and exits as soon as it changes.
    """
    import os
    import threading
    import time

    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="lcjax-exit-with-parent", daemon=True).start()


def _as_batch_features(example: dict[str, Any], vocab_size: int | None = None) -> dict[str, np.ndarray]:
    inputs, targets = np.asarray(example["inputs"]), np.asarray(example["targets"])
    loss_mask = np.asarray(example["loss_mask"])
    require(inputs.ndim == 1, f"batched_dataset: examples must have 1-D inputs, got shape {inputs.shape}")
    require(targets.shape == inputs.shape and loss_mask.shape == inputs.shape,
            f"batched_dataset: an example's inputs {inputs.shape}, targets {targets.shape} and loss_mask "
            f"{loss_mask.shape} must have one shape")  # fmt: skip
    if vocab_size is not None:
        check_token_ids("batched_dataset: inputs", inputs, vocab_size)
        check_token_ids("batched_dataset: targets", targets, vocab_size)
    L = inputs.shape[0]
    return dict(
        inputs=inputs.astype(np.int32),
        targets=targets.astype(np.int32),
        loss_mask=loss_mask.astype(bool),
        segment_ids=np.ones(L, np.int32),
        positions=np.arange(L, dtype=np.int32),
    )


class _PadToLength(grain.MapDataset):
    """``parent`` followed by copies of ``pad`` up to ``length`` elements."""

    def __init__(self, parent: grain.MapDataset, length: int, pad: dict[str, np.ndarray]):
        super().__init__(parent)
        self._length, self._pad, self._parent_length = length, pad, len(parent)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: SupportsIndex | slice):
        if isinstance(index, slice):
            return self.slice(index)
        i = int(index)
        if i >= self._length:
            raise IndexError(f"index {i} out of range [0, {self._length})")
        if i < self._parent_length:
            return self._parent[i]
        return {k: v.copy() for k, v in self._pad.items()}

    def __str__(self) -> str:
        return f"_PadToLength(length={self._length})"


def _padding_like(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    pad = {k: np.zeros_like(v) for k, v in row.items()}
    pad["inputs"][:] = pad_id
    pad["targets"][:] = pad_id
    return pad


def _batch_and_shard(
    ds: grain.MapDataset, *, global_batch_size: int, process_index: int, process_count: int, drop_remainder: bool,
    pad_id: int, finite: bool,
) -> grain.MapDataset:
    """Global batches of consecutive rows; process p keeps rows [p·B_local, (p+1)·B_local) of each."""
    local = global_batch_size // process_count  # checked by the caller
    n = len(ds)
    if finite:  # whole global batches only
        if drop_remainder:
            require(
                n >= global_batch_size,
                f"the dataset has {n} rows, fewer than global_batch_size={global_batch_size} "
                "(with drop_remainder=True no batch would be produced)",
            )
            ds = ds[: n - n % global_batch_size]
        elif n % global_batch_size:
            ds = _PadToLength(ds, math.ceil(n / global_batch_size) * global_batch_size, _padding_like(ds[0], pad_id))
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def batched_dataset(
    source: Any,
    *,
    global_batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
    vocab_size: int | None = None,
) -> grain.IterDataset:
    """Batches of fixed-length examples from a random-access ``source`` (module docstring for keys and sharding).

    ``num_epochs=None`` repeats forever. ``drop_remainder=True`` drops the last partial global batch of a finite
    run; ``False`` pads it instead. ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``. With ``vocab_size`` every example's ``inputs`` and ``targets`` are checked to lie in
    ``[0, vocab_size)`` as they are read (``ValueError`` naming them otherwise).
    """
    fn = "batched_dataset"
    process_index, process_count = _processes(fn, process_index, process_count)
    _local_batch_size(fn, global_batch_size, process_count)
    _check_run(fn, seed=seed, num_epochs=num_epochs, worker_count=worker_count)
    require_bool(f"{fn}: shuffle", shuffle)
    require_bool(f"{fn}: drop_remainder", drop_remainder)
    vocab_size = require_optional_int(f"{fn}: vocab_size", vocab_size, min=1)
    require(len(source) > 0, f"{fn}: source is empty")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(_as_batch_features, vocab_size=vocab_size))
    ds = _batch_and_shard(
        ds, global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, pad_id=0, finite=num_epochs is not None,
    )
    return _finish(ds.to_iter_dataset(read_options or default_read_options()), worker_count)


def _tokenize(tokenizer: Tokenizer, document: Any) -> np.ndarray:
    ids = tokenizer.encode(document)
    check_token_ids(f"{type(tokenizer).__name__}.encode", ids, tokenizer.vocab_size)
    return ids


def packed_text_dataset(
    documents: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    tokenizer: Tokenizer = ByteTokenizer(),
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Packed training rows of ``seq_len`` from a random-access source of documents (``str`` / ``bytes``).

    Documents are shuffled (a new permutation each epoch), sharded per process, tokenized (``tokenizer.encode``,
    any ``lcjax.data.tokenizers.Tokenizer``; the default gives ``[BOS] bytes [EOS]``) and packed (``packing.py``: long
    documents split into explicit ``seq_len`` pieces).
    Only whole local batches are produced; the rows of a finite run that do not fill one are dropped. Token ids
    are checked against ``tokenizer.vocab_size`` as documents are tokenized.
    """
    fn = "packed_text_dataset"
    process_index, process_count = _processes(fn, process_index, process_count)
    local = _local_batch_size(fn, global_batch_size, process_count)
    require_int(f"{fn}: seq_len", seq_len, min=1)
    _check_run(fn, seed=seed, num_epochs=num_epochs, worker_count=worker_count)
    require_bool(f"{fn}: shuffle", shuffle)
    require(len(documents) >= process_count,
            f"{fn}: documents has {len(documents)} documents, fewer than process_count={process_count}")  # fmt: skip
    ds = grain.MapDataset.source(documents)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count].map(functools.partial(_tokenize, tokenizer))
    ds = ds.to_iter_dataset(read_options or default_read_options())
    ds = packing.PackIterDataset(ds, seq_len=seq_len, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    ds = ds.batch(local, drop_remainder=True)
    return _finish(ds, worker_count)


def packed_text_eval_dataset(
    documents: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    tokenizer: Tokenizer = ByteTokenizer(),
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """One unshuffled pass over ``documents`` as packed rows; every row is kept (the last batch is padded)."""
    fn = "packed_text_eval_dataset"
    process_index, process_count = _processes(fn, process_index, process_count)
    _local_batch_size(fn, global_batch_size, process_count)
    require_int(f"{fn}: seq_len", seq_len, min=1)
    rows = packing.PackedRows(documents, functools.partial(_tokenize, tokenizer), seq_len=seq_len,
                              pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)  # fmt: skip
    require(len(rows) > 0, f"{fn}: documents hold no (input, target) pair to evaluate")
    ds = _batch_and_shard(
        grain.MapDataset.source(rows), global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, drop_remainder=False, pad_id=tokenizer.pad_id, finite=True,
    )
    return ds.to_iter_dataset(read_options or default_read_options())


def synthetic_datasets(
    task: TaskConfig,
    *,
    global_batch_size: int,
    eval_batch_size: int | None = None,
    num_train: int = 100_000,
    num_validation: int = 3_000,
    seed: int = 0,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
) -> tuple[grain.IterDataset, grain.IterDataset]:
    """``(train, eval)`` for a synthetic task: train shuffled (seed ``seed``), repeated forever, whole batches;
    eval one unshuffled pass over the validation split, padded to whole batches of ``eval_batch_size`` (default:
    ``global_batch_size``). With ``data_dir`` the splits come from the TFDS dataset prepared there (prepared on
    first use; in a multi-host run call ``tfds_builders.prepare_synthetic`` once beforehand rather than letting every
    process prepare into one shared directory); without it they are generated in memory. Both give the same
    examples.
    """
    if data_dir is None:
        train_src = SyntheticSource(task, split="train", num_examples=num_train, seed=seed)
        eval_src = SyntheticSource(task, split="validation", num_examples=num_validation, seed=seed)
    else:
        from lcjax.data import tfds_builders

        sizes = dict(data_dir=data_dir, num_train=num_train, num_validation=num_validation, seed=seed)
        train_src = tfds_builders.synthetic_tfds_source(task, split="train", **sizes)
        eval_src = tfds_builders.synthetic_tfds_source(task, split="validation", **sizes)
    common = dict(process_index=process_index, process_count=process_count, worker_count=worker_count,
                  vocab_size=task.vocab_size)  # fmt: skip
    train = batched_dataset(
        train_src, global_batch_size=global_batch_size, shuffle=True, seed=seed, num_epochs=None, **common
    )
    eval_ = batched_dataset(
        eval_src, global_batch_size=global_batch_size if eval_batch_size is None else eval_batch_size, shuffle=False,
        num_epochs=1,
        drop_remainder=False, **common,
    )
    return train, eval_
