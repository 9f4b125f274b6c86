#!/usr/bin/env bash
# Install lcjax with TPU JAX on every host of the slice (idempotent).
set -euo pipefail
source "$(dirname "$0")/common.sh"
tpu_ssh_all "set -e
  [ -d lcjax ] || git clone --branch $BRANCH $REPO_URL lcjax
  cd lcjax && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
