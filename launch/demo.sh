#!/usr/bin/env bash
# The embedded default: the tiny pipeline on the built-in `shapes` dataset, on CPU.
#   launch/demo.sh [WORKDIR]        (default runs/demo)
# Stages: prepare the dataset -> preview the input pipeline -> train the tiny dVAE ->
# pre-encode every split into image tokens -> train the caption BPE -> train the tiny
# transformer -> train the contrastive scorer -> sample images for fixed captions, rerank
# them, and score how many match their captions (single samples, best of 16 guided
# candidates reranked, single guided samples). Every stage skips work that is already
# done, so rerunning is cheap.
set -euo pipefail
workdir=${1:-runs/demo}
here=$(cd "$(dirname "$0")" && pwd)
export DALLE_JAX_DATA_DIR=${DALLE_JAX_DATA_DIR:-$(pwd)/data}
dvae=configs/dvae_shapes.py:size=tiny
transformer=configs/transformer_shapes.py:size=tiny,tokens=$workdir/dvae/tokens
start=$(date +%s)
# Each stage's name and start time, for the summary at the end.
times=()
stage() {
  times+=("$(date +%s)" "$1")
  echo; echo "== $1 ($(( $(date +%s) - start ))s)"
}
stage "prepare the shapes dataset"
"$here/local.sh" prepare "$dvae" "$workdir/dvae"
stage "preview the input pipeline"
"$here/local.sh" preview configs/shapes.py:size=tiny "$workdir"
stage "train the tiny dVAE"
"$here/local.sh" train_dvae "$dvae" "$workdir/dvae"
stage "pre-encode the dataset into image tokens"
"$here/local.sh" encode "$dvae" "$workdir/dvae"
stage "train the caption BPE"
"$here/local.sh" train_bpe "$transformer" "$workdir/transformer"
stage "train the tiny transformer"
"$here/local.sh" train_transformer "$transformer" "$workdir/transformer"
stage "train the contrastive scorer (for reranking)"
"$here/local.sh" train_clip "configs/clip_shapes.py:bpe=$workdir/transformer/bpe.model" "$workdir/clip"
stage "sample, rerank and check the images against their captions"
"$here/local.sh" sample "$transformer" "$workdir/transformer" "--config.sample.rerank=$workdir/clip"
stage "done"
"${PYTHON:-$here/../.venv/bin/python}" - "$workdir" "${times[@]}" <<'PY'
import json, sys
w, marks = sys.argv[1], sys.argv[2:]
stages = [(marks[i + 1], int(marks[i + 2]) - int(marks[i])) for i in range(0, len(marks) - 2, 2)]
print(f"{'stage':<52}{'time':>8}")
for name, secs in stages:
    print(f"  {name:<50}{f'{secs // 60}m{secs % 60:02d}s':>8}")
total = sum(s for _, s in stages)
print(f"  {'all':<50}{f'{total // 60}m{total % 60:02d}s':>8}\n")
with open(f"{w}/transformer/samples/report.json") as f:
    match = json.load(f).get("caption_match", {})
rows = [("validation", "in-distribution objects"), ("test_compositional", "held-out objects")]
scale = next((m.get("reranked", {}).get("guidance") for m in match.values()), None)
best = "best of 16, reranked" + (f" (guided {scale:g})" if scale not in (None, 1.0) else "")
print("caption match (the shapes checker)     " + "  ".join(f"{r[1]:>24}" for r in rows))
for key, what in [("best_of_1", "single samples"), ("reranked", best),
                  ("guided", "single samples, guided"), ("dvae_reconstruction", "dVAE ceiling")]:
    vals = [match.get(split, {}).get(key, {}).get("fraction") for split, _ in rows]
    if any(v is not None for v in vals):
        print(f"  {what:<37}" + "  ".join(f"{'-' if v is None else f'{100 * v:.1f}%':>24}"
                                             for v in vals))
PY
echo "input batch:        $workdir/preview/train_batch.png"
echo "reconstructions:    $workdir/dvae/eval/recon_latest.png"
echo "metrics:            $workdir/dvae/metrics.jsonl"
echo "image tokens:       $workdir/dvae/tokens"
echo "transformer:        $workdir/transformer/metrics.jsonl"
echo "scorer:             $workdir/clip/metrics.jsonl"
echo "samples:            $workdir/transformer/samples/grid.png"
echo "caption match:      $workdir/transformer/samples/report.json"
