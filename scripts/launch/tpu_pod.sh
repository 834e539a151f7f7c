#!/bin/bash
# Training on a Cloud TPU pod slice: the same command runs on every TPU VM host, and
# jax.distributed.initialize() discovers the slice's topology itself.
#
#   TPU=my-v5p-64 ZONE=us-east5-a SHARED=/mnt/shared \
#     bash scripts/launch/tpu_pod.sh configs/llama_7b.py --config.mesh.fsdp=-1
#
# SHARED must be a folder every host mounts (a Filestore NFS share or a gcsfuse mount of
# a bucket): the run folder lives there, since every host writes its checkpoint shards.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG [--config.KEY=VALUE ...]}
shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${SHARED:?set SHARED}"
NAME=$(basename "$CONFIG" .py)

# Copy the code to every host and install it (jax[tpu] brings libtpu).
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" . "$TPU":~/lm
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --command="
  cd ~/lm && pip install -q -U 'jax[tpu]' -e . &&
  python scripts/train.py --config=$CONFIG --config.workdir=$SHARED/runs/$NAME $*"
