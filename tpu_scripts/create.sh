#!/usr/bin/env bash
# Create a TPU VM slice. Usage: TPU_NAME=lcjax ACCELERATOR=v4-32 ZONE=us-central2-b tpu_scripts/create.sh [--spot]
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
  --version "$RUNTIME" "$@"
