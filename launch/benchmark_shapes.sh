#!/usr/bin/env bash
# The `shapes` quality table in one command, on CPU.
#   launch/benchmark_shapes.sh [WORKDIR] [SEED ...]     (default: runs/demo, seeds 0 1)
# Seed 0 is the demo itself (launch/demo.sh WORKDIR, each stage skipped when done); every
# other seed S trains its own transformer and scorer in WORKDIR/seedS (same dVAE, tokens
# and BPE; --config.seed=S --config.data.seed=S). Then --job=evaluate measures the dVAE
# (reconstruction) and each seed's transformer: validation loss, caption match of every
# caption of both evaluation splits (single samples, best of 16 guided candidates reranked
# by that seed's scorer, single samples guided at scale 2) and the FID of samples
# against real images. The FID uses the Inception weights of
# $DALLE_JAX_INCEPTION_WEIGHTS when set, else the scorer's image features (labelled as
# such in the table). Writes WORKDIR/benchmark/shapes.md and .json;
# each evaluation's results, pictures and JSON are in WORKDIR/benchmark/{dvae,seedS}/out.
# Environment: CAPTIONS (per split, default 1000), FID_IMAGES (default 1000).
set -euo pipefail
workdir=${1:-runs/demo}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1)
captions=${CAPTIONS:-1000}
fid_images=${FID_IMAGES:-1000}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
export DALLE_JAX_DATA_DIR=${DALLE_JAX_DATA_DIR:-$(pwd)/data}
dvae=configs/dvae_shapes.py:size=tiny
transformer=configs/transformer_shapes.py:size=tiny,tokens=$workdir/dvae/tokens
bpe=$workdir/transformer/bpe.model
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start ))s)"; }

stage "the demo pipeline (seed 0)"
"$here/demo.sh" "$workdir"

for s in "${seeds[@]}"; do
  [ "$s" = 0 ] && continue
  run=$workdir/seed$s
  stage "seed $s: train the transformer"
  "$here/local.sh" train_transformer "$transformer" "$run/transformer" "--config.seed=$s" "--config.data.seed=$s" \
    "--config.text.bpe_model=$bpe"
  stage "seed $s: train the scorer"
  "$here/local.sh" train_clip "configs/clip_shapes.py:bpe=$bpe" "$run/clip" "--config.seed=$s"
done

stage "evaluate the dVAE"
"$here/local.sh" evaluate "$dvae" "$workdir/benchmark/dvae" \
  "--config.evaluate.params=$workdir/dvae" "--config.evaluate.out_dir=$workdir/benchmark/dvae/out"
results=()
for s in "${seeds[@]}"; do
  run=$workdir; [ "$s" = 0 ] || run=$workdir/seed$s
  stage "seed $s: evaluate the transformer"
  "$here/local.sh" evaluate "$transformer" "$workdir/benchmark/seed$s" \
    "--config.evaluate.params=$run/transformer" "--config.text.bpe_model=$bpe" \
    "--config.evals.caption_match.captions=$captions" \
    "--config.evals.caption_match.scorer=$run/clip" \
    "--config.evals.fid.num_images=$fid_images" "--config.evals.fid.scorer=$run/clip" \
    "--config.evals.fid.inception_weights=${DALLE_JAX_INCEPTION_WEIGHTS:-}" \
    "--config.evaluate.out_dir=$workdir/benchmark/seed$s/out"
  results+=("$s=$workdir/benchmark/seed$s/out/results.json")
done

stage "the table"
"$py" -m dalle_jax.evals.benchmark "$workdir/benchmark/shapes" \
  "$workdir/benchmark/dvae/out/results.json" "${results[@]}"
