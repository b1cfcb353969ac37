#!/usr/bin/env bash
# Runs one training command on every host of a Cloud TPU VM pod slice (same command on all
# hosts; jax.distributed discovers the topology, each host reads its own data shard).
#
#   TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh \
#     --config=configs/llava15_stage2.py:size=7b,data=/data/mix665k,stage1=gs://b/s1,clip=/ckpt/clip,llm=/ckpt/vicuna \
#     --workdir=gs://bucket/runs/llava15-7b-s2
#
# The repo must already be at $REPO on every host (e.g. `git clone` via the same --command);
# `launch/setup.sh` creates the venv there; install jax[tpu] on TPU hosts.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO="${REPO:-~/llava_jax}"
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && bash launch/setup.sh && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && \
   LLAVA_JAX_DISTRIBUTED=1 .venv/bin/python -m llava_jax.train $args"
