"""The training curves of metrics/train/ (dvclive), written so that a failed run never truncates
them: logged into a scratch copy, saved with each checkpoint, published after it and at the end."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

from pipeline.core.common import atomic_dir, first_line, read_json, remove_stale
from pipeline.core.paths import LIVE_DIR

CURVES = "curves"  # a checkpoint's copy of the training curves up to its step


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
            try:
                self.live = Live(dir=str(self.scratch), dvcyaml=None, save_dvc_exp=False, report=None, resume=step > 0)
            except Exception as e:  # dvclive reads the git repository: one with no commit yet fails it
                print(f"train: curves written without dvclive ({first_line(e)})", flush=True)
                self.live = TsvLive(self.scratch, step)
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
