# shellcheck shell=bash
# Sourced by the launch scripts: the environment every job gets, and dry runs.
#
#   JAX_COMPILATION_CACHE_DIR  persistent XLA compilation cache (default
#                              ~/.cache/dalle_jax/jax): a relaunch (preemption, requeue)
#                              skips recompiling the step. On a cluster, a directory
#                              every host can read and write.
#   PYTHON                     the interpreter (default: the repository's .venv)
#   DRY_RUN=1                  print the environment and the command instead of running it
#                              (what tests/launch_test.py checks)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dalle_jax/jax}
# Cache every program that took at least this long to compile (seconds).
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
# shellcheck disable=SC2034  # used by the scripts that source this file
py=${PYTHON:-$repo/.venv/bin/python}
# Variables a launch script sets for the job; dry runs print them.
launch_env=(JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS)

# run CMD...: runs (exec) the command, or prints it with the job's environment when
# DRY_RUN=1.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local name
    for name in "${launch_env[@]}"; do
      echo "env: $name=${!name-}"
    done
    printf 'cmd:'
    printf ' %q' "$@"
    printf '\n'
  else
    exec "$@"
  fi
}

# The entry point's arguments for JOB CONFIG WORKDIR [--config.x=y ...].
main_args() {
  local job=$1 config=$2 workdir=$3
  shift 3
  printf '%s\0' -m dalle_jax.main "--job=$job" "--config=$config" "--workdir=$workdir" "$@"
}
