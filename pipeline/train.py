"""Stage 4, train: next-token prediction with cross-entropy and AdamW on the token files.

Random windows of block_size+1 tokens from train.bin (memory-mapped), linear warmup then cosine
decay, gradient clipping, validation on fixed val windows every eval_interval steps. CUDA when
present (bf16 autocast, TF32), else CPU in float32. Step-wise losses and learning rate go to
dvclive (metrics/train/), so `dvc plots show` draws the curves.

Writes data/model/{best.pt,last.pt} (weights, model config, vocabulary size, step; loadable with
torch.load(weights_only=True)) and metrics/train.json.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import params as P
from pipeline.common import PipelineError, atomic_dir, read_json, run_main, set_torch_threads, sha256_file, write_json
from pipeline.model import build_model, count_parameters

TOKENS_DIR = Path("data/tokens")
OUT_DIR = Path("data/model")
METRICS = Path("metrics/train.json")
LIVE_DIR = Path("metrics/train")


def load_tokens(split: str) -> np.ndarray:
    meta = read_json(TOKENS_DIR / f"{split}.json")
    path = TOKENS_DIR / f"{split}.bin"
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the tokenize stage: dvc repro)")
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != meta["tokens"]:
        raise PipelineError(f"{path}: {len(data)} tokens but its sidecar says {meta['tokens']}; re-run tokenize")
    return data


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def get_batch(data: np.ndarray, block_size: int, batch_size: int, gen: torch.Generator, device):
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    rows = np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


def lr_at(step: int, t: P.Train) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, t: P.Train, device) -> torch.optim.Optimizer:
    # Weight decay on matrices only: not on biases, norms' gains (1-D parameters).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **extra)


def train_step(model, optimizer, x, y, lr: float, grad_clip: float, autocast) -> tuple[float, float | None]:
    """One optimizer step at learning rate `lr`; returns the loss and the gradient norm (before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # .item() synchronises, so timings around this call are honest on CUDA too
    return loss.item(), None if grad_norm is None else float(grad_norm)


@torch.no_grad()
def estimate_loss(model, batches, autocast) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def checkpoint(model, m: P.Model, vocab_size: int, step: int, val_loss: float, tokens_sha: str) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": P.as_dict(m),
        "vocab_size": vocab_size,
        "step": step,
        "val_loss": val_loss,
        "tokenizer_sha256": tokens_sha,
    }


def main() -> None:
    p = P.load()
    m, t = p.model, p.train
    train_data, val_data = load_tokens("train"), load_tokens("val")
    vocab_size = read_json(TOKENS_DIR / "train.json")["vocab_size"]
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) < m.block_size + 2:
            raise PipelineError(f"model.block_size: {m.block_size} is too large for {TOKENS_DIR}/{name}.bin "
                                f"({len(data)} tokens); lower it or add text")
    tokenizer_sha = sha256_file(TOKENS_DIR / "tokenizer.model")

    set_torch_threads(t.threads)
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    model = build_model(m, vocab_size).to(device)
    n_params = count_parameters(model)
    optimizer = make_optimizer(model, t, device)
    gen = torch.Generator().manual_seed(t.seed)
    # Fixed validation windows: every evaluation sees the same text, so the curve is comparable.
    val_gen = torch.Generator().manual_seed(t.seed + 1)
    val_batches = [get_batch(val_data, m.block_size, t.batch_size, val_gen, device) for _ in range(t.eval_batches)]
    train_eval_batches = [get_batch(train_data, m.block_size, t.batch_size, val_gen, device) for _ in range(t.eval_batches)]
    print(f"train: {m.arch} with {n_params:,} parameters on {device.type}; {t.max_steps} steps of "
          f"{t.batch_size}x{m.block_size} tokens", flush=True)

    from dvclive import Live

    best = {"val_loss": float("inf"), "step": -1}
    tokens_per_step = t.batch_size * m.block_size
    train_time = 0.0
    last_loss = float("nan")
    val_loss = train_loss = float("nan")
    with atomic_dir(OUT_DIR) as out, Live(dir=str(LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        bar = tqdm(total=t.max_steps, desc="train", unit="step", disable=None)
        for step in range(t.max_steps + 1):
            last = step == t.max_steps
            if step % t.eval_interval == 0 or last:
                val_loss = estimate_loss(model, val_batches, autocast)
                train_loss = estimate_loss(model, train_eval_batches, autocast)
                live.log_metric("train/loss", train_loss)
                live.log_metric("val/loss", val_loss)
                tqdm.write(f"step {step:>6}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                if val_loss < best["val_loss"]:
                    best = {"val_loss": val_loss, "step": step}
                    torch.save(checkpoint(model, m, vocab_size, step, val_loss, tokenizer_sha), out / "best.pt")
            if last:
                break
            lr = lr_at(step, t)
            t0 = time.perf_counter()
            x, y = get_batch(train_data, m.block_size, t.batch_size, gen, device)
            last_loss, grad_norm = train_step(model, optimizer, x, y, lr, t.grad_clip, autocast)
            train_time += time.perf_counter() - t0
            if not math.isfinite(last_loss):
                raise PipelineError(f"train: loss became {last_loss} at step {step}; lower train.lr "
                                    f"(now {t.lr}) or raise train.warmup_steps; {OUT_DIR} was left as it was")
            live.log_metric("train/step_loss", last_loss, plot=True)
            live.log_metric("lr", lr)
            if grad_norm is not None:
                live.log_metric("grad_norm", grad_norm)
            live.next_step()
            bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            bar.update()
        bar.close()
        torch.save(checkpoint(model, m, vocab_size, t.max_steps, val_loss, tokenizer_sha), out / "last.pt")
        write_json(out / "config.json", {"model": P.as_dict(m), "train": P.as_dict(t), "vocab_size": vocab_size,
                                         "parameters": n_params,
                                         "best_step": best["step"], "tokenizer_sha256": tokenizer_sha})
    tokens_seen = t.max_steps * tokens_per_step
    metrics = {
        "arch": m.arch,
        "parameters": n_params,
        "steps": t.max_steps,
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / max(train_time, 1e-9), 1),
        "train_seconds": round(train_time, 1),
        "final_train_loss": round(train_loss, 4),
        "final_val_loss": round(val_loss, 4),
        "best_val_loss": round(best["val_loss"], 4),
        "best_step": best["step"],
        "device": device.type,
    }
    write_json(METRICS, metrics)
    print(f"train: val loss {val_loss:.4f} (best {best['val_loss']:.4f} at step {best['step']}), "
          f"{metrics['tokens_per_second']:,.0f} tokens/s -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
