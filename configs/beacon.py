"""Activation Beacon on synthetic passkey retrieval, sized for a CPU (https://arxiv.org/abs/2401.03462).

A base Llama-style LM is pretrained here with full attention on short passkey sequences (its "trained window",
``model.max_seq_len``), or converted from a local HF Llama checkpoint (``base=hf_dir,hf_dir=PATH``). Beacons are
added (projections copied from the base, embedding from token ``beacon.embed_init``), only the beacon parameters
are trained on longer sequences with a per-window ratio mix, and passkey accuracy is measured at every
``eval.lengths`` for the base alone (full attention beyond its window) and with beacons at every ``eval.ratios``.

Run (from the repository root)::

    .venv/bin/python -m lcjax.train.beacon --config configs/beacon.py --out /tmp/beacon.json      # ~6 min, 2 cores
    .venv/bin/python -m lcjax.train.beacon --config configs/beacon.py:smoke                        # seconds
    .venv/bin/python -m lcjax.train.beacon --config configs/beacon.py:scheme=step_expansion,steps=600

Variant keys: ``smoke``, ``scheme`` (interleave | step_expansion), ``window``, ``steps`` (beacon training steps),
``base_steps``, ``seq`` (beacon training length), ``digits`` (passkey digits; default 1, a clean single-token
retrieval; with more digits a 2-layer model's beacons recover which digits but hardly their order, see the
experiment README), ``base`` (train | hf_dir) and ``hf_dir``. The experiment that reports the numbers is
``experiments/beacon/passkey.py``.
"""

import ml_collections

from lcjax.train.config import parse_arg

DEFAULT = dict(window=32, steps=500, base_steps=1500, seq=128, digits=1)
SMOKE = dict(window=8, steps=3, base_steps=3, seq=32, digits=1)


def get_config(arg=None):
    a = parse_arg(arg, smoke=False, scheme="interleave", window=0, steps=0, base_steps=0, seq=0, digits=0,
                  base="train", hf_dir="")  # fmt: skip
    for key, default in (SMOKE if a.smoke else DEFAULT).items():
        if not a[key]:
            a[key] = default
    base_window = 16 if a.smoke else 64

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.log_every = 1 if a.smoke else 100
    # The base LM (LMConfig fields); max_seq_len is the window it is trained on.
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32, d_model=16 if a.smoke else 64, n_layers=2, n_heads=4, n_kv_heads=2,
        mlp_dim=32 if a.smoke else 128, max_seq_len=base_window, attn_impl="reference", dtype="float32",
    ))  # fmt: skip
    c.base = ml_collections.ConfigDict(dict(
        source=a.base, hf_dir=a.hf_dir, seq_len=base_window, steps=a.base_steps, batch_size=8 if a.smoke else 32,
        lr=3e-3, weight_decay=0.1, num_train=64 if a.smoke else 100_000,
    ))  # fmt: skip
    # BeaconConfig fields. embed_init 11 = the first filler id (the passkey task has no eos).
    c.beacon = ml_collections.ConfigDict(dict(
        window=a.window, ratio=4 if not a.smoke else 2, train_ratios=[2, 4, 8] if not a.smoke else [2, 4],
        ratio_mix="step_random", scheme=a.scheme, beacon_params=["q", "k", "v"], sink_size=0, embed_init=11,
    ))  # fmt: skip
    # Passkey task (lcjax.data.PasskeyConfig without seq_len) and the beacon-training length.
    c.data = ml_collections.ConfigDict(dict(
        task_args=dict(num_digits=a.digits, vocab_size=32, filler="random"), seq_len=a.seq,
        num_train=64 if a.smoke else 100_000,
    ))  # fmt: skip
    c.train = ml_collections.ConfigDict(dict(
        steps=a.steps, batch_size=4 if a.smoke else 16, lr=3e-3, weight_decay=0.0,
    ))  # fmt: skip
    c.eval = ml_collections.ConfigDict(dict(
        lengths=[16, 32] if a.smoke else [64, 128, 256, 512, 1024], ratios=[2] if a.smoke else [2, 4, 8],
        num_examples=8 if a.smoke else 128, batch_size=8 if a.smoke else 64,
    ))  # fmt: skip
    return c
