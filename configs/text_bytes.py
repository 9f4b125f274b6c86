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

from lcjax.data import ByteTokenizer
from lcjax.models.lm import LMConfig
from lcjax.train.config import ExperimentConfig, OptimConfig, TextDataConfig
from lcjax.train.config_io import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = dict(seq=256, d=128, layers=4, heads=4, batch=32, steps=3000, lr=2e-3)
SMOKE = dict(seq=32, d=16, layers=1, heads=2, batch=8, steps=6, lr=3e-3)


def get_config(arg=None):
    """Variant keys left at 0 take their value from ``DEFAULT`` (or ``SMOKE`` with ``smoke``)."""
    a = parse_arg(arg, **{k: type(v)(0) for k, v in DEFAULT.items()}, mesh="dp", smoke=False)
    for key, default in (SMOKE if a.smoke else DEFAULT).items():
        if not a[key]:
            a[key] = default
    return ExperimentConfig(
        model=LMConfig(vocab_size=ByteTokenizer.vocab_size, d_model=a.d, n_layers=a.layers, n_heads=a.heads,
                       mlp_dim=4 * a.d, max_seq_len=a.seq),  # fmt: skip
        data=TextDataConfig(train_files=os.path.join(ROOT, "lcjax", "**", "*.py"),
                            eval_files=os.path.join(ROOT, "tests", "*.py"), seq_len=a.seq),  # fmt: skip
        batch_size=a.batch,
        eval_batch_size=a.batch,
        num_steps=a.steps,
        optim=OptimConfig(learning_rate=a.lr, warmup_steps=min(200, a.steps // 10), b2=0.95),
        z_loss=1e-4,
        sharding=a.mesh,
        log_every=1 if a.smoke else 50,
        eval_every=3 if a.smoke else 500,
        checkpoint_every=3 if a.smoke else 500,
        eval_batches=2 if a.smoke else 20,
    )
