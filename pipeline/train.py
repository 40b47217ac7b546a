"""Stage 4, train: next-token prediction with cross-entropy on the token files, optimised by Muon
(the GPT's hidden matrices) with AdamW (everything else), or by AdamW alone (train.optimizer).

    python -m pipeline.train                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m pipeline.train              # DDP: NCCL on CUDA, Gloo on CPU

Each optimizer step sees a global batch of `train.batch_tokens` tokens: random windows of
block_size+1 tokens from the memory-mapped train.bin, drawn from a generator seeded by (seed,
step), so the loader's position is the step number and every process takes its own slice of the
same global batch (pipeline.training.dataloader). Micro-batches accumulate gradients (synchronised
only on the last one). Warmup then cosine or warmup-stable-decay, gradient clipping
(pipeline.training.optim), validation on fixed val windows every eval_interval steps; stops at
max_steps or after time_budget_s, whichever comes first. CUDA: bf16 autocast, TF32, fused AdamW,
torch.compile, and no wait for the device between steps (losses are read every train_run.log_interval
steps). CPU: float32.

Checkpoints (pipeline.training.checkpoint) go to train_run.checkpoint_dir every checkpoint_interval
steps, atomically; a new run with the same model, data and training params resumes from the
latest one and ends bit-identical (on CPU) to a run never interrupted. SIGTERM/SIGINT save a
checkpoint and stop.

Writes data/model/{best,last}.safetensors and config.json, metrics/train.json, and the curves
(loss, learning rate, gradient norm, tokens/s, MFU) through dvclive in metrics/train/.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.core import params as P
from pipeline.core.common import PipelineError, atomic_dir, read_json, run_main, sha256_file, write_json
from pipeline.core.params import ModelConfig
from pipeline.core.paths import MODEL_DIR, TOKENIZER, TOKENS_DIR, TRAIN_METRICS, TRAIN_TIMING
from pipeline.data.tokenizer import Tokenizer, load_tokens, token_files_fingerprint
from pipeline.model.model import build_model, count_parameters, flops_per_token
from pipeline.model.weights import copy_weights, save_weights
from pipeline.training.checkpoint import Checkpoints, Progress, fingerprint
from pipeline.training.curves import Curves
from pipeline.training.dataloader import fixed_batches, pair_sources, step_batches
from pipeline.training.distributed import Processes, any_rank, full_state, init_distributed, shutdown, wrap_model
from pipeline.training.hardware import CudaAutocast, check_fused_loss, peak_flops
from pipeline.training.loop import (
    PendingSteps,
    StopOnSignals,
    batch_plan,
    check_long_enough,
    checkpoint_due,
    gpu_memory_tried,
    patience_spent,
    source_mixture,
    stop_reason,
)
from pipeline.training.loss import OutputLayer
from pipeline.training.optim import estimate_loss, lr_at, make_optimizer, train_step


def main() -> None:
    params = P.load()
    cfg, t = params.model, params.train
    procs, device = init_distributed(t)
    try:
        check_fused_loss(t.fused_loss, device)  # before any work: never a silent fallback
        with StopOnSignals() as stop:
            run = setup(cfg, t, params.train_run, procs, device)
            stopped, curves = train(run, stop)
            finish(run, stopped, stop, curves)
    except torch.cuda.OutOfMemoryError as e:
        raise PipelineError(
            f"train: CUDA out of memory with micro-batches of {t.batch_size} x {cfg.block_size} "
            f"tokens ({gpu_memory_tried(e, device)}); lower train.batch_size (train.batch_tokens "
            f"keeps the global batch by accumulating), or model.block_size / model.n_embd"
        ) from None
    finally:
        shutil.rmtree(Curves.scratch_of(os.getpid()), ignore_errors=True)  # a failed run's curves: never published
        shutdown(procs)


@dataclass
class Run:
    """Everything the loop works with, made by setup()."""

    cfg: ModelConfig
    t: P.Train
    train_run: P.TrainRun  # checkpoints and logging: how it runs, not what it computes
    procs: Processes
    device: torch.device
    train_data: object  # the memory-mapped train tokens
    ignored: dict  # per split: targets that do not count (pairs' sources, with pair_loss: target)
    mixture: tuple | None  # how windows are drawn by source (None: uniformly)
    accum: int  # micro-batches per step on each process
    global_tokens: int  # tokens per optimizer step over all processes
    vocab_size: int
    tokenizer_sha: str
    raw_model: torch.nn.Module  # the model itself (its weights are what is saved)
    model: torch.nn.Module  # the same, wrapped for several processes and compiled where asked
    sync: object  # a context that defers the gradient all-reduce to the last micro-batch
    optimizer: torch.optim.Optimizer
    autocast: object
    checkpoints: Checkpoints
    progress: Progress
    best_weights: dict | None
    val_batches: list
    train_eval_batches: list
    n_params: int
    flops_tok: int
    peak: float | None  # the matmul rate MFU is measured against (None: unknown, or not the main process)
    stop_reason: str = ""  # what ended training: max_steps, time_budget_s or patience (metrics/train.json)


def setup(cfg: ModelConfig, t: P.Train, train_run: P.TrainRun, procs: Processes, device: torch.device) -> Run:
    """Data, and how a global batch is split into micro-batches on each process; the model, its
    optimizer, and the state of an interrupted run if there is one."""
    train_data, val_data = load_tokens("train"), load_tokens("val")
    train_meta = read_json(TOKENS_DIR / "train.json")
    vocab_size = train_meta.get("vocab_size")
    tokenizer = Tokenizer(TOKENIZER)
    if vocab_size != tokenizer.vocab_size:
        raise PipelineError(
            f"{TOKENS_DIR}/train.json: vocabulary {vocab_size} but {TOKENIZER} has "
            f"{tokenizer.vocab_size} pieces; re-run the tokenize stage"
        )
    mixture, absent = source_mixture(t, train_meta["sources"])
    for name in absent if procs.main else ():  # said once, by the main process
        print(
            f"train: train.source_weights.{name}: no source of that name in {TOKENS_DIR}/train.json; ignored",
            flush=True,
        )
    ignored = {"train": None, "val": None}
    if t.pair_loss == "target":
        ignored = {
            split: pair_sources(data, tokenizer.src_id, tokenizer.tgt_id)
            for split, data in (("train", train_data), ("val", val_data))
        }
    check_long_enough(cfg, train=train_data, val=val_data)
    accum, global_tokens = batch_plan(cfg, t, procs)
    tokenizer_sha = sha256_file(TOKENIZER)

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)  # the same initial weights on every process
    raw_model = build_model(cfg, vocab_size).to(device)
    raw_model.loss = OutputLayer(t.fused_loss)  # checked in main(): liger needs CUDA and the [gpu] extra
    n_params, flops_tok = count_parameters(raw_model), flops_per_token(raw_model, cfg.block_size)
    torch.manual_seed(t.seed + procs.rank)  # dropout differs per process
    model, sync = wrap_model(raw_model, procs, t, device)
    optimizer = make_optimizer(model, t, device)
    data_sha = token_files_fingerprint(tokenizer_sha)
    fp = fingerprint(cfg, t, vocab_size, data_sha, procs.world)
    checkpoints = Checkpoints(cfg, t, train_run, vocab_size, fp, procs, device)
    progress, best_weights = checkpoints.resume(raw_model, optimizer)
    if t.compile is True or (t.compile == "auto" and cuda):
        model = torch.compile(model)
    if procs.main and not progress.peak_flops:  # measured once per run: a resumed run keeps its denominator
        progress.peak_flops = peak_flops(device) or 0.0
    fixed = (cfg.block_size, t.batch_size, t.eval_batches, t.seed)
    return Run(
        cfg=cfg,
        t=t,
        train_run=train_run,
        procs=procs,
        device=device,
        train_data=train_data,
        ignored=ignored,
        mixture=mixture,
        accum=accum,
        global_tokens=global_tokens,
        vocab_size=vocab_size,
        tokenizer_sha=tokenizer_sha,
        raw_model=raw_model,
        model=model,
        sync=sync,
        optimizer=optimizer,
        autocast=CudaAutocast(t.attention) if cuda else nullcontext(),
        checkpoints=checkpoints,
        progress=progress,
        best_weights=best_weights,
        val_batches=fixed_batches(val_data, *fixed, 1, device, ignored["val"]),
        train_eval_batches=fixed_batches(train_data, *fixed, 2, device, ignored["train"]),
        n_params=n_params,
        flops_tok=flops_tok,
        peak=progress.peak_flops or None if procs.main else None,
    )


def train(run: Run, stop: StopOnSignals) -> tuple[bool, Curves | None]:
    """The loop: evaluate, step, checkpoint, until max_steps, the time budget or a signal. Returns
    whether a signal stopped it, and the curves (on the main process)."""
    cfg, t, procs, progress = run.cfg, run.t, run.procs, run.progress
    if procs.main:
        print(
            f"train: {cfg.arch} with {run.n_params:,} parameters on {procs.world} x {run.device.type}; up to "
            f"{t.max_steps} steps of {run.global_tokens:,} tokens ({run.accum} micro-batch(es) of {t.batch_size}x"
            f"{cfg.block_size} per process){f', at most {t.time_budget_s:g} s' if t.time_budget_s else ''}",
            flush=True,
        )
    curves = Curves(progress.step, run.checkpoints.resumed_from) if procs.main else None
    live = curves.live if curves else None
    bar = tqdm(
        total=t.max_steps, initial=progress.step, desc="train", unit="step", disable=None if procs.main else True
    )
    interval = run.train_run.log_interval or (25 if run.device.type == "cuda" else 1)
    pending = PendingSteps(interval, run.global_tokens, run.flops_tok, run.peak, run.train_run.checkpoint_dir)
    while True:
        step = progress.step
        time_up = bool(t.time_budget_s) and progress.train_seconds + pending.elapsed() >= t.time_budget_s
        # every process stops at the same step
        stopped, time_up, spent = any_rank(procs, stop.requested, time_up, patience_spent(progress, t))
        if stopped:
            pending.read(progress, procs, live, bar, t)
            break
        run.stop_reason = stop_reason(step, t, time_up, spent)  # spent: resumed from the end of a stopped run
        last = bool(run.stop_reason)

        # Evaluate: loss on fixed val and train batches; keep the best weights; stop once
        # train.patience evaluations in a row have not bettered the val loss
        if step % t.eval_interval == 0 or last:
            pending.read(progress, procs, live, bar, t)
            evaluate(run, live)
            (spent,) = any_rank(procs, patience_spent(progress, t))
            run.stop_reason = run.stop_reason or ("patience" if spent else "")
        if run.stop_reason:
            break

        # One optimizer step: forward and backward over the micro-batches, clip, update. Nothing
        # here waits for the device: the loss and gradient norm are read every log_interval steps.
        pending.start()
        lr = lr_at(step, t, (progress.train_seconds + pending.elapsed()) / t.time_budget_s if t.time_budget_s else 0.0)
        micro_batches = step_batches(
            run.train_data,
            cfg.block_size,
            t.batch_size,
            run.accum,
            t.seed,
            step,
            procs.rank,
            procs.world,
            run.device,
            run.ignored["train"],
            run.mixture,
        )
        loss, grad_norm = train_step(run.model, run.optimizer, micro_batches, lr, t.grad_clip, run.autocast, run.sync)
        pending.add(step, lr, loss, grad_norm)
        progress.step = step + 1
        bar.update()
        if pending.due() or checkpoint_due(progress.step, run.train_run):
            pending.read(progress, procs, live, bar, t)
        if checkpoint_due(progress.step, run.train_run):
            save_checkpoint(run, curves)
    bar.close()
    if stopped or not checkpoint_due(progress.step, run.train_run):  # unless the interval just wrote it
        save_checkpoint(run, curves)
    return stopped, curves


def evaluate(run: Run, live) -> None:
    """The loss on the fixed val and train batches, logged; the best weights so far kept."""
    progress = run.progress
    progress.last_val_loss = estimate_loss(run.model, run.val_batches, run.autocast)
    progress.last_train_loss = estimate_loss(run.model, run.train_eval_batches, run.autocast)
    if live:
        live.log_metric("train/loss", progress.last_train_loss)
        live.log_metric("val/loss", progress.last_val_loss)
        tqdm.write(
            f"step {progress.step:>6}: train loss {progress.last_train_loss:.4f}, val loss {progress.last_val_loss:.4f}"
        )
    again = progress.step == progress.last_eval_step  # resumed from a checkpoint saved after this evaluation
    progress.last_eval_step = progress.step
    if progress.last_val_loss < progress.best_val_loss:
        progress.best_val_loss, progress.best_step = progress.last_val_loss, progress.step
        progress.evals_without_improvement = 0
        run.best_weights = copy_weights(full_state(run.raw_model, None, run.procs, run.t)[0])
    elif not again:  # train.patience counts each evaluation once
        progress.evals_without_improvement += 1


def save_checkpoint(run: Run, curves: Curves | None) -> None:
    run.checkpoints.save(run.raw_model, run.optimizer, run.progress, run.best_weights, curves and curves.scratch)
    if curves:
        curves.publish()  # the curves a rerun resumes, beside the checkpoint it resumes from


def finish(run: Run, stopped: bool, stop: StopOnSignals, curves: Curves | None) -> None:
    """A run stopped by a signal ends with one line (its checkpoint saved); a finished one writes
    data/model/, then publishes its curves and writes the metrics."""
    progress, t = run.progress, run.t
    if stopped:
        if curves:
            curves.end()
        signum = stop.signal or signal.SIGTERM  # another process received it
        raise PipelineError(
            f"train: stopped by {signal.Signals(signum).name} at step {progress.step}; checkpoint "
            f"saved in {run.train_run.checkpoint_dir}, run again (dvc repro) to resume",
            exit_code=128 + signum,
        )
    final_weights, _ = full_state(run.raw_model, None, run.procs, t)  # FSDP gathers on every process
    if run.procs.main:
        save_model(run, final_weights)
    if curves:
        curves.end()
    if run.procs.main:
        write_summary(run.cfg, progress, run.n_params, run.procs, run.flops_tok, run.peak, run.device, run.stop_reason)


def save_model(run: Run, final_weights: dict) -> None:
    """data/model/: the last and the best weights, and the config that made them."""
    progress, cfg = run.progress, run.cfg
    with atomic_dir(MODEL_DIR) as out:
        save_weights(
            final_weights,
            cfg,
            out / "last.safetensors",
            vocab_size=run.vocab_size,
            step=progress.step,
            tokenizer_sha256=run.tokenizer_sha,
        )
        save_weights(
            run.best_weights if run.best_weights is not None else final_weights,
            cfg,
            out / "best.safetensors",
            vocab_size=run.vocab_size,
            step=progress.best_step,
            val_loss=progress.best_val_loss,
            tokenizer_sha256=run.tokenizer_sha,
        )
        # The params that made these weights (train_run changes nothing in them)
        train_params = P.as_dict(run.t)
        write_json(
            out / "config.json",
            {
                "model": P.as_dict(cfg),
                "train": train_params,
                "vocab_size": run.vocab_size,
                "parameters": run.n_params,
                "processes": run.procs.world,
                "best_step": progress.best_step,
                "tokenizer_sha256": run.tokenizer_sha,
            },
        )


def write_summary(
    cfg: ModelConfig,
    progress,
    n_params: int,
    procs: Processes,
    flops_tok: int,
    peak: float | None,
    device: torch.device,
    stopped: str = "max_steps",
) -> None:
    tokens_per_second = progress.tokens_seen / max(progress.train_seconds, 1e-9)
    mfu = flops_tok * tokens_per_second / peak if peak else None
    # wall-clock figures apart (metrics/timing/, not a DVC metric): they differ on every run and
    # would bury the figures that matter in `dvc metrics diff`
    write_json(
        TRAIN_TIMING,
        {
            "tokens_per_second": round(tokens_per_second, 1),
            "train_seconds": round(progress.train_seconds, 1),
            "mfu": None if mfu is None else round(mfu, 4),
        },
    )
    write_json(
        TRAIN_METRICS,
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
            "stopped": stopped,  # the knob that ended training: max_steps, time_budget_s or patience
            "evals_without_improvement": progress.evals_without_improvement,  # in a row, at the end
            "device": device.type,
        },
    )
    early = f"stopped by train.patience at step {progress.step}; " if stopped == "patience" else ""
    print(
        f"train: {early}val loss {progress.last_val_loss:.4f} (best {progress.best_val_loss:.4f} at step "
        f"{progress.best_step}), {tokens_per_second:,.0f} tokens/s"
        f"{'' if mfu is None else f', MFU {mfu:.0%}'} -> {MODEL_DIR}"
    )


if __name__ == "__main__":
    run_main(main)
