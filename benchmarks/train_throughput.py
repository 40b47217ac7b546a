"""Training speed against the hardware limit (MFU), and architectures compared at equal time.

    python benchmarks/train_throughput.py                  # MFU of params.yaml's model, eager and compiled
    python benchmarks/train_throughput.py --compare 300    # + GPT, LSTM, GRU, RNN each trained 300 s
    python benchmarks/train_throughput.py --n-layer 12 --n-embd 768 --n-head 12 --block-size 1024 \\
        --vocab 50304 --batch-size 16 --steps 300          # GPT-2 small (benchmarks/gpu.sh, on CUDA)

MFU = model FLOPs per token (6 per multiplying parameter plus attention, pipeline.model.
flops_per_token) x tokens per second / peak. On CPU the peak is this machine's float32 matrix
product throughput, measured in the same run: rounds alternate a timed matmul and timed training
steps, MFU is computed per round (both sides see the same machine state) and the median is
reported. On CUDA the peak is the GPU's bf16 dense peak (pipeline.hardware.GPU_BF16_PEAK), with
bf16 autocast and TF32.

Training steps are the train stage's own (`train_step`: forward, backward, clipping,
AdamW) on random token windows; throughput does not depend on the tokens.

--compare runs the train stage itself (`python -m pipeline.train`) for each architecture with
train.time_budget_s set, in a scratch copy of the project that links data/tokens (run `dvc repro
tokenize` first), then scores the best checkpoint's bits per byte on the whole val split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import params as P  # noqa: E402
from pipeline.hardware import CudaAutocast, cpu_matmul_flops, peak_flops  # noqa: E402
from pipeline.model import build_model, count_parameters, flops_per_token  # noqa: E402
from pipeline.optim import make_optimizer, train_step  # noqa: E402

# Equal-time comparison: overlays on params.yaml (the recurrent ones are params/lstm.yaml's).
LSTM = P.read_yaml(ROOT / "params" / "lstm.yaml")
COMPARE = {
    "gpt": {},
    # GPT widths at 4 layers, heads of 64 channels where possible (for choosing the default)
    "gpt-128": {"model": {"n_embd": 128, "n_head": 4}, "train": {"lr": 3.0e-3, "min_lr": 3.0e-4}},
    "gpt-192": {"model": {"n_embd": 192, "n_head": 3}, "train": {"lr": 2.5e-3, "min_lr": 2.5e-4}},
    "gpt-256": {"model": {"n_embd": 256, "n_head": 4}, "train": {"lr": 2.0e-3, "min_lr": 2.0e-4}},
    "lstm": LSTM,
    "gru": P.merge(LSTM, {"model": {"arch": "gru"}}),
    "rnn": P.merge(LSTM, {"model": {"arch": "rnn"}}),
}


def measure(args) -> None:
    base = P.load(ROOT / "params.yaml")
    overrides = {
        k: v
        for k, v in (
            ("n_layer", args.n_layer),
            ("n_embd", args.n_embd),
            ("n_head", args.n_head),
            ("block_size", args.block_size),
        )
        if v
    }
    m = dataclasses.replace(base.model, **overrides)
    t = dataclasses.replace(base.train, batch_size=args.batch_size or base.train.batch_size)
    vocab = args.vocab or _vocab(base)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = CudaAutocast() if cuda else nullcontext()
    B, T = t.batch_size, m.block_size
    print(
        f"device: {torch.cuda.get_device_name() if cuda else f'cpu, {torch.get_num_threads()} threads'}; "
        f"torch {torch.__version__}"
    )
    print(
        f"model: {m.arch} {m.n_layer}x{m.n_embd}, {m.n_head} heads, context {T}, vocabulary {vocab}, "
        f"batch {B}x{T} tokens"
    )

    variants = ["eager", "compiled"] if args.compile == "both" else [args.compile]
    runs = {}
    for v in variants:
        torch.manual_seed(0)
        model = build_model(m, vocab).to(device)
        opt = make_optimizer(model, t, device)
        fwd = torch.compile(model) if v == "compiled" else model
        x = torch.randint(vocab, (B, T), device=device)
        y = torch.randint(vocab, (B, T), device=device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # includes compilation
            train_step(fwd, opt, [(x, y)], 1e-4, t.grad_clip, autocast)
        runs[v] = (fwd, opt, x, y)
        print(f"{v}: {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s", flush=True)
    n_params = count_parameters(runs[variants[0]][0])
    fpt = flops_per_token(build_model(m, vocab), T)
    print(f"parameters: {n_params:,}; model FLOPs per token: {fpt / 1e6:.2f} M (6N + 12*L*d*T)")

    if cuda:
        peak_fixed = peak_flops(device)
        if peak_fixed is None:
            print(
                f"warning: no bf16 peak known for {torch.cuda.get_device_name()}; MFU is against an H100's 989 TFLOP/s"
            )
            peak_fixed = 989e12
        print(f"peak: {peak_fixed / 1e12:.0f} TFLOP/s (bf16 dense, data sheet)")
    results = {v: [] for v in variants}
    peaks = []
    steps_per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        if cuda:
            peak = peak_fixed
        else:
            peak = cpu_matmul_flops(args.matmul, 5)
            peaks.append(peak)
        for v in variants:
            fwd, opt, x, y = runs[v]
            times = []
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                train_step(fwd, opt, [(x, y)], 1e-4, t.grad_clip, autocast)  # .item() synchronises
                times.append(time.perf_counter() - t0)
            tok_s = B * T / statistics.median(times)
            results[v].append((tok_s, fpt * tok_s / peak))
        line = ", ".join(f"{v} {results[v][-1][0]:,.0f} tok/s MFU {results[v][-1][1]:.1%}" for v in variants)
        print(f"round {r + 1}: " + (f"matmul {peak / 1e9:,.0f} GFLOP/s; " if not cuda else "") + line, flush=True)
    if peaks:
        print(
            f"float32 matmul ({args.matmul}x{args.matmul}): median {statistics.median(peaks) / 1e9:,.0f} "
            f"GFLOP/s, best {max(peaks) / 1e9:,.0f}"
        )
    for v in variants:
        tok = statistics.median(x[0] for x in results[v])
        mfu = statistics.median(x[1] for x in results[v])
        print(
            f"RESULT {v}: {tok:,.0f} tokens/s, {fpt * tok / 1e9:,.1f} GFLOP/s, MFU {mfu:.1%} "
            f"(median of {args.rounds} rounds)"
        )


def _vocab(base: P.Params) -> int:
    sidecar = ROOT / "data" / "tokens" / "train.json"
    return json.loads(sidecar.read_text())["vocab_size"] if sidecar.exists() else base.tokenize.vocab_size


def compare(seconds: float, names: list[str]) -> None:
    """Each architecture through the train stage with the same time_budget_s; val bits per byte."""
    import numpy as np
    from scratch_train import train_in_scratch

    from pipeline.scoring import nats_of_range

    tokens = ROOT / "data" / "tokens"
    if not (tokens / "train.bin").exists():
        sys.exit("error: data/tokens/train.bin missing; run `dvc repro tokenize` first")
    val_meta = json.loads((tokens / "val.json").read_text())
    val = np.memmap(tokens / "val.bin", dtype=np.dtype(val_meta["dtype"]), mode="r")
    print(
        f"\nequal-time comparison: {seconds:g} s of training each, val split {val_meta['tokens']:,} tokens, "
        f"{val_meta['bytes']:,} bytes"
    )
    base = P.read_yaml(ROOT / "params.yaml")
    for name in names:
        data = P.merge(
            P.merge(base, COMPARE[name]),
            {"train": {"max_steps": 10**9, "time_budget_s": seconds, "checkpoint_interval": 0}},
        )
        P.parse(data)
        model, m, wall = train_in_scratch(data, name)
        nats, _ = nats_of_range(model, val, 1, len(val), 32)
        bpb = nats / math.log(2) / val_meta["bytes"]
        cfg = data["model"]
        size = (
            f"{cfg['n_layer']}x{cfg['n_embd']}"
            if cfg["arch"] == "gpt"
            else f"{cfg['n_layer']}x{cfg['n_hidden']} (embedding {cfg['n_embd']})"
        )
        print(
            f"RESULT {name} {size}: {m['parameters']:,} parameters, {m['steps']} steps, "
            f"{m['tokens_seen']:,} tokens, {m['tokens_per_second']:,.0f} tok/s, MFU {m['mfu']:.1%}, "
            f"best val loss {m['best_val_loss']:.4f}, val {bpb:.3f} bits/byte (stage wall {wall:.0f} s)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25, help="timed training steps in all (per variant)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=2048, help="size of the square float32 matmul (CPU peak)")
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab", "batch_size"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=0, help="override params.yaml")
    ap.add_argument(
        "--compare",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also train each architecture for SECONDS with the train stage",
    )
    ap.add_argument("--only", nargs="*", default=["gpt", "lstm", "gru", "rnn"], choices=list(COMPARE))
    ap.add_argument("--skip-mfu", action="store_true")
    args = ap.parse_args()
    if not args.skip_mfu:
        measure(args)
    if args.compare:
        compare(args.compare, args.only)


if __name__ == "__main__":
    main()
