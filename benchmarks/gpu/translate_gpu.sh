#!/usr/bin/env bash
# params/translate-gpu.yaml on one GPU: train (at most 10 minutes) and evaluate, without DVC.
# Prepare on any machine first, in a checkout of this repository:
#   python -m pipeline.params apply params/translate-gpu.yaml
#   python -m pipeline.collect && python -m pipeline.clean && python -m pipeline.tokenize
# then, on the GPU machine, with data/tokens, data/clean/{val,test}.jsonl, data/raw/manifest.json
# and metrics/tokenize.json beside the code
# (about 25 MB; a CUDA build of torch, and dvclive, which train writes its curves with):
#   bash benchmarks/gpu/translate_gpu.sh           # OUT=folder to copy metrics/ into (default: none)
# Prints train's and evaluate's summaries: per direction, chrF and BLEU (greedy and beam) with
# their intervals, beside copying the source, and evaluate's seconds per part (metrics/timing/
# evaluate.json). Figures to reach (issue 12): en->ru test BLEU >= 15 and chrF >= 40; en->zh above
# copying the source; (issue 24) evaluate on the whole test split, default tuning, within 60 s.
# SKIP_TRAIN=1 evaluates the model already in data/model.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
grep -q "bible_en_fr" params.yaml || { echo "error: params.yaml is not params/translate-gpu.yaml applied" >&2; exit 2; }
for f in data/tokens/train.bin data/clean/val.jsonl data/clean/test.jsonl data/raw/manifest.json metrics/tokenize.json; do
    [ -f "$f" ] || { echo "error: $f missing; prepare it first (see the top of this file)" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
[ "${SKIP_TRAIN:-0}" = 1 ] || python -m pipeline.train
python -m pipeline.evaluate
grep -A7 "^Translation, " metrics/report.md
echo "evaluate, seconds per part: $(cat metrics/timing/evaluate.json | tr -d '\n ')"
if [ -n "${OUT:-}" ]; then cp -r metrics "$OUT/"; fi
