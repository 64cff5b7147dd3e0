#!/usr/bin/env bash
# The embedded default: the tiny pipeline on the built-in `shapes` dataset, on CPU.
#   launch/demo.sh [WORKDIR]        (default runs/demo)
# Stages: prepare the dataset -> preview the input pipeline -> train the tiny dVAE ->
# pre-encode every split into image tokens -> train the caption BPE -> train the tiny
# transformer -> sample images for fixed captions and score how many match them. Every
# stage skips work that is already done, so rerunning is cheap.
set -euo pipefail
workdir=${1:-runs/demo}
here=$(cd "$(dirname "$0")" && pwd)
export DALLE_JAX_DATA_DIR=${DALLE_JAX_DATA_DIR:-$(pwd)/data}
dvae=configs/dvae_shapes.py:size=tiny
dalle=configs/dalle_shapes.py:size=tiny,tokens=$workdir/dvae/tokens
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start ))s)"; }
stage "prepare the shapes dataset"
"$here/local.sh" prepare "$dvae" "$workdir/dvae"
stage "preview the input pipeline"
"$here/local.sh" preview configs/shapes.py:size=tiny "$workdir"
stage "train the tiny dVAE"
"$here/local.sh" train_dvae "$dvae" "$workdir/dvae"
stage "pre-encode the dataset into image tokens"
"$here/local.sh" encode "$dvae" "$workdir/dvae"
stage "train the caption BPE"
"$here/local.sh" train_bpe "$dalle" "$workdir/dalle"
stage "train the tiny transformer"
"$here/local.sh" train "$dalle" "$workdir/dalle"
stage "sample images and check them against their captions"
"$here/local.sh" sample "$dalle" "$workdir/dalle"
stage "done"
echo "input batch:        $workdir/preview/train_batch.png"
echo "reconstructions:    $workdir/dvae/eval/recon_latest.png"
echo "metrics:            $workdir/dvae/metrics.jsonl"
echo "image tokens:       $workdir/dvae/tokens"
echo "transformer:        $workdir/dalle/metrics.jsonl"
echo "samples:            $workdir/dalle/samples/grid.png"
echo "caption match:      $workdir/dalle/samples/report.json"
