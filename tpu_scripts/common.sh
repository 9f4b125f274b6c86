# Shared settings for the TPU scripts. Override any of them in the environment.
: "${TPU_NAME:=lcjax}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-32}"              # v4-8 is one host; v4-32 is 4 hosts
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO_URL:=https://github.com/lcjax/lcjax.git}"
: "${BRANCH:=main}"
: "${WORKDIR:=gs://YOUR_BUCKET/lcjax/runs/default}"

tpu_ssh_all() {  # run a command on every host of the pod slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
