#!/usr/bin/env bash
# Runs one job on this machine, one process (CPU, or every local GPU/TPU JAX finds).
#   launch/local.sh JOB CONFIG[:ARGS] WORKDIR [--config.x=y ...]
# e.g. launch/local.sh prepare configs/shapes.py:size=tiny runs/shapes
set -euo pipefail
job=${1:?job (prepare, preview, train_dvae, train, sample, ...)}
config=${2:?config file[:args]}
workdir=${3:?workdir}
shift 3
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
mapfile -d '' args < <(main_args "$job" "$config" "$workdir" "$@")
run "$py" "${args[@]}"
