#!/usr/bin/env bash
# Runs one llava_jax command on every host of a Cloud TPU VM pod slice: the same command on
# all workers, joined by jax.distributed (LLAVA_JAX_DISTRIBUTED=1: jax detects the TPU
# slice's coordinator, process count and index from the VM metadata). Each host feeds its
# own rows of every global batch (llava_jax/data/pipeline.py), so the same run can be
# resumed on a pod of another size.
#
#   TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh llava_jax.train \
#     --config=configs/llava15_stage2.py:size=7b,data=gs://my-bucket/mix665k,stage1=gs://my-bucket/runs/s1,clip=gs://my-bucket/ckpt/clip,llm=gs://my-bucket/ckpt/vicuna \
#     --workdir=gs://my-bucket/runs/llava15-7b-s2
#
# Check first that the config fits the slice (seconds to minutes, no TPU needed):
#   python -m llava_jax.compile --config=... --topology=v5e:4x8
#
# The repo must already be at $REPO on every host (e.g. `git clone` through the same
# --command). Pod hosts share no disk, so the workdir (checkpoints are written by every
# host, each its own shards), the data and the weights go in a bucket: every path takes
# gs:// (llava_jax/storage.py; README "Cloud storage"), read with the VM's service-account
# credentials. The same multi-process code path, with a gs:// workdir, is tested on one
# machine against a GCS emulator (tests/train/test_gcs.py, through tests/multiprocess.py as
# launch/local_pod.sh starts the processes).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
if [ $# -lt 1 ]; then echo "usage: TPU=... ZONE=... launch/tpu_pod.sh MODULE [ARGS...]" >&2; exit 2; fi
REPO="${REPO:-~/llava_jax}"
module="$1"; shift
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && bash launch/setup.sh && .venv/bin/pip install -q -e '.[tpu]' && \
   LLAVA_JAX_DISTRIBUTED=1 .venv/bin/python -m $module $args"
