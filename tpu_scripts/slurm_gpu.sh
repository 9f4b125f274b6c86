#!/usr/bin/env bash
# GPU cluster launch under SLURM: one process per node, all local GPUs per process; jax.distributed auto-detects
# SLURM. Usage: sbatch --nodes=2 --gpus-per-node=8 tpu_scripts/slurm_gpu.sh configs/mqar.py:smoke WORKDIR
#SBATCH --job-name=lcjax
#SBATCH --ntasks-per-node=1
set -euo pipefail
CONFIG="${1:?usage: slurm_gpu.sh CONFIG WORKDIR [overrides...]}"; WORKDIR="${2:?workdir}"; shift 2
srun .venv/bin/python -m lcjax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
