#!/usr/bin/env bash
# GPT-2 small (12 layers, 768 wide, 12 heads, context 1024, vocabulary 50304) on one NVIDIA GPU:
# bf16 autocast, flash attention, fused AdamW, torch.compile; prints tokens/s and MFU against the
# GPU's bf16 dense peak. Target on an H200: at least 45% MFU.
#
#   bash benchmarks/gpu.sh                 # needs a CUDA build of torch and `pip install -e .`
#   BATCH=8 STEPS=200 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${BATCH:-16}
STEPS=${STEPS:-300}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
# Which attention kernel runs: the flash kernel must, in the forward and the backward pass.
import sys
import torch
from pipeline.model import build_model
from pipeline.params import Model
from pipeline.hardware import CudaAutocast

if not torch.cuda.is_available():
    sys.exit("error: no CUDA device; this script measures a GPU")
model = build_model(Model(n_layer=2, n_head=12, n_embd=768, block_size=1024), 50304).cuda()
x = torch.randint(50304, (2, 1024), device="cuda")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    with CudaAutocast():
        loss = model(x, x)[1]
    loss.backward()
    torch.cuda.synchronize()
kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower()})
print("flash attention kernels:", kernels[:4])
if not kernels:
    sys.exit("error: the flash attention kernel did not run")
EOF
python benchmarks/train_throughput.py --n-layer 12 --n-embd 768 --n-head 12 --block-size 1024 \
    --vocab 50304 --batch-size "$BATCH" --steps "$STEPS" --rounds 3 --warmup 10 --compile both
