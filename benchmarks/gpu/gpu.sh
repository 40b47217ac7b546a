#!/usr/bin/env bash
# The CUDA path on one NVIDIA GPU, in one run of about 5 minutes (issue 10):
# 1. the flash attention kernel runs, forward and backward;
# 2. training speed of the GPT-2 small shape (12 layers, 768 wide, 12 heads, context 1024,
#    vocabulary 50,304, no bias, GPT-2's block, fused AdamW, bf16 autocast, TF32, clipping):
#    tokens/s, MFU against the data sheet's bf16 peak and against the bf16 matmul rate measured
#    in the same run, and peak memory, eager and compiled at micro-batches 16 and 64, compiled
#    with cuDNN's attention (train.attention: cudnn) instead of flash, with Liger-Kernel's fused
#    linear cross-entropy (train.fused_loss: liger) where it is installed (pip install -e ".[gpu]"),
#    and the chunked output layer (the CPU's) eager at 16 for comparison; then every variant in one
#    table, its MFU against the data sheet's peak and against the highest bf16 matmul rate measured
#    in this run;
# 3. the real stages on CUDA with params.yaml's model (short): `python -m pipeline.train`
#    stopped by SIGTERM after a checkpoint, resumed to the end, then `python -m pipeline.evaluate`.
#
#   bash benchmarks/gpu/gpu.sh          # OUT=folder: the log, train.json, eval.json, report.md copied there
#
# Needs only this folder, a CUDA build of torch, the packages the stages import (no DVC: without
# dvclive the curves are written by pipeline.training.curves' TsvLive) and the default data/tokens; step 3
# also data/clean/{train,val,test}.jsonl, data/raw/manifest.json and metrics/tokenize.json (dvc repro
# tokenize writes them all). Reference figures (issue 10, one H200): nanoGPT's GPT-2 step reached
# 473k tokens/s compiled at micro-batch 16 and 500k at 64; targets: >= 500k at 16, >= 575k at some
# micro-batch up to 64.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${STEPS:-30}
GPT2="--n-layer 12 --n-embd 768 --n-head 12 --block-size 1024 --vocab 50304 --gpt2-block --optimizer adamw"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python - <<'EOF'
# Which attention kernel runs: the flash kernel must, in the forward and the backward pass.
import sys
import torch
from pipeline.model.model import build_model
from pipeline.core.params import ModelConfig as Model
from pipeline.training.hardware import CudaAutocast

if not torch.cuda.is_available():
    sys.exit("error: no CUDA device; this script measures a GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
model = build_model(Model(n_layer=2, n_head=12, n_embd=768, block_size=1024), 50304).cuda()
x = torch.randint(50304, (2, 1024), device="cuda")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    with CudaAutocast():
        loss = model(x, x, return_logits=False)[1]
    loss.backward()
    torch.cuda.synchronize()
kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower()})
print("flash attention kernels:", kernels[:4])
if not kernels:
    sys.exit("error: the flash attention kernel did not run")
EOF

echo "== training speed, GPT-2 small shape"
speed=$(mktemp)
# each part within its own time limit, so that a slow compilation cannot starve the stages
# shellcheck disable=SC2086
timeout 240 python benchmarks/speed/train_throughput.py $GPT2 --batch-size 16 64 --compile both --steps "$STEPS" \
    --warmup 5 | tee -a "$speed" || echo "error: the GPT-2 small measurement failed or ran past 240 s"
# shellcheck disable=SC2086
timeout 120 python benchmarks/speed/train_throughput.py $GPT2 --attention cudnn --batch-size 16 64 --compile compiled \
    --steps "$STEPS" --warmup 5 | tee -a "$speed" || echo "error: the cuDNN attention measurement failed or ran past 120 s"
if python -c "import liger_kernel.transformers.fused_linear_cross_entropy" 2>/dev/null; then
    # train.fused_loss: liger (the [gpu] extra), eager and compiled
    # shellcheck disable=SC2086
    timeout 240 python benchmarks/speed/train_throughput.py $GPT2 --loss liger --batch-size 16 64 --compile both \
        --steps "$STEPS" --warmup 5 | tee -a "$speed" || echo "error: the Liger fused-loss measurement failed or ran past 240 s"
else
    echo "no train.fused_loss: liger variant: Liger-Kernel is not importable here (pip install -e \".[gpu]\")"
fi
# shellcheck disable=SC2086
timeout 45 python benchmarks/speed/train_throughput.py $GPT2 --batch-size 16 --compile eager --loss chunked \
    --steps "$STEPS" --warmup 3 | tee -a "$speed" || echo "error: the chunked-loss measurement failed or ran past 45 s"
python - "$speed" <<'EOF'
# Every variant measured above, against the data sheet's peak and the highest bf16 matmul rate of this run
import json
import sys

rows = [json.loads(line.split(" ", 1)[1]) for line in open(sys.argv[1]) if line.startswith("RESULT_JSON ")]
if rows:
    rate = max(r for row in rows for r in row["measured"])
    sheet = rows[0]["sheet"]
    print(f"== every variant: MFU against the data sheet's {sheet / 1e12:.0f} TFLOP/s (bf16 dense) and against")
    print(f"   the {rate / 1e12:.0f} TFLOP/s of bf16 matmul measured in this run (the highest of its measurements)")
    for r in rows:
        flops = r["flops_per_token"] * r["tokens_per_second"]
        print(
            f"SPEED {r['variant']:<38} batch {r['batch']:>3}: {r['tokens_per_second']:>9,.0f} tokens/s, "
            f"MFU {flops / sheet:6.1%} (data sheet), {flops / rate:6.1%} (measured)"
        )
else:
    print("error: no variant was measured")
EOF
rm -f "$speed"

echo "== the stages on CUDA: train (SIGTERM after a checkpoint, then resumed) and evaluate"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data/clean" "$work/data/raw" "$work/metrics"
ln -s "$PWD/data/tokens" "$work/data/tokens"
for f in data/clean/{train,val,test}.jsonl data/raw/manifest.json metrics/tokenize.json; do
    cp "$f" "$work/$f"
done
python - "$work/params.yaml" <<'EOF'
import sys
import yaml
from pipeline.core.params import merge, read_yaml

data = merge(read_yaml("params.yaml"), {
    "train": {"device": "cuda", "max_steps": 600, "eval_interval": 200},
    "train_run": {"checkpoint_interval": 200},
    "evaluate": {"batch_size": 128, "max_pairs": 300},  # translation: 300 test pairs, not all 1,519
})
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(data, f, sort_keys=False)
EOF
cd "$work"
t0=$(date +%s)
python -m pipeline.train >train1.log 2>&1 &
pid=$!
until [ -d data/checkpoints/step_0000200 ] || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
kill -TERM $pid 2>/dev/null || true
rc=0; wait $pid || rc=$?
grep -v "^train:.*it/s" train1.log | tail -3
echo "first run: exit $rc (143: stopped by SIGTERM with a checkpoint)"
python -m pipeline.train 2>&1 | grep -E "resuming|^train:|^step|error" || true
grep -q . data/model/config.json
echo "train: $(($(date +%s) - t0)) s for both runs"
t0=$(date +%s)
python -m pipeline.evaluate 2>&1 | grep -vE "^\S+: +[0-9]+%" | tail -5
echo "evaluate: $(($(date +%s) - t0)) s"
python - <<'EOF'
import json
m = json.load(open("metrics/train.json")) | json.load(open("metrics/timing/train.json"))
print("train.json:", {k: m[k] for k in ("device", "steps", "best_val_loss", "tokens_per_second", "mfu")})
e = json.load(open("metrics/eval.json"))
print("eval.json: val bits/byte", e.get("val", {}).get("bits_per_byte"), "| keys:", sorted(e))
EOF
grep -A6 "^Translation, " metrics/report.md || true
if [ -n "${OUT:-}" ]; then
    cp metrics/train.json metrics/eval.json metrics/report.md train1.log "$OUT/" || true
fi
