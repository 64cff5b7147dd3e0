#!/usr/bin/env bash
# Runs one job on this machine (CPU, or the local GPUs/TPU that JAX finds).
#   launch/local.sh JOB CONFIG[:ARGS] WORKDIR [--config.x=y ...]
# e.g. launch/local.sh prepare configs/shapes.py:size=tiny runs/shapes
set -euo pipefail
job=${1:?job (prepare, preview, ...)}; config=${2:?config file[:args]}; workdir=${3:?workdir}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
exec "$py" -m dalle_jax.main --job="$job" --config="$config" --workdir="$workdir" "$@"
