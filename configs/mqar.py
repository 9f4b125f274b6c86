"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023, https://arxiv.org/abs/2312.04927).

Run (from the repository root)::

    python -m lcjax.train --config configs/mqar.py --workdir runs/mqar
    lcjax train --config configs/mqar.py:seq=128,pairs=8,d=128,steps=4000 --workdir runs/mqar_L128
    lcjax train --config configs/mqar.py:smoke --workdir /tmp/mqar_smoke          # seconds; for tests
    lcjax eval --workdir runs/mqar

Variant keys (``configs/mqar.py:key=value,...``): ``seq`` (sequence length T), ``pairs`` (key-value pairs K),
``vocab`` (V; keys from [1, V/2), values from [V/2, V)), ``random_filler`` (the harder Based / Mamba-2 variant),
``model`` (block type of every layer: one of ``MODELS``), ``d`` (d_model), ``layers``, ``heads``, ``batch``,
``steps``, ``lr``, ``mesh`` (a ``ShardingRules`` preset: dp, fsdp, fsdp_tp, ...) and ``smoke`` (a tiny model for a
few steps). Anything else: ``--config.<key>=<value>`` overrides, e.g. ``--config.optim.warmup_steps=50``.

Task setting of the defaults (``configs/default.py``, ``make train``, which picks ``model=mamba2,lr=0.02,steps=1000``;
see its docstring): T=64, K=4 (Zoology's smallest cell) with V=64 instead of 8192 and zero filler; loss and accuracy
at the K query positions only, accuracy = the fraction of answers right. The attention LM (2 layers, d_model 64,
2 heads, 90k parameters) at batch 32, lr 1e-3 reaches held-out accuracy >= 0.99 by step 1250 and 0.998-1.0 at step
1500 for seeds 0-3 (about 100 s of CPU time).
Vocabulary and learning rate decide the CPU budget (same model, batch 32): at V=128 accuracy is 0.40 at step 1000
and 0.80 at step 1500; at V=256 it stays at the 1/K plateau (0.25) for 800 steps (and for 2000 steps at batch 64,
lr 3e-3); at V=64 with lr 3e-3, two seeds of four escape the plateau by step 250 and two are still on it at 750.
"""

from lcjax.data import MQARConfig
from lcjax.layers.mamba2 import Mamba2Config
from lcjax.layers.monarch_mixer import M2SequenceMixerConfig
from lcjax.models.lm import LMConfig
from lcjax.train.config import ExperimentConfig, OptimConfig, SyntheticDataConfig
from lcjax.train.config_io import parse_arg

# Block type -> LMConfig fields for it, from the parsed variant ``a`` (d, heads, seq, ...). At d=64 the
# mixers have similar sizes: attention and m2 blocks carry a SwiGLU MLP of width 2d, mamba2 blocks (as upstream)
# none, their mixer being wider (expand 2).
MODELS = {
    "attention": lambda a: dict(block_pattern=("attention",), n_heads=a.heads, mlp_dim=2 * a.d, attn_impl="reference"),
    "mamba2": lambda a: dict(
        block_pattern=("mamba2",), n_heads=a.heads, mlp_dim=0,
        mixers={"mamba2": Mamba2Config(d_model=a.d, d_state=64, head_dim=16, chunk_size=min(64, a.seq))},
    ),
    "m2": lambda a: dict(
        block_pattern=("m2",), n_heads=a.heads, mlp_dim=2 * a.d,
        mixers={"m2": M2SequenceMixerConfig(d_model=a.d, l_max=a.seq)},
    ),
    "m2_monarch": lambda a: dict(
        block_pattern=("m2",), n_heads=a.heads, mlp_dim=2 * a.d,
        mixers={"m2": M2SequenceMixerConfig(d_model=a.d, l_max=a.seq, long_conv="causal_monarch")},
    ),
}


DEFAULT = dict(seq=64, pairs=4, vocab=64, d=64, layers=2, heads=2, batch=32, steps=1500, lr=1e-3)
SMOKE = dict(seq=16, pairs=2, vocab=32, d=16, layers=1, heads=2, batch=8, steps=8, lr=3e-3)


def get_config(arg=None):
    """Variant keys left at 0 take their value from ``DEFAULT`` (or ``SMOKE`` with ``smoke``)."""
    a = parse_arg(arg, **{k: type(v)(0) for k, v in DEFAULT.items()}, random_filler=False, model="attention",
                  mesh="dp", smoke=False)  # fmt: skip
    if a.model not in MODELS:
        raise ValueError(f"configs/mqar.py: model={a.model!r}; allowed: {sorted(MODELS)}")
    for key, default in (SMOKE if a.smoke else DEFAULT).items():
        if not a[key]:
            a[key] = default
    task = MQARConfig(seq_len=a.seq, num_kv_pairs=a.pairs, vocab_size=a.vocab, random_non_queries=a.random_filler)
    return ExperimentConfig(
        model=LMConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, max_seq_len=a.seq, **MODELS[a.model](a)),
        data=SyntheticDataConfig(task=task, num_train=256 if a.smoke else 100_000,
                                 num_validation=32 if a.smoke else 1_000),  # fmt: skip
        batch_size=a.batch,
        eval_batch_size=16 if a.smoke else 200,
        num_steps=a.steps,
        optim=OptimConfig(learning_rate=a.lr, warmup_steps=min(100, a.steps // 10)),
        sharding=a.mesh,
        log_every=1 if a.smoke else 50,
        eval_every=4 if a.smoke else 250,
        checkpoint_every=4 if a.smoke else 500,
    )
