"""The default job, what ``make train`` runs: ``configs/mqar.py`` with the Mamba-2 model.

    python -m lcjax.train --config configs/default.py --workdir runs/default      # = make train

It trains a Mamba-2 LM (2 layers, d_model 64, d_state 64, 8 heads of 16; 78k parameters) on MQAR with T=64, K=4,
V=64 for 1000 steps of batch 32 at peak learning rate 2e-2 and ends with the held-out accuracy. Measured on the
2-core development machine: held-out answer accuracy 1.000 at step 750 for seeds 0-3 (>= 0.98 at step 500);
``make train`` took 1 min 58 s on the idle machine. The Mamba-2 LM needs the high rate: at 1e-3 it stays on the
1/K plateau (0.25) for 1500 steps, at 5e-3 seed 2 is still on it at step 1000, at 1e-2 seeds 0 and 1 reach 0.999
by step 750 and seed 2 stays on it (``experiments/compare_mixers.py`` compares the mixers on this task).
The model is chosen here only (``model=...`` of ``configs/mqar.py``), so switching the default job to another block
type is a one-line change of ``VARIANT`` (``model=attention,lr=0.001,steps=1500`` was the previous default: 0.998).
"""

import os

from lcjax.train.config_io import load_config_file

VARIANT = "model=mamba2,lr=0.02,steps=1000"


def get_config(arg=None):
    variant = VARIANT + ("," + arg if arg else "")
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py"), variant)
