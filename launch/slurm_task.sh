#!/usr/bin/env bash
# One task of launch/slurm.sbatch (run by srun on every node): reads the process count,
# this process's index and the coordinator (the allocation's first node) from SLURM's
# environment and starts the job with them.
#   launch/slurm_task.sh JOB CONFIG[:ARGS] WORKDIR [--config.x=y ...]
# DALLE_JAX_PORT picks the coordinator's port (default: derived from the job id).
set -euo pipefail
job=${1:?job}; config=${2:?config file[:args]}; workdir=${3:?workdir}
shift 3
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
: "${SLURM_JOB_NODELIST:?not inside a SLURM job}" "${SLURM_NTASKS:?}" "${SLURM_PROCID:?}"

# The first host of a SLURM host list such as "gpu[003-006,9],login1" -> gpu003.
first_host() {
  local list=$1 prefix inner
  if command -v scontrol > /dev/null; then
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  prefix=${list%%[\[,]*}
  if [[ ${list:${#prefix}:1} == "[" ]]; then
    inner=${list#"$prefix"[}
    echo "$prefix${inner%%[-,\]]*}"
  else
    echo "$prefix"
  fi
}

coordinator=$(first_host "$SLURM_JOB_NODELIST"):${DALLE_JAX_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# Several tasks on a node: one GPU each.
if [[ ${SLURM_NTASKS_PER_NODE:-1} != 1 && -n ${SLURM_LOCALID:-} ]]; then
  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  launch_env+=(CUDA_VISIBLE_DEVICES)
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
launch_env+=(XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS)
mapfile -d '' args < <(main_args "$job" "$config" "$workdir" "$@")
run "$py" "${args[@]}" "--coordinator_address=$coordinator" \
  "--num_processes=$SLURM_NTASKS" "--process_id=$SLURM_PROCID"
