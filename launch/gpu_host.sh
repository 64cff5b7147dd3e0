#!/usr/bin/env bash
# One host with several GPUs: one process drives every GPU it can see (restrict them with
# CUDA_VISIBLE_DEVICES). The config's mesh spreads over all of them, e.g.
#   launch/gpu_host.sh train_transformer configs/transformer_paper.py:runlocal runs/transformer \
#       --config.mesh.fsdp=8 --config.sharding_rules=fsdp
#   launch/gpu_host.sh JOB CONFIG[:ARGS] WORKDIR [--config.x=y ...]
set -euo pipefail
job=${1:?job}; config=${2:?config file[:args]}; workdir=${3:?workdir}
shift 3
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
# Let JAX take most of each GPU up front (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap the FSDP all-gathers and gradient reduce-scatters with compute.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
launch_env+=(XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS)
mapfile -d '' args < <(main_args "$job" "$config" "$workdir" "$@")
run "$py" "${args[@]}" --multihost=off
