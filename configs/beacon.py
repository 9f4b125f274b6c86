"""Activation Beacon on synthetic passkey retrieval, sized for a CPU (https://arxiv.org/abs/2401.03462).

A base Llama-style LM is pretrained with full attention on short passkey sequences (its "trained window",
``model.max_seq_len``), or converted from a local HF Llama checkpoint (``base=hf_dir,hf_dir=PATH``). Beacons are
added (projections copied from the base, embedding from token ``beacon.embed_init``), only the beacon parameters
are trained on longer sequences with a per-window ratio mix, and passkey accuracy is measured at every
``eval.lengths`` for the base alone (full attention beyond its window) and with beacons at every ``eval.ratios``.
The study that runs it and reports the numbers is ``experiments/beacon/passkey.py``::

    .venv/bin/python experiments/beacon/passkey.py                  # configs/beacon.py, ~15 min on 2 cores
    .venv/bin/python experiments/beacon/passkey.py --quick          # configs/beacon.py:smoke, seconds

Variant keys: ``smoke``, ``scheme`` (interleave | step_expansion), ``window``, ``steps`` (beacon training steps),
``base_steps``, ``seq`` (beacon training length), ``digits`` (passkey digits; default 1, a clean single-token
retrieval; with more digits a 2-layer model's beacons recover which digits but hardly their order, see the
experiment README), ``base`` (train | hf_dir) and ``hf_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lcjax.checks import require
from lcjax.layers.beacon import BeaconConfig
from lcjax.models.lm import LMConfig
from lcjax.train.config_io import check_fields, opt, parse_arg

DEFAULT = dict(window=32, steps=500, base_steps=1500, seq=128, digits=1)
SMOKE = dict(window=8, steps=3, base_steps=3, seq=32, digits=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Base:
    """The base LM: pretrained (``source="train"``) for ``steps`` of AdamW on ``seq_len``-token passkey rows drawn
    from ``num_train`` examples, or converted from the HF Llama checkpoint in ``hf_dir`` (``source="hf_dir"``)."""

    source: str = opt("train", choices=("train", "hf_dir"))
    hf_dir: str = ""
    seq_len: int = opt(min=1)
    steps: int = opt(min=1)
    batch_size: int = opt(min=1)
    lr: float = opt(min=0.0)
    weight_decay: float = opt(min=0.0)
    num_train: int = opt(min=1)

    def __post_init__(self):
        check_fields(self, "config.base")
        require(self.source != "hf_dir" or bool(self.hf_dir), "config.base.hf_dir: required with source='hf_dir'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Data:
    """The passkey task (``lcjax.data.PasskeyConfig`` fields but ``seq_len``) and the beacon-training rows."""

    task_args: Mapping[str, Any]
    seq_len: int = opt(min=1)
    num_train: int = opt(min=1)

    def __post_init__(self):
        check_fields(self, "config.data")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train:
    """Beacon training: ``steps`` of AdamW on the beacon parameters only."""

    steps: int = opt(min=1)
    batch_size: int = opt(min=1)
    lr: float = opt(min=0.0)
    weight_decay: float = opt(min=0.0)

    def __post_init__(self):
        check_fields(self, "config.train")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eval:
    """Teacher-forced passkey accuracy at every length x compression ratio, on ``num_examples`` test examples."""

    lengths: tuple[int, ...]
    ratios: tuple[int, ...]
    num_examples: int = opt(min=1)
    batch_size: int = opt(min=1)

    def __post_init__(self):
        check_fields(self, "config.eval")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeaconStudy:
    """The whole study: the base LM's config (``max_seq_len`` is its trained window), its beacons and the stages."""

    seed: int = opt(0, min=0)
    model: LMConfig
    base: Base
    beacon: BeaconConfig
    data: Data
    train: Train
    eval: Eval

    def __post_init__(self):
        check_fields(self, "config")


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, scheme="interleave", window=0, steps=0, base_steps=0, seq=0, digits=0,
                  base="train", hf_dir="")  # fmt: skip
    for key, default in (SMOKE if a.smoke else DEFAULT).items():
        if not a[key]:
            a[key] = default
    base_window = 16 if a.smoke else 64
    return BeaconStudy(
        model=LMConfig(vocab_size=32, d_model=16 if a.smoke else 64, n_layers=2, n_heads=4, n_kv_heads=2,
                       mlp_dim=32 if a.smoke else 128, max_seq_len=base_window, attn_impl="reference"),  # fmt: skip
        base=Base(source=a.base, hf_dir=a.hf_dir, seq_len=base_window, steps=a.base_steps,
                  batch_size=8 if a.smoke else 32, lr=3e-3, weight_decay=0.1, num_train=64 if a.smoke else 100_000),
        # embed_init 11 = the first filler id (the passkey task has no eos).
        beacon=BeaconConfig(window=a.window, ratio=2 if a.smoke else 4, train_ratios=(2, 4) if a.smoke else (2, 4, 8),
                            ratio_mix="step_random", scheme=a.scheme, beacon_params=("q", "k", "v"), sink_size=0,
                            embed_init=11),  # fmt: skip
        data=Data(task_args=dict(num_digits=a.digits, vocab_size=32, filler="random"), seq_len=a.seq,
                  num_train=64 if a.smoke else 100_000),  # fmt: skip
        train=Train(steps=a.steps, batch_size=4 if a.smoke else 16, lr=3e-3, weight_decay=0.0),
        eval=Eval(lengths=(16, 32) if a.smoke else (64, 128, 256, 512, 1024), ratios=(2,) if a.smoke else (2, 4, 8),
                  num_examples=8 if a.smoke else 128, batch_size=8 if a.smoke else 64),  # fmt: skip
    )
