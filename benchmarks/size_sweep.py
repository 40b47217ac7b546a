"""Which GPT size learns most in a fixed CPU time? An equal-time sweep on the real token files.

    python benchmarks/size_sweep.py --seconds 120     (after `dvc repro tokenize`)

Each configuration trains for the same wall-clock time with the train stage's own pieces
(model, batches, optimizer; warmup then cosine decay over the number of steps its measured
speed allows), then reports val bits per byte on fixed val windows. Prints one line per config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import params as P  # noqa: E402
from pipeline.common import read_json  # noqa: E402
from pipeline.evaluate import nats_of_range  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.train import get_batch, load_tokens, lr_at, make_optimizer, train_step  # noqa: E402

CONFIGS = {  # name: (model overrides, train overrides)
    "4x256 T256 B16 lr2e-3": (dict(n_layer=4, n_head=4, n_embd=256, block_size=256), dict(batch_size=16, lr=2e-3)),
    "4x128 T128 B32 lr3e-3": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128), dict(batch_size=32, lr=3e-3)),
    "4x128 T256 B16 lr3e-3": (dict(n_layer=4, n_head=4, n_embd=128, block_size=256), dict(batch_size=16, lr=3e-3)),
    "2x256 T128 B32 lr3e-3": (dict(n_layer=2, n_head=4, n_embd=256, block_size=128), dict(batch_size=32, lr=3e-3)),
    "6x192 T128 B32 lr2e-3": (dict(n_layer=6, n_head=6, n_embd=192, block_size=128), dict(batch_size=32, lr=2e-3)),
}


def run(name: str, m: P.Model, t: P.Train, seconds: float, train, val, vocab: int, val_bytes: int, val_tokens: int):
    torch.manual_seed(0)
    model = build_model(m, vocab)
    opt = make_optimizer(model, t, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    # Measure the speed on a few steps, then plan the schedule for the time budget.
    for i in range(8):  # 3 warm-up steps, then 5 timed ones
        if i == 3:
            t0 = time.perf_counter()
        x, y = get_batch(train, m.block_size, t.batch_size, gen, torch.device("cpu"))
        train_step(model, opt, x, y, t.lr, t.grad_clip, nullcontext())
    per_step = (time.perf_counter() - t0) / 5
    steps = max(10, int(seconds / per_step))
    t = dataclasses.replace(t, max_steps=steps, warmup_steps=max(1, steps // 12), min_lr=t.lr / 10)
    model = build_model(m, vocab)
    opt = make_optimizer(model, t, torch.device("cpu"))
    start = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(train, m.block_size, t.batch_size, gen, torch.device("cpu"))
        train_step(model, opt, x, y, lr_at(step, t), t.grad_clip, nullcontext())
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        nats = nats_of_range(model, val, 1, 1 + val_tokens, 32)
    bpb = nats / math.log(2) / val_bytes
    print(f"{name}: {count_parameters(model):,} params, {steps} steps in {elapsed:.0f} s "
          f"({steps * t.batch_size * m.block_size / elapsed:,.0f} tokens/s), val {bpb:.4f} bits/byte", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--only", nargs="*", help="names of the configs to run (default: all)")
    ap.add_argument("--val-tokens", type=int, default=0, help="score this many val tokens (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = P.load()
    train, val = load_tokens("train"), load_tokens("val")
    vocab = read_json("data/tokens/train.json")["vocab_size"]
    args.val_tokens = args.val_tokens or len(val) - 1
    # Bytes of the scored val prefix: exact, from the tokenizer's per-token byte lengths.
    from pipeline.tokenize import Tokenizer

    token_bytes = Tokenizer("data/tokens/tokenizer.model").token_bytes()
    val_bytes = int(token_bytes[np.asarray(val[1:1 + args.val_tokens], dtype=np.int64)].sum())
    for name, (mo, to) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        run(name, dataclasses.replace(base.model, **mo), dataclasses.replace(base.train, **to),
            args.seconds, train, val, vocab, val_bytes, args.val_tokens)


if __name__ == "__main__":
    main()
