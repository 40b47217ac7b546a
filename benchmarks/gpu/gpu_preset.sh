#!/usr/bin/env bash
# params/gpu.yaml end to end on one GPU (issue 25): train (at most 10 minutes, stopped earlier by
# train.patience), evaluate on the whole test split, then print every figure the issue names beside
# its target (benchmarks/gpu/gpu_preset_figures.py), in about 12 minutes.
#
# Prepare on any machine (a CPU is enough: 19 s on 2 cores once the archives are cached), in a checkout:
#   python -m pipeline.params apply params/gpu.yaml
#   python -m pipeline.collect && python -m pipeline.clean && python -m pipeline.tokenize
# then, on the GPU machine, with data/tokens, data/clean/{train,val,test}.jsonl, data/raw/manifest.json
# and metrics/tokenize.json beside the code (about 60 MB):
#   bash benchmarks/gpu/gpu_preset.sh          # OUT=folder: metrics/ and the logs copied there
# PREPARE=1 runs those three stages here first (needs PyPI), so the times cover the whole pipeline from
# raw data (issue 25: at most 15 minutes); SKIP_TRAIN=1 evaluates the model already in data/model;
# BASELINE=file names the CPU default's metrics/eval.json (default: the committed one, from git).
# CPU_SMOKE=1 lets it run without CUDA: a smoke test of this script, with a tiny overlay on the preset.
#
# Needs no DVC (without dvclive, train writes its curves with pipeline.training.curves' TsvLive) and
# takes the torch that is installed (a CUDA build, any version >= 2.4): it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
grep -q "name: milton" params.yaml || {
    echo "error: params.yaml is not params/gpu.yaml applied (python -m pipeline.params apply params/gpu.yaml)" >&2
    exit 2
}
python - <<'EOF'
import os
import sys
import torch
if not torch.cuda.is_available() and os.environ.get("CPU_SMOKE") != "1":
    sys.exit("error: no CUDA device; params/gpu.yaml is sized for one GPU (an H200)")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU_SMOKE=1)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# The CPU default's eval.json, for val bits/byte beside it: the committed one (not this preset's)
baseline=${BASELINE:-$logs/cpu_default_eval.json}
[ -n "${BASELINE:-}" ] || git show HEAD:metrics/eval.json >"$baseline" 2>/dev/null || rm -f "$baseline"
if [ -f "$baseline" ] && grep -q '"milton"' "$baseline"; then
    echo "note: $baseline is this preset's evaluation, not the CPU default's: no baseline"
    baseline=""
fi

stage() {  # python -m pipeline.$1, its output kept in a log, the lines matching $2 shown as they come
    local rc=0
    python -m "pipeline.$1" 2>&1 | tee "$logs/$1.log" | { grep --line-buffered -E "$2|^error" || true; } || rc=$?
    [ "$rc" = 0 ] || { echo "error: $1 failed (exit $rc); its last lines:" >&2; tail -5 "$logs/$1.log" >&2; exit 1; }
}
start=$(date +%s)
if [ "${PREPARE:-0}" = 1 ]; then
    stage collect "^collect: "
    stage clean "^clean: "
    stage tokenize "^tokenize: "
fi
for f in data/tokens/train.bin data/clean/train.jsonl data/clean/val.jsonl data/clean/test.jsonl \
    data/raw/manifest.json metrics/tokenize.json; do
    [ -f "$f" ] || { echo "error: $f missing; prepare it first (see the top of this file)" >&2; exit 2; }
done
prepared=$(date +%s)
[ "${SKIP_TRAIN:-0}" = 1 ] || stage train "^train: |^step "
trained=$(date +%s)
stage evaluate "^evaluate: "
done_at=$(date +%s)

echo "== params/gpu.yaml: every figure of issue 25"
python benchmarks/gpu/gpu_preset_figures.py ${baseline:+--baseline "$baseline"}
echo "evaluate, seconds per part: $(tr -d '\n ' <metrics/timing/evaluate.json)"
total=$((done_at - start))
echo "FIGURE seconds: prepare $((prepared - start)), train $((trained - prepared)), evaluate $((done_at - trained));" \
    "total $total (target: this script within 720 s$([ "${PREPARE:-0}" = 1 ] && echo ", the whole pipeline within 900 s"))"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp -r metrics "$logs"/*.log "$OUT/"
fi
