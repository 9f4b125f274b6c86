#!/usr/bin/env bash
# Launch one training run on every host (JAX multi-host: each host runs the same command; lcjax.distributed
# auto-detects the TPU pod, so no coordinator flags are needed).
# Usage: tpu_scripts/launch.sh configs/mqar.py:smoke [--config.num_steps=1000 ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
CONFIG="${1:?usage: launch.sh CONFIG [overrides...]}"; shift
tpu_ssh_all "cd lcjax && nohup .venv/bin/python -m lcjax.train --config $CONFIG --workdir $WORKDIR $* \
  > train.log 2>&1 &"
echo "launched on $TPU_NAME; logs: tpu_scripts/logs.sh, metrics in $WORKDIR"
