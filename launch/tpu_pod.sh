#!/usr/bin/env bash
# A Cloud TPU VM slice: the same command on every worker, started from your
# workstation with gcloud. Every worker runs one process that drives its local
# chips; JAX finds the other workers itself (roi_mae_jax.devices.distributed, mode=cluster).
#
#   export TPU_NAME=my-v5p-32 ZONE=us-east5-a            # PROJECT=... if not the default
#   launch/tpu_pod.sh setup                             # copy this checkout, install .[tpu]
#   launch/tpu_pod.sh run --config=configs/pretrain_aal3.py:adhd200 \
#       --workdir=/mnt/shared/runs/paper --config.data.shards=/mnt/shared/prepared/adhd200_2mm
#   launch/tpu_pod.sh logs                              # last lines of every worker's log
#
# WORKDIR and the shards must be on storage every worker mounts at the same
# path (Filestore NFS or a gcsfuse mount): checkpoints are written by all
# workers together. Each worker logs to ~/roi_mae_jax.log.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
remote_dir="${REMOTE_DIR:-roi_mae_jax}"
gcloud_flags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")

on_every_worker() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all --command="$1"
}

case "${1:-}" in
  setup)
    archive=$(mktemp -t roi_mae_jax.XXXXXX.tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":roi_mae_jax.tar.gz \
        "${gcloud_flags[@]}" --worker=all
    on_every_worker "mkdir -p $remote_dir && tar -xzf roi_mae_jax.tar.gz -C $remote_dir \
        && cd $remote_dir && python3 -m pip install --quiet -e '.[tpu]'"
    rm -f "$archive"
    ;;
  run)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 run --config=... --workdir=... [--config.x=y ...]" >&2; exit 2; }
    args=$(printf '%q ' "$@")
    # All workers must start the same command; a worker that fails stops the job
    # at the next collective (JAX's heartbeat), so errors show in every log.
    on_every_worker "cd $remote_dir && python3 -m roi_mae_jax.main $args \
        --config.distributed.mode=cluster 2>&1 | tee ~/roi_mae_jax.log"
    ;;
  logs)
    on_every_worker "hostname; tail -n 5 ~/roi_mae_jax.log"
    ;;
  *)
    echo "usage: $0 setup | run --config=... --workdir=... | logs   (TPU_NAME, ZONE set)" >&2
    exit 2
    ;;
esac
