#!/usr/bin/env bash
# Tail the training log of host 0.
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "tail -n ${LINES:-50} lcjax/train.log"
