#!/usr/bin/env bash
# A TPU VM pod slice: runs the job on every worker (one process per host) over
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the other hosts itself.
#   launch/tpu_pod.sh TPU_NAME ZONE JOB CONFIG[:ARGS] WORKDIR [--config.x=y ...]
# e.g. launch/tpu_pod.sh my-v4-64 us-central2-b train_transformer configs/transformer_paper.py /mnt/runs/transformer
# Every worker needs this repository at REMOTE_REPO (default: dalle-jax in the home
# directory) with `make setup` done, and WORKDIR on a file system every worker shares
# (e.g. a gcsfuse or Filestore mount). Maintenance events send SIGTERM: the workers agree
# on a step, save a checkpoint there and exit 0; rerun the same command to resume.
# GCLOUD_ARGS adds flags to gcloud (e.g. "--project=p --internal-ip").
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; job=${3:?job}; config=${4:?config file[:args]}
workdir=${5:?workdir}
shift 5
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
remote_repo=${REMOTE_REPO:-dalle-jax}
# The cache lives on each worker unless JAX_COMPILATION_CACHE_DIR names a shared path.
cache=${JAX_COMPILATION_CACHE_DIR/#"$HOME"/\~}
mapfile -d '' args < <(main_args "$job" "$config" "$workdir" "$@")
remote="cd $(printf '%q' "$remote_repo") && JAX_COMPILATION_CACHE_DIR=$cache"
remote+=" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
remote+=" .venv/bin/python$(printf ' %q' "${args[@]}") --multihost=on"
read -r -a extra <<< "${GCLOUD_ARGS:-}"
run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "${extra[@]}" \
  "--command=$remote"
