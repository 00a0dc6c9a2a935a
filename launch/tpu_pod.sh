#!/usr/bin/env bash
# Diff-2-in-1 on a Cloud TPU pod slice: create the TPU VM, install on every worker, run the same command on all.
#   REPO=<git url> TPU_NAME=d2i ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh
# EXTRA adds config overrides, e.g. EXTRA='--config.train.batch_size=32' (global batch; a multiple of the processes).
#   with WORKDIR=gs://bucket/runs/nyu SD_PATH=gs://bucket/sd15 DATA_ROOT=gs://bucket/nyu (required)
# Checkpoints, logs and metrics go to $WORKDIR, SD weights and NYUv2 are read from $SD_PATH / $DATA_ROOT: gs:// URLs
# (read and written through etils.epath, no shared filesystem; README "Multi-host"), or paths every worker sees.
# jax.distributed.initialize() detects the workers by itself (d2i_jax/distributed.py).
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:=v4-32}" "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO:?set REPO to the git URL of d2i_jax}" "${WORKDIR:?set WORKDIR, e.g. gs://bucket/runs/nyu}"
: "${SD_PATH:?set SD_PATH, e.g. gs://bucket/sd15}" "${DATA_ROOT:?set DATA_ROOT, e.g. gs://bucket/nyu}" "${CONFIG:=configs/nyu.py}"

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

ssh_all "git clone $REPO d2i_jax || (cd d2i_jax && git pull); cd d2i_jax && pip install -U 'jax[tpu]' -e '.[gcs]'"
ssh_all "cd d2i_jax && python -m d2i_jax.main --config $CONFIG --workdir $WORKDIR \
  --config.sd_path=$SD_PATH --config.data.root=$DATA_ROOT --config.model.dtype=bfloat16 ${EXTRA:-}"
