"""Byte-level language modelling on local text files (``lcjax.data.TextFileSource``, packed rows).

Run (from the repository root)::

    lcjax train --config configs/text_bytes.py --workdir runs/text \\
        --config.data.train_files='data/shakespeare/train/*.txt' --config.data.eval_files='data/shakespeare/valid/*.txt'
    lcjax train --config configs/text_bytes.py:smoke --workdir /tmp/text_smoke        # seconds; for tests
    lcjax eval --workdir runs/text                                                   # loss and bits per byte
    lcjax generate --workdir runs/text --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8

Without overrides the documents are this repository's own sources: ``lcjax/**/*.py`` to train on and
``tests/*.py`` held out (split by file, never by window), so the config runs offline as it is. Variant keys: ``seq``,
``d``, ``layers``, ``heads``, ``batch``, ``steps``, ``lr``, ``mesh``, ``smoke``.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from lcjax.train.config import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = dict(seq=256, d=128, layers=4, heads=4, batch=32, steps=3000, lr=2e-3)
SMOKE = dict(seq=32, d=16, layers=1, heads=2, batch=8, steps=6, lr=3e-3)


def get_config(arg=None):
    """Variant keys left at 0 take their value from ``DEFAULT`` (or ``SMOKE`` with ``smoke``)."""
    a = parse_arg(arg, **{k: type(v)(0) for k, v in DEFAULT.items()}, mesh="dp", smoke=False)
    for key, default in (SMOKE if a.smoke else DEFAULT).items():
        if not a[key]:
            a[key] = default

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=259, d_model=a.d, n_layers=a.layers, n_heads=a.heads, n_kv_heads=placeholder(int),
        mlp_dim=4 * a.d, block_pattern=("attention",), max_seq_len=a.seq, attn_impl="auto", dtype="float32",
        param_dtype="float32", scan_layers=False, remat=False,
    ))  # fmt: skip
    c.data = ml_collections.ConfigDict(dict(
        kind="text", train_files=os.path.join(ROOT, "lcjax", "**", "*.py"),
        eval_files=os.path.join(ROOT, "tests", "*.py"), seq_len=a.seq, separator=placeholder(str), seed=0,
        worker_count=0,
    ))  # fmt: skip
    c.batch_size = a.batch
    c.eval_batch_size = a.batch
    c.num_steps = a.steps
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=a.lr, warmup_steps=min(200, a.steps // 10), final_lr_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, grad_accum_steps=1,
    ))  # fmt: skip
    c.z_loss = 1e-4
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1, num_devices=0))
    c.sharding = a.mesh
    c.log_every = 50 if not a.smoke else 1
    c.eval_every = 500 if not a.smoke else 3
    c.checkpoint_every = 500 if not a.smoke else 3
    c.keep_checkpoints = 3
    c.eval_batches = 20 if not a.smoke else 2
    c.progress_bar = True
    c.inject_nan_at_step = 0
    c.context_layout = "contiguous"
    return c
