"""Stage 4, train: next-token prediction with cross-entropy and AdamW on the token files.

    python -m pipeline.train                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m pipeline.train              # DDP: NCCL on CUDA, Gloo on CPU

Each optimizer step sees a global batch of `train.batch_tokens` tokens: random windows of
block_size+1 tokens from the memory-mapped train.bin, drawn from a generator seeded by (seed,
step), so the loader's position is the step number and every process takes its own slice of the
same global batch (pipeline.dataloader). Micro-batches accumulate gradients (synchronised only on
the last one). Warmup then cosine or warmup-stable-decay, gradient clipping (pipeline.optim),
validation on fixed val windows every eval_interval steps; stops at max_steps or after
time_budget_s, whichever comes first. CUDA: bf16 autocast, TF32, fused AdamW, torch.compile,
and no wait for the device between steps (losses are read every train.log_interval steps).
CPU: float32.

Checkpoints (pipeline.checkpoint) go to train.checkpoint_dir every checkpoint_interval steps,
atomically; a new run with the same model, data and training params resumes from the latest one
and ends bit-identical (on CPU) to a run never interrupted. SIGTERM/SIGINT save a checkpoint and
stop.

Writes data/model/{best,last}.safetensors and config.json, metrics/train.json, and the curves
(loss, learning rate, gradient norm, tokens/s, MFU) through dvclive in metrics/train/.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import params as P
from pipeline.checkpoint import CURVES, Checkpoints, copy_weights, fingerprint, save_weights
from pipeline.common import PipelineError, atomic_dir, read_json, remove_stale, run_main, sha256_file, write_json
from pipeline.dataloader import fixed_batches, pair_sources, step_batches
from pipeline.distributed import (
    Processes,
    any_rank,
    full_state,
    init_distributed,
    mean_over_ranks,
    shutdown,
    wrap_model,
)
from pipeline.hardware import CudaAutocast, peak_flops
from pipeline.model import build_model, count_parameters, flops_per_token
from pipeline.optim import estimate_loss, lr_at, make_optimizer, train_step
from pipeline.tokenizer import TOKENS_DIR, Tokenizer, load_tokens, token_files_fingerprint

OUT_DIR = Path("data/model")
METRICS = Path("metrics/train.json")
TIMING = Path("metrics/timing/train.json")
LIVE_DIR = Path("metrics/train")


def main() -> None:
    params = P.load()
    cfg, t = params.model, params.train
    procs, device = init_distributed(t)
    try:
        with StopOnSignals() as stop:
            train(cfg, t, procs, device, stop)
    except torch.cuda.OutOfMemoryError as e:
        raise PipelineError(
            f"train: CUDA out of memory with micro-batches of {t.batch_size} x {cfg.block_size} "
            f"tokens ({gpu_memory_tried(e, device)}); lower train.batch_size (train.batch_tokens "
            f"keeps the global batch by accumulating), or model.block_size / model.n_embd"
        ) from None
    finally:
        shutil.rmtree(Curves.scratch_of(os.getpid()), ignore_errors=True)  # a failed run's curves: never published
        shutdown(procs)


def train(cfg: P.Model, t: P.Train, procs: Processes, device: torch.device, stop: StopOnSignals) -> None:
    # Data, and how a global batch is split into micro-batches on each process
    train_data, val_data = load_tokens("train"), load_tokens("val")
    train_meta = read_json(TOKENS_DIR / "train.json")
    vocab_size = train_meta.get("vocab_size")
    tokenizer = Tokenizer(TOKENS_DIR / "tokenizer.model")
    if vocab_size != tokenizer.vocab_size:
        raise PipelineError(
            f"{TOKENS_DIR}/train.json: vocabulary {vocab_size} but {TOKENS_DIR}/tokenizer.model has "
            f"{tokenizer.vocab_size} pieces; re-run the tokenize stage"
        )
    mixture = source_mixture(t, train_meta["sources"])
    ignored = {"train": None, "val": None}  # targets that do not count: pairs' sources, with pair_loss: target
    if t.pair_loss == "target":
        ignored = {
            split: pair_sources(data, tokenizer.src_id, tokenizer.tgt_id)
            for split, data in (("train", train_data), ("val", val_data))
        }
    check_long_enough(cfg, train=train_data, val=val_data)
    accum, global_tokens = batch_plan(cfg, t, procs)
    tokenizer_sha = sha256_file(TOKENS_DIR / "tokenizer.model")

    # Model, optimizer, and the state of an interrupted run if there is one
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = CudaAutocast(t.attention) if cuda else nullcontext()
    torch.manual_seed(t.seed)  # the same initial weights on every process
    raw_model = build_model(cfg, vocab_size).to(device)
    n_params, flops_tok = count_parameters(raw_model), flops_per_token(raw_model, cfg.block_size)
    torch.manual_seed(t.seed + procs.rank)  # dropout differs per process
    model, sync = wrap_model(raw_model, procs, t, device)
    optimizer = make_optimizer(model, t, device)
    checkpoints = Checkpoints(
        cfg,
        t,
        vocab_size,
        fingerprint(cfg, t, vocab_size, token_files_fingerprint(tokenizer_sha), procs.world),
        procs,
        device,
    )
    progress, best_weights = checkpoints.resume(raw_model, optimizer)
    if t.compile is True or (t.compile == "auto" and cuda):
        model = torch.compile(model)
    if procs.main and not progress.peak_flops:  # measured once per run: a resumed run keeps its denominator
        progress.peak_flops = peak_flops(device) or 0.0
    peak = progress.peak_flops or None if procs.main else None
    val_batches = fixed_batches(
        val_data, cfg.block_size, t.batch_size, t.eval_batches, t.seed, 1, device, ignored["val"]
    )
    train_eval_batches = fixed_batches(
        train_data, cfg.block_size, t.batch_size, t.eval_batches, t.seed, 2, device, ignored["train"]
    )
    if procs.main:
        print(
            f"train: {cfg.arch} with {n_params:,} parameters on {procs.world} x {device.type}; up to "
            f"{t.max_steps} steps of {global_tokens:,} tokens ({accum} micro-batch(es) of {t.batch_size}x"
            f"{cfg.block_size} per process){f', at most {t.time_budget_s:g} s' if t.time_budget_s else ''}",
            flush=True,
        )
    curves = Curves(progress.step, checkpoints.resumed_from) if procs.main else None
    live = curves.live if curves else None
    bar = tqdm(
        total=t.max_steps, initial=progress.step, desc="train", unit="step", disable=None if procs.main else True
    )

    pending = PendingSteps(t.log_interval or (25 if cuda else 1), global_tokens, flops_tok, peak)
    while True:
        step = progress.step
        time_up = bool(t.time_budget_s) and progress.train_seconds + pending.elapsed() >= t.time_budget_s
        stopped, time_up = any_rank(procs, stop.requested, time_up)  # every process stops at the same step
        if stopped:
            pending.read(progress, procs, live, bar, t)
            break
        last = step >= t.max_steps or time_up

        # Evaluate: loss on fixed val and train batches; keep the best weights
        if step % t.eval_interval == 0 or last:
            pending.read(progress, procs, live, bar, t)
            progress.last_val_loss = estimate_loss(model, val_batches, autocast)
            progress.last_train_loss = estimate_loss(model, train_eval_batches, autocast)
            if live:
                live.log_metric("train/loss", progress.last_train_loss)
                live.log_metric("val/loss", progress.last_val_loss)
                tqdm.write(
                    f"step {step:>6}: train loss {progress.last_train_loss:.4f}, val loss {progress.last_val_loss:.4f}"
                )
            if progress.last_val_loss < progress.best_val_loss:
                progress.best_val_loss, progress.best_step = progress.last_val_loss, step
                best_weights = copy_weights(full_state(raw_model, None, procs, t)[0])
        if last:
            break

        # One optimizer step: forward and backward over the micro-batches, clip, AdamW. Nothing
        # here waits for the device: the loss and gradient norm are read every log_interval steps.
        pending.start()
        lr = lr_at(step, t, (progress.train_seconds + pending.elapsed()) / t.time_budget_s if t.time_budget_s else 0.0)
        micro_batches = step_batches(
            train_data,
            cfg.block_size,
            t.batch_size,
            accum,
            t.seed,
            step,
            procs.rank,
            procs.world,
            device,
            ignored["train"],
            mixture,
        )
        loss, grad_norm = train_step(model, optimizer, micro_batches, lr, t.grad_clip, autocast, sync)
        pending.add(step, lr, loss, grad_norm)
        progress.step = step + 1
        bar.update()
        if pending.due() or checkpoint_due(progress.step, t):
            pending.read(progress, procs, live, bar, t)
        if checkpoint_due(progress.step, t):
            checkpoints.save(raw_model, optimizer, progress, best_weights, curves and curves.scratch)
            if curves:
                curves.publish()  # the curves a rerun resumes, beside the checkpoint it resumes from
    bar.close()

    if stopped or not checkpoint_due(progress.step, t):
        # unless the interval just wrote it
        checkpoints.save(raw_model, optimizer, progress, best_weights, curves and curves.scratch)
    if stopped:
        if curves:
            curves.end()
        signum = stop.signal or signal.SIGTERM  # another process received it
        raise PipelineError(
            f"train: stopped by {signal.Signals(signum).name} at step {progress.step}; checkpoint "
            f"saved in {t.checkpoint_dir}, run again (dvc repro) to resume",
            exit_code=128 + signum,
        )
    final_weights, _ = full_state(raw_model, None, procs, t)  # FSDP gathers on every process
    if procs.main:
        with atomic_dir(OUT_DIR) as out:
            save_weights(
                final_weights,
                cfg,
                out / "last.safetensors",
                vocab_size=vocab_size,
                step=progress.step,
                tokenizer_sha256=tokenizer_sha,
            )
            save_weights(
                best_weights if best_weights is not None else final_weights,
                cfg,
                out / "best.safetensors",
                vocab_size=vocab_size,
                step=progress.best_step,
                val_loss=progress.best_val_loss,
                tokenizer_sha256=tokenizer_sha,
            )
            # The params that made these weights (not the operational knobs, which change nothing in them)
            train_params = {k: v for k, v in P.as_dict(t).items() if k not in P.OPERATIONAL["train"]}
            write_json(
                out / "config.json",
                {
                    "model": P.as_dict(cfg),
                    "train": train_params,
                    "vocab_size": vocab_size,
                    "parameters": n_params,
                    "processes": procs.world,
                    "best_step": progress.best_step,
                    "tokenizer_sha256": tokenizer_sha,
                },
            )
    if curves:
        curves.end()
    if procs.main:
        write_summary(cfg, progress, n_params, procs, flops_tok, peak, device)


# ----------------------------------------------------------------------------------------------
# The helpers of the loop, in the order it uses them


def gpu_memory_tried(error: Exception, device: torch.device) -> str:
    """What an out-of-memory error tried: the allocation, beside the GPU's memory."""
    tried = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    said = f"tried to allocate {tried.group(1)}" if tried else "an allocation failed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return said
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"{said} with {peak:.1f} GiB allocated at the peak, of {total:.0f} GiB"


def check_long_enough(cfg: P.Model, **splits) -> None:
    for name, data in splits.items():
        if len(data) < cfg.block_size + 2:
            raise PipelineError(
                f"model.block_size: {cfg.block_size} is too large for {TOKENS_DIR}/{name}.bin "
                f"({len(data)} tokens); lower it or add text"
            )


def source_mixture(t: P.Train, sources: dict[str, dict]) -> tuple[dict, dict] | None:
    """What step_batches needs to draw windows by train.source_weights (None: uniformly).

    A weight for a source the train split lacks is an error (a misspelt name), except params.yaml's
    own weights for the default corpus's sources (the default QA set, the en->ru Bible): on another
    corpus, or one that yields no questions, they do not apply."""
    default = P.Train().source_weights
    weights = {k: w for k, w in t.source_weights.items() if k in sources or default.get(k) != w}
    if not weights:
        return None
    for name in weights:
        if name not in sources:
            raise PipelineError(
                f"train.source_weights.{name}: no such source in {TOKENS_DIR}/train.json "
                f"(sources: {', '.join(sources)})"
            )
    if not any(weights.get(name, 1.0) > 0 for name in sources):
        raise PipelineError("train.source_weights: every source of the train split has weight 0")
    return sources, weights


def batch_plan(cfg: P.Model, t: P.Train, procs: Processes) -> tuple[int, int]:
    """(micro-batches per step on each process, tokens per optimizer step over all processes)."""
    micro_tokens = t.batch_size * cfg.block_size * procs.world
    global_tokens = t.batch_tokens or micro_tokens
    if global_tokens % micro_tokens:
        raise PipelineError(
            f"train.batch_tokens: {t.batch_tokens} is not a multiple of batch_size x block_size x "
            f"processes = {t.batch_size} x {cfg.block_size} x {procs.world} = {micro_tokens}"
        )
    return global_tokens // micro_tokens, global_tokens


def checkpoint_due(step: int, t: P.Train) -> bool:
    """Whether `step` ends a train.checkpoint_interval (0: only the final checkpoint)."""
    return bool(t.checkpoint_interval) and step % t.checkpoint_interval == 0


class PendingSteps:
    """Training steps whose loss and gradient norm are still on the device.

    They are read together (one wait for the device, one all-reduce across processes) every
    `interval` steps and before an evaluation, a checkpoint or the end: then each step's loss is
    checked, logged to the curves, and the wall-clock time since the first of them, which covers
    exactly their computation, is added to the training time and shared among them for tokens/s.
    """

    def __init__(self, interval: int, global_tokens: int, flops_tok: int, peak: float | None):
        self.interval, self.global_tokens, self.flops_tok, self.peak = interval, global_tokens, flops_tok, peak
        self.steps: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []
        self.t0: float | None = None

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the first pending step began (the device may still be working on them)."""
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.steps.append((step, lr, loss, grad_norm))

    def due(self) -> bool:
        return len(self.steps) >= self.interval

    def read(self, progress, procs: Processes, live, bar, t: P.Train) -> None:
        if not self.steps:
            self.t0 = None
            return
        losses = mean_over_ranks(procs, torch.stack([s[2] for s in self.steps])).tolist()  # waits for the device
        norms = [s[3] for s in self.steps]
        norms = norms if norms[0] is None else torch.stack(norms).tolist()
        dt = time.perf_counter() - self.t0
        tok_s = self.global_tokens * len(self.steps) / dt
        mfu = self.flops_tok * tok_s / self.peak if self.peak else None
        for (step, lr, _, _), loss, grad_norm in zip(self.steps, losses, norms):
            if not math.isfinite(loss):
                raise PipelineError(
                    f"train: loss became {loss} at step {step}; lower train.lr (now {t.lr}) or "
                    f"raise train.warmup_steps; the last good checkpoint in {t.checkpoint_dir} "
                    f"and {OUT_DIR} were left as they were"
                )
            if live:
                log_step(live, loss, lr, grad_norm, tok_s, mfu)
        progress.train_seconds += dt
        progress.tokens_seen += self.global_tokens * len(self.steps)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        self.steps, self.t0 = [], None


class StopOnSignals:
    """While active, SIGTERM and SIGINT only set `requested` (and `signal`): the loop checkpoints
    and stops at the end of its step."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def __enter__(self) -> StopOnSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Curves:
    """The curves of metrics/train/ (dvclive), logged into a scratch copy, saved with each
    checkpoint and published over metrics/train/ after it and at the end. A run that fails (a full
    disk, a read-only folder) leaves the curves as the last checkpoint had them: never truncated
    or half-written. A run resumed from `checkpoint` continues that checkpoint's curves at `step`
    (killed between a checkpoint and the publishing, metrics/train/ would lag behind it)."""

    def __init__(self, step: int, checkpoint: Path | None = None):
        remove_stale(LIVE_DIR.parent, f".{LIVE_DIR.name}")
        self.scratch = self.scratch_of(os.getpid())
        shutil.rmtree(self.scratch, ignore_errors=True)
        saved = checkpoint / CURVES if checkpoint is not None else None
        earlier = saved if saved is not None and saved.is_dir() else LIVE_DIR  # older checkpoints hold none
        if step > 0 and earlier.is_dir():
            shutil.copytree(earlier, self.scratch)
            truncate_curves(self.scratch, step)
        try:
            from dvclive import Live
        except ImportError:  # a GPU machine with torch but no DVC: the same files, written by TsvLive
            self.live = TsvLive(self.scratch, step)
        else:
            self.live = Live(dir=str(self.scratch), dvcyaml=None, save_dvc_exp=False, report=None, resume=step > 0)
        self.live.step = step

    @staticmethod
    def scratch_of(pid: int) -> Path:
        return LIVE_DIR.with_name(f".{LIVE_DIR.name}.tmp-{pid}")

    def publish(self) -> None:
        with atomic_dir(LIVE_DIR) as out:
            shutil.copytree(self.scratch, out, dirs_exist_ok=True)

    def end(self) -> None:
        self.live.end()
        self.publish()
        shutil.rmtree(self.scratch, ignore_errors=True)


class TsvLive:
    """dvclive's files without dvclive (where it is not installed): each metric's rows in
    plots/metrics/<name>.tsv (step, value) and the latest values in metrics.json."""

    def __init__(self, folder: Path, step: int):
        self.folder, self.step = folder, step
        folder.mkdir(parents=True, exist_ok=True)
        summary = folder / "metrics.json"
        self.summary = read_json(summary) if step > 0 and summary.exists() else {}

    def log_metric(self, name: str, value: float, plot: bool = True) -> None:
        tsv = self.folder / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        new = not tsv.exists()
        with open(tsv, "a", newline="") as f:
            if new:
                f.write(f"step\t{tsv.stem}\n")
            f.write(f"{self.step}\t{value}\n")
        *groups, key = name.split("/")
        node = self.summary
        for g in groups:
            node = node.setdefault(g, {})
        node[key] = value

    def next_step(self) -> None:
        self.summary["step"] = self.step  # as dvclive: the step of the last next_step, kept by end()
        self.end()
        self.step += 1

    def end(self) -> None:
        # a plain write: the folder is Curves' private scratch copy, published whole by Curves
        summary = {**self.summary, "step": self.summary.get("step", self.step)}
        (self.folder / "metrics.json").write_text(json.dumps(summary, indent=4) + "\n", encoding="utf-8")


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


def log_step(
    live, loss: float, lr: float, grad_norm: float | None, tokens_per_second: float, mfu: float | None
) -> None:
    live.log_metric("train/step_loss", loss, plot=True)
    live.log_metric("lr", lr)
    if grad_norm is not None:
        live.log_metric("grad_norm", grad_norm)
    live.log_metric("tokens_per_second", tokens_per_second)
    if mfu is not None:
        live.log_metric("mfu", mfu)
    live.next_step()


def write_summary(
    cfg: P.Model, progress, n_params: int, procs: Processes, flops_tok: int, peak: float | None, device: torch.device
) -> None:
    tokens_per_second = progress.tokens_seen / max(progress.train_seconds, 1e-9)
    mfu = flops_tok * tokens_per_second / peak if peak else None
    # wall-clock figures apart (metrics/timing/, not a DVC metric): they differ on every run and
    # would bury the figures that matter in `dvc metrics diff`
    write_json(
        TIMING,
        {
            "tokens_per_second": round(tokens_per_second, 1),
            "train_seconds": round(progress.train_seconds, 1),
            "mfu": None if mfu is None else round(mfu, 4),
        },
    )
    write_json(
        METRICS,
        {
            "arch": cfg.arch,
            "parameters": n_params,
            "processes": procs.world,
            "steps": progress.step,
            "tokens_seen": progress.tokens_seen,
            "flops_per_token": flops_tok,
            "final_train_loss": round(progress.last_train_loss, 4),
            "final_val_loss": round(progress.last_val_loss, 4),
            "best_val_loss": round(progress.best_val_loss, 4),
            "best_step": progress.best_step,
            "device": device.type,
        },
    )
    print(
        f"train: val loss {progress.last_val_loss:.4f} (best {progress.best_val_loss:.4f} at step "
        f"{progress.best_step}), {tokens_per_second:,.0f} tokens/s"
        f"{'' if mfu is None else f', MFU {mfu:.0%}'} -> {OUT_DIR}"
    )


if __name__ == "__main__":
    run_main(main)
