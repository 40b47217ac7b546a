"""Resumable checkpoints: train_run.checkpoint_dir/step_NNNNNNN/ holds the weights (safetensors,
pipeline.model.weights), the best weights so far, and state.pt (optimizer, `Progress`, RNG states,
the run's fingerprint) in a form that loads with torch.load(weights_only=True). `Checkpoints`
saves them atomically, keeps the newest few, and resumes from the newest one when it was made by a
compatible run (every training param the same but those of params.RESUMABLE).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.core import params as P
from pipeline.core.common import PipelineError, first_line, remove_stale
from pipeline.core.params import ModelConfig
from pipeline.model.weights import load_weights, save_weights
from pipeline.training.curves import CURVES
from pipeline.training.distributed import Processes, barrier, full_state, gather_objects, load_full_state

KEEP_CHECKPOINTS = 2


@dataclass
class Progress:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done; the loader's position (batches are keyed by step)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = float("inf")
    best_step: int = -1
    evals_without_improvement: int = 0  # evaluations in a row since the best val loss (train.patience)
    last_eval_step: int = -1  # a resumed run evaluates this step again (its curves' rows): not counted twice
    last_val_loss: float = float("nan")
    last_train_loss: float = float("nan")
    rng: list = field(default_factory=list)  # per rank: torch CPU RNG state (and CUDA's)
    peak_flops: float = 0.0  # the matmul rate MFU is measured against, kept so a resumed run's MFU is the run's


def fingerprint(m: ModelConfig, t: P.Train, vocab_size: int, data_sha: str, world: int) -> dict:
    """What must match for a checkpoint to resume: model, data, and every training param that matters."""
    train = {k: v for k, v in P.as_dict(t).items() if k not in P.RESUMABLE}
    return {"model": P.as_dict(m), "vocab_size": vocab_size, "data": data_sha, "train": train, "processes": world}


def why_incompatible(saved: dict, now: dict) -> str | None:
    if saved.get("model") != now["model"]:
        keys = sorted(k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k])
        return "a different model (" + ", ".join(f"model.{k}" for k in keys) + ")"
    if saved.get("vocab_size") != now["vocab_size"] or saved.get("data") != now["data"]:
        return "different token files (vocabulary or data changed)"
    if saved.get("train") != now["train"]:
        keys = sorted(k for k in now["train"] if saved.get("train", {}).get(k) != now["train"][k])
        return (
            "different training params ("
            + ", ".join(f"train.{k}: {saved.get('train', {}).get(k)!r} -> {now['train'][k]!r}" for k in keys)
            + ")"
        )
    if saved.get("processes") != now["processes"]:
        return f"{saved.get('processes')} processes, now {now['processes']}"
    return None


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, newest first (a folder appears only once fully written)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(
    folder: Path,
    weights: dict,
    best: dict | None,
    opt_state: dict,
    progress: Progress,
    fp: dict,
    m: ModelConfig,
    t: P.Train,
    vocab_size: int,
    replaced: list[Path] = (),
    curves: Path | None = None,
) -> Path:
    """Write step_NNNNNNN/ atomically (a temporary folder renamed), with a copy of the training
    `curves` so far (what a resumed run continues); then remove the `replaced` checkpoints (an
    earlier run's) and keep the newest few."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{progress.step:07d}"
    for stale in folder.glob(".step_*.tmp-*"):  # a killed run's half-written checkpoint
        remove_stale(folder, stale.name.rsplit(".tmp-", 1)[0])
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "optimizer": opt_state,
        "progress": progress.__dict__,
        "fingerprint": json.dumps(fp, sort_keys=True),
        # Both are functions of the step (and of the training time under a budget), kept for the reader.
        "loader": {"windows": "random, keyed by (seed, 0, step)", "seed": t.seed, "next_step": progress.step},
        "scheduler": {
            "schedule": t.schedule,
            "next_step": progress.step,
            "time_fraction": progress.train_seconds / t.time_budget_s if t.time_budget_s else 0.0,
        },
    }
    buffer = io.BytesIO()  # serialised here: torch's zip writer would report a full disk as "unexpected pos ..."
    torch.save(state, buffer)
    tmp.mkdir()
    try:
        save_weights(weights, m, tmp / "model.safetensors", vocab_size=vocab_size, step=progress.step)
        if best is not None:
            save_weights(best, m, tmp / "best.safetensors", vocab_size=vocab_size, step=progress.best_step)
        if curves is not None and curves.is_dir():
            shutil.copytree(curves, tmp / CURVES)
        try:
            (tmp / "state.pt").write_bytes(buffer.getvalue())
        except OSError as e:
            raise PipelineError(
                f"{tmp / 'state.pt'}: cannot write the checkpoint ({e.strerror or first_line(e)})"
            ) from None
        for f in (p for p in tmp.rglob("*") if p.is_file()):  # on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: no half-written checkpoint left behind
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in replaced:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(folder)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict | None, dict, Progress, dict]:
    """(weights, best weights or None, optimizer state, progress, fingerprint); PipelineError if unreadable."""
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would be a second line
            warnings.simplefilter("ignore")
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        weights = load_weights(path / "model.safetensors")[0].state_dict()
        best = load_weights(path / "best.safetensors")[0].state_dict() if (path / "best.safetensors").exists() else None
        progress = Progress(**state["progress"])
        fp = json.loads(state["fingerprint"])
        optimizer = state["optimizer"]
    except Exception as e:  # truncated, corrupt or foreign files: one line, never a torch traceback
        raise PipelineError(
            f"{path}: not a readable checkpoint ({first_line(e)}); delete it, or set train_run.resume: never"
        ) from None
    return weights, best, optimizer, progress, fp


@dataclass
class Checkpoints:
    """The resumable checkpoints of one training run: resume from the newest, save a new one."""

    model_cfg: ModelConfig
    train_cfg: P.Train
    train_run: P.TrainRun  # where the checkpoints go, and whether to resume
    vocab_size: int
    fingerprint: dict
    procs: Processes
    device: torch.device
    replaced: list[Path] = field(default_factory=list)  # an earlier run's checkpoints, gone at the first save
    resumed_from: Path | None = None

    @property
    def folder(self) -> Path:
        return Path(self.train_run.checkpoint_dir)

    def resume(self, model, optimizer) -> tuple[Progress, dict | None]:
        """Load the newest compatible checkpoint into `model` and `optimizer` (and the RNG state);
        return its progress and best weights. A fresh start (nothing compatible, or train_run.resume:
        never) returns a new Progress; the old checkpoints go when its first checkpoint is saved
        (a fresh run that fails before, on a full disk, leaves them as they were)."""
        found = list_checkpoints(self.folder) if self.train_run.resume != "never" else []
        progress, best_weights, resumed = Progress(), None, False
        if found:
            weights, saved_best, opt_state, saved, saved_fp = read_checkpoint(found[0])
            why = why_incompatible(saved_fp, self.fingerprint)
            if why is None:
                load_full_state(model, optimizer, weights, opt_state, self.procs, self.train_cfg)
                progress, best_weights, resumed = saved, saved_best, True
                self.resumed_from = found[0]
                if len(progress.rng) == self.procs.world:
                    rng = progress.rng[self.procs.rank]
                    torch.set_rng_state(rng["cpu"])
                    if self.device.type == "cuda" and rng.get("cuda") is not None:
                        torch.cuda.set_rng_state(rng["cuda"], self.device)
                if self.procs.main:
                    print(
                        f"train: resuming from {found[0]} (step {progress.step} of {self.train_cfg.max_steps})",
                        flush=True,
                    )
            elif self.train_run.resume == "strict":
                raise PipelineError(
                    f"{found[0]}: cannot resume, it was made with {why} (train_run.resume: strict); "
                    f"delete {self.folder} or set train_run.resume: auto to start fresh"
                )
            elif self.procs.main:
                print(f"train: not resuming {found[0]}: it was made with {why}; starting fresh", flush=True)
        barrier(self.procs)  # every process has read the checkpoint
        if not resumed:  # a fresh start replaces whatever checkpoints were there, once it has one
            self.replaced = list_checkpoints(self.folder)
        return progress, best_weights

    def save(self, model, optimizer, progress: Progress, best_weights: dict | None, curves: Path | None = None) -> None:
        """A checkpoint of this step, with the `curves` folder so far (every process takes part:
        FSDP gathers, RNG states are collected)."""
        weights, opt_state = full_state(model, optimizer, self.procs, self.train_cfg)
        cuda = self.device.type == "cuda"
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}
        progress.rng = gather_objects(self.procs, rng)
        if self.procs.main:
            save_checkpoint(
                self.folder,
                weights,
                best_weights,
                opt_state,
                progress,
                self.fingerprint,
                self.model_cfg,
                self.train_cfg,
                self.vocab_size,
                self.replaced,
                curves,
            )
            self.replaced = []
        barrier(self.procs)
