#!/usr/bin/env bash
# The one-GPU check of the training and sampling speed at scale: a ~0.9B-parameter model
# at the paper's sequence shape (256 text + 32x32 image slots, 16,384 + 8,192 vocabularies)
# in bfloat16. Prints one JSON line per setting: compile time, the step's compiled peak
# memory, tokens/s and MFU (FLOPs counted from the architecture, bench/transformer.py),
# then batch-1 sampling time per token against the weight-bandwidth bound.
#   bash bench/gpu_check.sh [extra bench/transformer.py flags]
set -euo pipefail
py=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
model=(--dim 2048 --depth 16 --heads 16 --dim-head 128 --text-len 256 --text-vocab 16384
       --grid 32 --image-vocab 8192 --dtype bfloat16 --steps 10 --warmup 3)
for remat in dots full; do
  "$py" bench/transformer.py "${model[@]}" --batch 16 --remat "$remat" --skip-sampling "$@"
done
"$py" bench/transformer.py "${model[@]}" --batch 8 --remat dots --sample-batch 1 --samples 2 "$@"
