"""Data: synthetic long-context tasks, TFDS builders (ArrayRecord, no TensorFlow), text, tokenizers, grain pipelines.

Batches are dicts of NumPy arrays ``inputs, targets, segment_ids, positions`` (int32 [B, L]) and ``loss_mask`` (bool
[B, L]); see ``pipeline.py``. ``segment_ids`` have lcjax's one meaning: 1, 2, ... per document (a run of equal
positive ids, never reused in a row), 0 = padding, which belongs to no document. Token ids are checked against the
vocabulary wherever a pipeline knows it. The TFDS builders live in ``lcjax.data.tfds_builders`` (imported on
demand, since it registers datasets with TFDS).
"""

from lcjax.data.packing import PackIterDataset, PackedRows, build_row, document_pieces, pack_layout
from lcjax.data.pipeline import (
    BATCH_KEYS,
    batched_dataset,
    default_read_options,
    packed_text_dataset,
    packed_text_eval_dataset,
    synthetic_datasets,
)
from lcjax.data.synthetic import (
    SPLITS,
    TASKS,
    InductionHeadsConfig,
    MQARConfig,
    PasskeyConfig,
    SelectiveCopyingConfig,
    SyntheticSource,
    TaskConfig,
    accuracy_counts,
    accuracy_from_counts,
    generate,
    make_task,
)
from lcjax.data.text import ByteTokenizer, TextFileSource, TfdsTextSource, bits_per_byte, count_bytes
from lcjax.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "SPLITS",
    "TASKS",
    "ByteTokenizer",
    "HFTokenizer",
    "InductionHeadsConfig",
    "MQARConfig",
    "PackIterDataset",
    "PackedRows",
    "PasskeyConfig",
    "SelectiveCopyingConfig",
    "SyntheticSource",
    "TaskConfig",
    "TextFileSource",
    "Tokenizer",
    "TfdsTextSource",
    "accuracy_counts",
    "accuracy_from_counts",
    "batched_dataset",
    "bits_per_byte",
    "build_row",
    "count_bytes",
    "default_read_options",
    "document_pieces",
    "generate",
    "load_tokenizer",
    "make_task",
    "pack_layout",
    "packed_text_dataset",
    "packed_text_eval_dataset",
    "synthetic_datasets",
]
