"""Training: the one loop (``loop.train``), its objectives (``loop.NextTokenLoss``, ``beacon.BeaconLoss``), typed
experiment configs, sharded train state, checkpoints, metrics, and the run-directory services (``workdir``).

``python -m lcjax.train --config configs/mqar.py:smoke --workdir /tmp/run`` or ``lcjax train ...`` (``command.py``).
"""

from lcjax.train.checkpoint import CheckpointFallbackWarning, Checkpointer
from lcjax.train.config import ExperimentConfig, OptimConfig
from lcjax.train.config_io import load_config_file, override, parse_arg
from lcjax.train.loop import NextTokenLoss, NonFiniteError, TrainResult, train
from lcjax.train.workdir import evaluate_workdir, generate_workdir

__all__ = [
    "CheckpointFallbackWarning",
    "Checkpointer",
    "ExperimentConfig",
    "NextTokenLoss",
    "NonFiniteError",
    "OptimConfig",
    "TrainResult",
    "evaluate_workdir",
    "generate_workdir",
    "load_config_file",
    "override",
    "parse_arg",
    "train",
]
