"""Stage 4, train: next-token prediction with cross-entropy and AdamW on the token files.

    python -m pipeline.train                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m pipeline.train              # DDP: NCCL on CUDA, Gloo on CPU

Each optimizer step sees a global batch of `train.batch_tokens` tokens: random windows of
block_size+1 tokens from the memory-mapped train.bin, drawn from a generator seeded by (seed,
step), so the loader's position is the step number and every process takes its own slice of the
same global batch. Micro-batches accumulate gradients (synchronised only on the last one).
Warmup then cosine or warmup-stable-decay, gradient clipping, validation on fixed val windows
every eval_interval steps; stops at max_steps or after time_budget_s, whichever comes first.
CUDA: bf16 autocast, TF32, fused AdamW, torch.compile. CPU: float32.

Checkpoints (model weights in safetensors; optimizer, step, tokens seen, RNG states and the best
weights so far in files that load with torch.load(weights_only=True)) go to train.checkpoint_dir
every checkpoint_interval steps, atomically; a new run with the same model, data and training
params resumes from the latest one and ends bit-identical (on CPU) to a run never interrupted.
SIGTERM/SIGINT save a checkpoint and stop.

Writes data/model/{best,last}.safetensors and config.json, metrics/train.json, and the curves
(loss, learning rate, gradient norm, tokens/s, MFU) through dvclive in metrics/train/.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import params as P
from pipeline.common import (PipelineError, atomic_dir, first_line, read_json, run_main, set_torch_threads,
                             sha256_file, write_json)
from pipeline.model import build_model, count_parameters, flops_per_token, load_weights, save_weights

TOKENS_DIR = Path("data/tokens")
OUT_DIR = Path("data/model")
METRICS = Path("metrics/train.json")
LIVE_DIR = Path("metrics/train")
# Train params that do not change what is computed: a checkpoint made under other values resumes.
OPERATIONAL = {"device", "threads", "compile", "checkpoint_interval", "checkpoint_dir", "resume"}
KEEP_CHECKPOINTS = 2


# ----------------------------------------------------------------------------------------------
# Data


def load_tokens(split: str) -> np.ndarray:
    meta = read_json(TOKENS_DIR / f"{split}.json")
    path = TOKENS_DIR / f"{split}.bin"
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the tokenize stage: dvc repro)")
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != meta["tokens"]:
        raise PipelineError(f"{path}: {len(data)} tokens but its sidecar says {meta['tokens']}; re-run tokenize")
    return data


def window_starts(n_tokens: int, block_size: int, rows: int, *key: int) -> np.ndarray:
    """`rows` random window starts, a pure function of `key` (e.g. seed, stream, step)."""
    return np.random.default_rng(list(key)).integers(0, n_tokens - block_size, size=rows)


def windows(data: np.ndarray, starts, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


def fixed_batches(data, block_size: int, batch_size: int, n: int, seed: int, stream: int, device) -> list:
    """The same n batches every time: validation curves compare like with like."""
    starts = window_starts(len(data), block_size, n * batch_size, seed, stream)
    return [windows(data, starts[i * batch_size:(i + 1) * batch_size], block_size, device) for i in range(n)]


def data_fingerprint() -> str:
    """The token files' identity: tokenizer, sidecars, and the sizes and ends of the .bin files."""
    h = hashlib.sha256(sha256_file(TOKENS_DIR / "tokenizer.model").encode())
    for split in ("train", "val"):
        h.update((TOKENS_DIR / f"{split}.json").read_bytes())
        path = TOKENS_DIR / f"{split}.bin"
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, path.stat().st_size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Optimisation


class CudaAutocast:
    """bf16 autocast, with attention held to the flash kernel (an error, never a silent fallback).

    Reusable: `with autocast:` around every forward pass.
    """

    def __enter__(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._stack = ExitStack()
        self._stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        self._stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if choice == "cuda" else torch.device("cpu")


def lr_at(step: int, t: P.Train, time_fraction: float = 0.0) -> float:
    """Linear warmup to lr, then cosine decay (or stable, then linear decay: wsd) to min_lr.

    Progress is the larger of step/max_steps and the fraction of time_budget_s used, so a
    time-limited run still decays fully.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = max((step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps), time_fraction)
    progress = min(progress, 1.0)
    if t.schedule == "wsd":
        stable = 1.0 - t.decay_fraction
        return t.lr if progress < stable else t.lr + (t.min_lr - t.lr) * (progress - stable) / t.decay_fraction
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, t: P.Train, device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (and on embeddings only if train.decay_embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        skip = p.dim() < 2 or (id(p) in embeddings and not t.decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **extra)


def accumulate_step(model, optimizer, micro_batches, lr: float, grad_clip: float, autocast,
                    sync=lambda last: nullcontext()) -> tuple[float, float | None]:
    """One optimizer step over several micro-batches: the gradient of their mean loss.

    `sync(last)` is the context for each backward pass (DDP: no gradient all-reduce until the last).
    Returns the mean loss (this process) and the gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    n = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        with sync(i == n - 1):
            with autocast:
                _, loss = model(x, y)
            (loss / n).backward()
        total = total + loss.detach().float()  # stays on the device: no synchronisation per micro-batch
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # .item() synchronises, so timings around this call are honest on CUDA too
    return float(total) / n, None if grad_norm is None else float(grad_norm)


@torch.no_grad()
def estimate_loss(model, batches, autocast) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 matrix-product throughput of this CPU (FLOP/s, median of `repeats`).

    2048 is large enough to reach the plateau on a laptop-class CPU (1024 reaches about half).
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / float(np.median(times))


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """What MFU is measured against: the GPU's bf16 dense peak, or this CPU's float32 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
    return cpu_matmul_flops()


# ----------------------------------------------------------------------------------------------
# Processes (torchrun)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(t: P.Train) -> tuple[Dist, torch.device]:
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    device = pick_device(t.device, d.local_rank)
    if d.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # The cores of this machine are shared by its processes.
    set_torch_threads(t.threads if t.threads > 0 else max(1, (os.cpu_count() or 1) // d.local_world))
    return d, device


def all_ranks_max(d: Dist, values: list[float]) -> list[float]:
    if d.world == 1:
        return values
    x = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def all_ranks_mean(d: Dist, value: float) -> float:
    if d.world == 1:
        return value
    x = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(x)
    return x.item() / d.world


def wrap(model: torch.nn.Module, d: Dist, t: P.Train, device):
    """DDP or FSDP under torchrun; returns (the module to call, sync(last) context for accumulation)."""
    if d.world == 1:
        return model, lambda last: nullcontext()
    if t.strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise PipelineError("train.strategy: fsdp needs torch >= 2.6 (fully_shard)") from None
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)

        def sync(last):
            model.set_requires_gradient_sync(last)
            return nullcontext()
        return model, sync
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, lambda last: nullcontext() if last else ddp.no_sync()


def full_state(model, optimizer, d: Dist, t: P.Train) -> tuple[dict, dict | None]:
    """The unwrapped model's state dict and the optimizer's (if given), whole (gathered under FSDP).

    Under FSDP every process must call this; the others get the same result.
    """
    if d.world > 1 and t.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), None if optimizer is None else optimizer.state_dict()


def load_full_state(model, optimizer, weights: dict, opt_state: dict, d: Dist, t: P.Train) -> None:
    if d.world > 1 and t.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(weights)
    optimizer.load_state_dict(opt_state)


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Progress:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0                 # optimizer steps done; the loader's position (batches are keyed by step)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = float("inf")
    best_step: int = -1
    last_val_loss: float = float("nan")
    last_train_loss: float = float("nan")
    rng: list = field(default_factory=list)  # per rank: torch CPU RNG state (and CUDA's)


def fingerprint(m: P.Model, t: P.Train, vocab_size: int, data_sha: str, world: int) -> dict:
    """What must match for a checkpoint to resume: model, data, and every training param that matters."""
    train = {k: v for k, v in P.as_dict(t).items() if k not in OPERATIONAL}
    return {"model": P.as_dict(m), "vocab_size": vocab_size, "data": data_sha, "train": train, "processes": world}


def why_incompatible(saved: dict, now: dict) -> str | None:
    if saved.get("model") != now["model"]:
        keys = sorted(k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k])
        return "a different model (" + ", ".join(f"model.{k}" for k in keys) + ")"
    if saved.get("vocab_size") != now["vocab_size"] or saved.get("data") != now["data"]:
        return "different token files (vocabulary or data changed)"
    if saved.get("train") != now["train"]:
        keys = sorted(k for k in now["train"] if saved.get("train", {}).get(k) != now["train"][k])
        return "different training params (" + ", ".join(
            f"train.{k}: {saved.get('train', {}).get(k)!r} -> {now['train'][k]!r}" for k in keys) + ")"
    if saved.get("processes") != now["processes"]:
        return f"{saved.get('processes')} processes, now {now['processes']}"
    return None


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, newest first (a folder appears only once fully written)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(folder: Path, weights: dict, best: dict | None, opt_state: dict, progress: Progress,
                    fp: dict, m: P.Model, t: P.Train, vocab_size: int) -> Path:
    """Write step_NNNNNNN/ atomically (a temporary folder renamed); keep the newest few."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{progress.step:07d}"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(weights, m, tmp / "model.safetensors", vocab_size=vocab_size, step=progress.step)
    if best is not None:
        save_weights(best, m, tmp / "best.safetensors", vocab_size=vocab_size, step=progress.best_step)
    state = {"optimizer": opt_state, "progress": progress.__dict__, "fingerprint": json.dumps(fp, sort_keys=True),
             # Both are functions of the step (and of the training time under a budget), kept for the reader.
             "loader": {"windows": "random, keyed by (seed, 0, step)", "seed": t.seed, "next_step": progress.step},
             "scheduler": {"schedule": t.schedule, "next_step": progress.step,
                           "time_fraction": progress.train_seconds / t.time_budget_s if t.time_budget_s else 0.0},
             "format": 1}
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(folder)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict | None, dict, Progress, dict]:
    """(weights, best weights or None, optimizer state, progress, fingerprint); PipelineError if unreadable."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        weights = load_weights(path / "model.safetensors")[0].state_dict()
        best = load_weights(path / "best.safetensors")[0].state_dict() if (path / "best.safetensors").exists() else None
        progress = Progress(**state["progress"])
        fp = json.loads(state["fingerprint"])
    except Exception as e:  # truncated, corrupt or foreign files: one line, never a torch traceback
        raise PipelineError(f"{path}: not a readable checkpoint ({first_line(e)}); delete it, "
                            f"or set train.resume: never") from None
    return weights, best, state["optimizer"], progress, fp


# ----------------------------------------------------------------------------------------------
# Logging (rank 0 only)


def truncate_curves(live_dir: Path, step: int) -> None:
    """Drop logged rows at or after `step`: a resumed run logs them again."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if int(r[col]) < step]
        with open(tsv, "w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)


class Stop(Exception):
    """SIGTERM or SIGINT arrived: the loop saves a checkpoint and stops."""


# ----------------------------------------------------------------------------------------------


def main() -> None:
    p = P.load()
    m, t = p.model, p.train
    d, device = init_distributed(t)
    # SIGTERM/SIGINT only set a flag: the loop checkpoints and stops at the end of the step.
    stop_signal: list[int] = []
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(m, t, d, device, stop_signal)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(m: P.Model, t: P.Train, d: Dist, device: torch.device, stop_signal: list[int]) -> None:
    train_data, val_data = load_tokens("train"), load_tokens("val")
    vocab_size = read_json(TOKENS_DIR / "train.json")["vocab_size"]
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) < m.block_size + 2:
            raise PipelineError(f"model.block_size: {m.block_size} is too large for {TOKENS_DIR}/{name}.bin "
                                f"({len(data)} tokens); lower it or add text")
    micro_tokens = t.batch_size * m.block_size * d.world
    global_tokens = t.batch_tokens or micro_tokens
    if global_tokens % micro_tokens:
        raise PipelineError(f"train.batch_tokens: {t.batch_tokens} is not a multiple of batch_size x block_size x "
                            f"processes = {t.batch_size} x {m.block_size} x {d.world} = {micro_tokens}")
    accum = global_tokens // micro_tokens
    rows_per_step = global_tokens // m.block_size
    tokenizer_sha = sha256_file(TOKENS_DIR / "tokenizer.model")
    fp = fingerprint(m, t, vocab_size, data_fingerprint(), d.world)
    ckpt_dir = Path(t.checkpoint_dir)

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = CudaAutocast() if cuda else nullcontext()
    torch.manual_seed(t.seed)  # the same initial weights on every process
    raw = build_model(m, vocab_size).to(device)
    n_params = count_parameters(raw)
    flops_tok = flops_per_token(raw, m.block_size)
    torch.manual_seed(t.seed + d.rank)  # dropout differs per process
    model, sync = wrap(raw, d, t, device)
    optimizer = make_optimizer(model, t, device)
    progress = Progress()
    best_weights = None
    resumed = False

    # Resume from the newest checkpoint when it is compatible.
    found = checkpoints(ckpt_dir) if t.resume != "never" else []
    if found:
        weights, best_weights, opt_state, saved, saved_fp = read_checkpoint(found[0])
        why = why_incompatible(saved_fp, fp)
        if why is None:
            load_full_state(raw, optimizer, weights, opt_state, d, t)
            progress, resumed = saved, True
            if len(progress.rng) == d.world:
                rng = progress.rng[d.rank]
                torch.set_rng_state(rng["cpu"])
                if cuda and rng.get("cuda") is not None:
                    torch.cuda.set_rng_state(rng["cuda"], device)
            if d.main:
                print(f"train: resuming from {found[0]} (step {progress.step} of {t.max_steps})", flush=True)
        elif t.resume == "strict":
            raise PipelineError(f"{found[0]}: cannot resume, it was made with {why} (train.resume: strict); "
                                f"delete {ckpt_dir} or set train.resume: auto to start fresh")
        else:
            best_weights = None
            if d.main:
                print(f"train: not resuming {found[0]}: it was made with {why}; starting fresh", flush=True)
    if d.world > 1:
        dist.barrier()  # every process has read the checkpoint
    if not resumed and d.main:  # a fresh start replaces whatever checkpoints were there
        for old in checkpoints(ckpt_dir):
            shutil.rmtree(old)

    use_compile = t.compile if t.compile != "auto" else cuda
    forward_model = torch.compile(model) if use_compile else model
    peak = peak_flops(device) if d.main else None
    val_batches = fixed_batches(val_data, m.block_size, t.batch_size, t.eval_batches, t.seed, 1, device)
    train_eval_batches = fixed_batches(train_data, m.block_size, t.batch_size, t.eval_batches, t.seed, 2, device)
    if d.main:
        print(f"train: {m.arch} with {n_params:,} parameters on {d.world} x {device.type}; up to {t.max_steps} "
              f"steps of {global_tokens:,} tokens ({accum} micro-batch(es) of {t.batch_size}x{m.block_size} per "
              f"process){f', at most {t.time_budget_s:g} s' if t.time_budget_s else ''}", flush=True)

    def snapshot_weights(model_now) -> dict:
        return {k: v.detach().cpu().clone() for k, v in model_now.items()}

    def on_interval(step: int) -> bool:
        return bool(t.checkpoint_interval) and step % t.checkpoint_interval == 0

    def checkpoint_now() -> None:
        weights, opt_state = full_state(raw, optimizer, d, t)
        rngs = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}]
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        progress.rng = rngs
        if d.main:
            save_checkpoint(ckpt_dir, weights, best_weights, opt_state, progress, fp, m, t, vocab_size)
        if d.world > 1:
            dist.barrier()

    from dvclive import Live

    live = None
    if d.main:
        if progress.step > 0:
            truncate_curves(LIVE_DIR, progress.step)
        live = Live(dir=str(LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None, resume=progress.step > 0)
        live.step = progress.step
    out_ctx = atomic_dir(OUT_DIR) if d.main else nullcontext(None)
    stopped_by = None
    try:
        with out_ctx as out:
            bar = tqdm(total=t.max_steps, initial=progress.step, desc="train", unit="step", disable=None if d.main else True)
            while True:
                step = progress.step
                time_up = bool(t.time_budget_s) and progress.train_seconds >= t.time_budget_s
                stop, time_up = (bool(v) for v in all_ranks_max(d, [float(bool(stop_signal)), float(time_up)]))
                last = step >= t.max_steps or time_up
                if stop:
                    stopped_by = stop_signal[0] if stop_signal else signal.SIGTERM
                    checkpoint_now()
                    break
                if step % t.eval_interval == 0 or last:
                    progress.last_val_loss = estimate_loss(forward_model, val_batches, autocast)
                    progress.last_train_loss = estimate_loss(forward_model, train_eval_batches, autocast)
                    if live:
                        live.log_metric("train/loss", progress.last_train_loss)
                        live.log_metric("val/loss", progress.last_val_loss)
                        tqdm.write(f"step {step:>6}: train loss {progress.last_train_loss:.4f}, "
                                   f"val loss {progress.last_val_loss:.4f}")
                    if progress.last_val_loss < progress.best_val_loss:
                        progress.best_val_loss, progress.best_step = progress.last_val_loss, step
                        best_weights = snapshot_weights(full_state(raw, None, d, t)[0])
                if last:
                    break
                fraction = progress.train_seconds / t.time_budget_s if t.time_budget_s else 0.0
                lr = lr_at(step, t, fraction)
                t0 = time.perf_counter()
                starts = window_starts(len(train_data), m.block_size, rows_per_step, t.seed, 0, step)
                mine = starts.reshape(accum, d.world, t.batch_size)[:, d.rank]
                micro = [windows(train_data, s, m.block_size, device) for s in mine]
                loss, grad_norm = accumulate_step(forward_model, optimizer, micro, lr, t.grad_clip, autocast, sync)
                loss = all_ranks_mean(d, loss)
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise PipelineError(f"train: loss became {loss} at step {step}; lower train.lr (now {t.lr}) or "
                                        f"raise train.warmup_steps; the last good checkpoint in {ckpt_dir} "
                                        f"and {OUT_DIR} were left as they were")
                progress.train_seconds += dt
                progress.tokens_seen += global_tokens
                progress.step = step + 1
                if live:
                    live.log_metric("train/step_loss", loss, plot=True)
                    live.log_metric("lr", lr)
                    if grad_norm is not None:
                        live.log_metric("grad_norm", grad_norm)
                    live.log_metric("tokens_per_second", global_tokens / dt)
                    if peak:
                        live.log_metric("mfu", flops_tok * global_tokens / dt / peak)
                    live.next_step()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()
                if on_interval(progress.step):
                    checkpoint_now()
            bar.close()
            if stopped_by is not None:
                raise Stop()
            if not on_interval(progress.step):
                checkpoint_now()  # the final state, unless the interval just wrote it
            if d.main:
                final, _ = full_state(raw, None, d, t)
                save_weights(final, m, out / "last.safetensors", vocab_size=vocab_size, step=progress.step,
                             tokenizer_sha256=tokenizer_sha)
                save_weights(best_weights if best_weights is not None else final, m, out / "best.safetensors",
                             vocab_size=vocab_size, step=progress.best_step, val_loss=progress.best_val_loss,
                             tokenizer_sha256=tokenizer_sha)
                write_json(out / "config.json", {"model": P.as_dict(m), "train": P.as_dict(t), "vocab_size": vocab_size,
                                                 "parameters": n_params, "processes": d.world,
                                                 "best_step": progress.best_step, "tokenizer_sha256": tokenizer_sha})
            else:
                full_state(raw, None, d, t)  # FSDP gathers on every process
    except Stop:
        if live:
            live.end()
        name = signal.Signals(stopped_by).name
        raise PipelineError(f"train: stopped by {name} at step {progress.step}; checkpoint saved in {ckpt_dir}, "
                            f"run again (dvc repro) to resume", exit_code=128 + stopped_by) from None
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(f"train: CUDA out of memory with micro-batches of {t.batch_size} x {m.block_size} tokens; "
                            f"lower train.batch_size (train.batch_tokens keeps the global batch by accumulating), "
                            f"or model.block_size / model.n_embd") from None
    if live:
        live.end()
    if not d.main:
        return
    train_seconds = progress.train_seconds
    tokens_per_second = progress.tokens_seen / max(train_seconds, 1e-9)
    mfu = flops_tok * tokens_per_second / peak if peak else None
    metrics = {
        "arch": m.arch,
        "parameters": n_params,
        "processes": d.world,
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "tokens_per_second": round(tokens_per_second, 1),
        "train_seconds": round(train_seconds, 1),
        "flops_per_token": flops_tok,
        "mfu": None if mfu is None else round(mfu, 4),
        "final_train_loss": round(progress.last_train_loss, 4),
        "final_val_loss": round(progress.last_val_loss, 4),
        "best_val_loss": round(progress.best_val_loss, 4),
        "best_step": progress.best_step,
        "device": device.type,
    }
    write_json(METRICS, metrics)
    print(f"train: val loss {progress.last_val_loss:.4f} (best {progress.best_val_loss:.4f} at step "
          f"{progress.best_step}), {tokens_per_second:,.0f} tokens/s"
          f"{'' if mfu is None else f', MFU {mfu:.0%}'} -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
