#!/usr/bin/env bash
# Diff-2-in-1 on a Cloud TPU pod slice: create the TPU VM, install on every worker, run the same command on all.
#   REPO=<git url> TPU_NAME=d2i ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh
# EXTRA adds config overrides, e.g. EXTRA='--config.train.batch_size=32' (global batch; a multiple of the processes).
# Checkpoints, logs and metrics go to $WORKDIR (a GCS path, shared by all workers); SD weights and NYUv2 are read
# from $SD_PATH / $DATA_ROOT (a GCS-fuse mount or a copy on each worker). jax.distributed.initialize() detects the
# workers by itself (d2i_jax/distributed.py).
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:=v4-32}" "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO:?set REPO to the git URL of d2i_jax}" "${WORKDIR:=/mnt/ckpt/d2i_nyu}"
: "${SD_PATH:=/mnt/data/stable-diffusion-v1-5}" "${DATA_ROOT:=/mnt/data/nyu}" "${CONFIG:=configs/nyu.py}"

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

ssh_all "git clone $REPO d2i_jax || (cd d2i_jax && git pull); cd d2i_jax && pip install -U 'jax[tpu]' -e ."
ssh_all "cd d2i_jax && python -m d2i_jax.main --config $CONFIG --workdir $WORKDIR \
  --config.sd_path=$SD_PATH --config.data.root=$DATA_ROOT --config.model.dtype=bfloat16 ${EXTRA:-}"
