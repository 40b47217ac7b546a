"""The pieces of the training loop (pipeline/train.py), in the order it uses them: the plan of a
global batch, the source mixture, the steps whose losses are still on the device, and stopping on
a signal."""

from __future__ import annotations

import math
import re
import signal
import time

import torch

from pipeline.core import params as P
from pipeline.core.common import PipelineError
from pipeline.core.params import ModelConfig
from pipeline.core.paths import MODEL_DIR, TOKENS_DIR
from pipeline.training.curves import log_step
from pipeline.training.distributed import Processes, mean_over_ranks


def gpu_memory_tried(error: Exception, device: torch.device) -> str:
    """What an out-of-memory error tried: the allocation, beside the GPU's memory."""
    tried = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    said = f"tried to allocate {tried.group(1)}" if tried else "an allocation failed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return said
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"{said} with {peak:.1f} GiB allocated at the peak, of {total:.0f} GiB"


def check_long_enough(cfg: ModelConfig, **splits) -> None:
    for name, data in splits.items():
        if len(data) < cfg.block_size + 2:
            raise PipelineError(
                f"model.block_size: {cfg.block_size} is too large for {TOKENS_DIR}/{name}.bin "
                f"({len(data)} tokens); lower it or add text"
            )


def source_mixture(t: P.Train, sources: dict[str, dict]) -> tuple[tuple[dict, dict] | None, list[str]]:
    """What step_batches needs to draw windows by train.source_weights (None: uniformly), and the
    weighted names the train split lacks: whatever its value, such a weight is ignored (the default
    corpus's own on another corpus, or a misspelt name), and train says so."""
    absent = [name for name in t.source_weights if name not in sources]
    weights = {k: w for k, w in t.source_weights.items() if k in sources}
    if not weights:
        return None, absent
    if not any(weights.get(name, 1.0) > 0 for name in sources):
        raise PipelineError("train.source_weights: every source of the train split has weight 0")
    return (sources, weights), absent


def batch_plan(cfg: ModelConfig, t: P.Train, procs: Processes) -> tuple[int, int]:
    """(micro-batches per step on each process, tokens per optimizer step over all processes)."""
    micro_tokens = t.batch_size * cfg.block_size * procs.world
    global_tokens = t.batch_tokens or micro_tokens
    if global_tokens % micro_tokens:
        raise PipelineError(
            f"train.batch_tokens: {t.batch_tokens} is not a multiple of batch_size x block_size x "
            f"processes = {t.batch_size} x {cfg.block_size} x {procs.world} = {micro_tokens}"
        )
    return global_tokens // micro_tokens, global_tokens


def patience_spent(progress, t: P.Train) -> bool:
    """Whether train.patience evaluations in a row have not bettered the best val loss (0: never)."""
    return bool(t.patience) and progress.evals_without_improvement >= t.patience


def stop_reason(step: int, t: P.Train, time_up: bool, spent: bool) -> str:
    """Why training ends at `step`, as the knob that ends it ("" while it goes on)."""
    if step >= t.max_steps:
        return "max_steps"
    if time_up:
        return "time_budget_s"
    return "patience" if spent else ""


def checkpoint_due(step: int, r: P.TrainRun) -> bool:
    """Whether `step` ends a train_run.checkpoint_interval (0: only the final checkpoint)."""
    return bool(r.checkpoint_interval) and step % r.checkpoint_interval == 0


class PendingSteps:
    """Training steps whose loss and gradient norm are still on the device.

    They are read together (one wait for the device, one all-reduce across processes) every
    `interval` steps and before an evaluation, a checkpoint or the end: then each step's loss is
    checked, logged to the curves, and the wall-clock time since the first of them, which covers
    exactly their computation, is added to the training time and shared among them for tokens/s.
    """

    def __init__(self, interval: int, global_tokens: int, flops_tok: int, peak: float | None, checkpoint_dir: str):
        self.interval, self.global_tokens, self.flops_tok, self.peak = interval, global_tokens, flops_tok, peak
        self.checkpoint_dir = checkpoint_dir  # named when the loss is lost
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
                    f"raise train.warmup_steps; the last good checkpoint in {self.checkpoint_dir} "
                    f"and {MODEL_DIR} were left as they were"
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
