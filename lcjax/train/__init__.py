"""Training: the one loop (``loop.train``), typed experiment configs, sharded train state, checkpoints, metrics.

``python -m lcjax.train --config configs/mqar.py:smoke --workdir /tmp/run`` or ``lcjax train ...`` (``lcjax/cli.py``).
"""

from lcjax.train.checkpoint import CheckpointFallbackWarning, Checkpointer
from lcjax.train.config import ExperimentConfig, OptimConfig, load_config_file, parse_arg, parse_flags
from lcjax.train.loop import NonFiniteError, TrainResult, evaluate_workdir, generate_workdir, train

__all__ = [
    "CheckpointFallbackWarning",
    "Checkpointer",
    "ExperimentConfig",
    "NonFiniteError",
    "OptimConfig",
    "TrainResult",
    "evaluate_workdir",
    "generate_workdir",
    "load_config_file",
    "parse_arg",
    "parse_flags",
    "train",
]
