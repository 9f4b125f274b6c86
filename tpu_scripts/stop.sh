#!/usr/bin/env bash
# Stop training on every host with SIGTERM (the trainer writes a checkpoint and exits), then optionally delete.
# Usage: tpu_scripts/stop.sh [--delete]
set -euo pipefail
source "$(dirname "$0")/common.sh"
tpu_ssh_all "pkill -TERM -f 'lcjax.train' || true"
if [ "${1:-}" = "--delete" ]; then
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
fi
