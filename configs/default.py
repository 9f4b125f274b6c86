"""The default job, what ``make train`` runs: ``configs/mqar.py`` with its default variant.

    python -m lcjax.train --config configs/default.py --workdir runs/default      # = make train

It trains the attention LM (2 layers, d_model 64) on MQAR with T=64, K=4, V=64 for 1500 steps of batch 32 and ends
with the held-out accuracy (0.998 for seed 0; about 2 minutes on the 2-core development machine).
The model is chosen here only (``model=...`` of ``configs/mqar.py``), so switching the default job to another block
type is a one-line change of ``VARIANT``.
"""

import os

from lcjax.train.config import load_config_file

VARIANT = "model=attention"


def get_config(arg=None):
    variant = VARIANT + ("," + arg if arg else "")
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py"), variant)
