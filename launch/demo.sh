#!/usr/bin/env bash
# The embedded default: the tiny pipeline on the built-in `shapes` dataset, on CPU.
# Every stage skips work that is already done, so rerunning is cheap.
#   launch/demo.sh [WORKDIR]
set -euo pipefail
workdir=${1:-runs/demo}
here=$(cd "$(dirname "$0")" && pwd)
export DALLE_JAX_DATA_DIR=${DALLE_JAX_DATA_DIR:-$(pwd)/data}
cfg=configs/shapes.py:size=tiny
"$here/local.sh" prepare "$cfg" "$workdir"
"$here/local.sh" preview "$cfg" "$workdir"
echo "demo finished: see $workdir/preview/train_batch.png"
