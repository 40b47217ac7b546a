"""pipeline.training.checkpoint, in this process: a checkpoint read back is the one saved, what
makes a checkpoint incompatible, which checkpoints are kept, and that a damaged checkpoint or a
failed save is one clean error that leaves every checkpoint already written as it was.

The end-to-end trainings (tests/test_train_engine.py) show that a killed run resumes exactly;
these tests pin the module's own promises on a model of a few thousand weights."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import pathlib
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.core import params as P
from pipeline.core.common import PipelineError
from pipeline.model.model import build_model
from pipeline.training.checkpoint import (
    KEEP_CHECKPOINTS,
    Checkpoints,
    Progress,
    fingerprint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    why_incompatible,
)
from pipeline.training.curves import CURVES
from pipeline.training.distributed import Processes
from pipeline.training.optim import make_optimizer

VOCAB = 32
MODEL = dataclasses.replace(P.ModelConfig(), n_layer=1, n_head=2, n_embd=16, block_size=8)
TRAIN = dataclasses.replace(P.Train(), device="cpu")
CPU = torch.device("cpu")


def stepped(seed: int = 0, steps: int = 1):
    """A tiny GPT and its optimizer after `steps` optimizer steps: every optimizer state filled."""
    torch.manual_seed(seed)
    model = build_model(MODEL, VOCAB)
    optimizer = make_optimizer(model, TRAIN, CPU)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
    return model, optimizer


def fp(m: P.ModelConfig = MODEL, t: P.Train = TRAIN, vocab: int = VOCAB, data: str = "sha", world: int = 1) -> dict:
    return fingerprint(m, t, vocab, data, world)


def save(folder: Path, step: int, model=None, optimizer=None, **kw) -> Path:
    if model is None:
        model, optimizer = stepped()
    kw.setdefault("best", None)
    return save_checkpoint(
        folder,
        model.state_dict(),
        kw.pop("best"),
        optimizer.state_dict(),
        kw.pop("progress", Progress(step=step)),
        kw.pop("fp", fp()),
        MODEL,
        TRAIN,
        VOCAB,
        **kw,
    )


def same(a, b) -> bool:
    """Nested dicts, lists and tensors equal (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def files(folder: Path) -> dict[str, bytes]:
    """Every entry under `folder` (folders too, so a left-over empty one shows), with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- save and read -------------------------------------------------------------------------------


def test_a_checkpoint_reads_back_the_weights_optimizer_state_progress_and_fingerprint(tmp_path):
    model, optimizer = stepped(steps=2)
    best, _ = stepped(seed=1)
    progress = Progress(
        step=7,
        tokens_seen=1234,
        train_seconds=5.5,
        best_val_loss=2.25,
        best_step=5,
        evals_without_improvement=1,
        last_eval_step=5,
        last_val_loss=2.5,
        last_train_loss=2.0,
        rng=[{"cpu": torch.get_rng_state(), "cuda": None}],
        peak_flops=1.5e12,
    )
    path = save(tmp_path, 7, model, optimizer, best=best.state_dict(), progress=progress)
    assert path == tmp_path / "step_0000007"

    weights, saved_best, opt_state, saved_progress, saved_fp = read_checkpoint(path)
    assert same(weights, model.state_dict())
    assert same(saved_best, best.state_dict())
    assert same(opt_state, optimizer.state_dict())
    assert same(dataclasses.asdict(saved_progress), dataclasses.asdict(progress))
    assert saved_fp == fp() and why_incompatible(saved_fp, fp()) is None


def test_a_fresh_progress_with_infinite_and_nan_losses_and_no_best_weights_reads_back(tmp_path):
    path = save(tmp_path, 0)
    _, best, _, progress, _ = read_checkpoint(path)
    assert best is None
    assert progress.best_val_loss == math.inf and math.isnan(progress.last_val_loss)
    assert same(dataclasses.asdict(progress), dataclasses.asdict(Progress()))


def test_the_weights_load_into_a_new_model_and_optimizer_that_then_take_the_same_step(tmp_path):
    """What a resume needs: the state read back continues the run bit for bit."""
    model, optimizer = stepped(steps=2)
    path = save(tmp_path, 2, model, optimizer)
    weights, _, opt_state, _, _ = read_checkpoint(path)
    other, other_optimizer = stepped(seed=5)
    other.load_state_dict(weights)
    other_optimizer.load_state_dict(opt_state)
    for m, o in ((model, optimizer), (other, other_optimizer)):
        o.zero_grad()
        sum(p.square().sum() for p in m.parameters()).backward()
        o.step()
    assert same(other.state_dict(), model.state_dict())


def test_the_training_curves_so_far_are_saved_with_the_checkpoint(tmp_path):
    curves = tmp_path / "scratch"
    (curves / "val").mkdir(parents=True)
    (curves / "val" / "loss.tsv").write_text("step\tloss\n10\t2.5\n", encoding="utf-8")
    with_curves = save(tmp_path / "ckpt", 10, curves=curves)
    assert (with_curves / CURVES / "val" / "loss.tsv").read_text(encoding="utf-8") == "step\tloss\n10\t2.5\n"
    without = save(tmp_path / "ckpt", 11, curves=tmp_path / "nowhere")  # no curves yet: none saved
    assert not (without / CURVES).exists()


# --- compatibility -------------------------------------------------------------------------------


def changed(value):
    """Another value of the same kind (the fingerprint is not validated, any other value will do)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, dict):
        return {**value, "other": 1.0}
    if isinstance(value, list):
        return [*value, "other"]
    raise AssertionError(f"no other value for {value!r}")


TRAIN_KNOBS = [f.name for f in dataclasses.fields(P.Train)]


@pytest.mark.parametrize("knob", [k for k in TRAIN_KNOBS if k not in P.RESUMABLE])
def test_every_training_knob_that_changes_the_run_is_named_with_both_values(knob):
    old = getattr(TRAIN, knob)
    why = why_incompatible(fp(), fp(t=dataclasses.replace(TRAIN, **{knob: changed(old)})))
    assert why == f"different training params (train.{knob}: {old!r} -> {changed(old)!r})"


@pytest.mark.parametrize("knob", sorted(P.RESUMABLE))
def test_a_resumable_training_knob_does_not_block_the_resume(knob):
    t = dataclasses.replace(TRAIN, **{knob: changed(getattr(TRAIN, knob))})
    assert why_incompatible(fp(), fp(t=t)) is None


def test_operational_train_run_knobs_are_not_part_of_the_fingerprint():
    """checkpoint_dir, resume, intervals: train_run is a group of its own, never fingerprinted."""
    assert set(fp()) == {"model", "vocab_size", "data", "train", "processes"}
    assert not {f.name for f in dataclasses.fields(P.TrainRun)} & set(fp()["train"])


@pytest.mark.parametrize("knob", [f.name for f in dataclasses.fields(P.ModelConfig)])
def test_every_model_knob_is_named(knob):
    m = dataclasses.replace(MODEL, **{knob: changed(getattr(MODEL, knob))})
    assert why_incompatible(fp(), fp(m=m)) == f"a different model (model.{knob})"


def test_several_differing_model_knobs_are_named_in_order_and_before_the_training_ones():
    m = dataclasses.replace(MODEL, n_layer=2, n_embd=32)
    why = why_incompatible(fp(), fp(m=m, t=dataclasses.replace(TRAIN, lr=1.0)))
    assert why == "a different model (model.n_embd, model.n_layer)"


@pytest.mark.parametrize(
    "now, expected",
    [
        (fp(vocab=64), "different token files (vocabulary or data changed)"),
        (fp(data="other sha"), "different token files (vocabulary or data changed)"),
        (fp(world=2), "1 processes, now 2"),
    ],
)
def test_other_token_files_or_another_process_count_are_incompatible(now, expected):
    assert why_incompatible(fp(), now) == expected


# --- which checkpoints there are, and which are kept ---------------------------------------------


def test_list_checkpoints_is_newest_step_first_and_ignores_anything_else(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for name in ("step_0000002", "step_0000010", "step_0000001", "step_99", "step_100"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_0000050").write_text("a file, not a checkpoint")
    for foreign in ("step_", "step_abc", "step_12x", "steps_0000070", ".step_0000090.tmp-123", "notes"):
        (tmp_path / foreign).mkdir()
    (tmp_path / "README.txt").write_text("x")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_100", "step_99", "step_0000010", "step_0000002", "step_0000001"]


def test_only_the_newest_checkpoints_are_kept_and_foreign_files_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_draft").mkdir()
    model, optimizer = stepped()
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer)
        kept = [p.name for p in list_checkpoints(tmp_path)]
        assert kept == [f"step_{s:07d}" for s in range(step, max(0, step - KEEP_CHECKPOINTS), -1)]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "step_draft").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_fresh_runs_first_checkpoint_replaces_an_earlier_runs_newer_ones(tmp_path):
    model, optimizer = stepped()
    old = [save(tmp_path, step, model, optimizer) for step in (50, 60)]
    save(tmp_path, 10, model, optimizer, replaced=old)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010"]


def test_saving_a_step_again_replaces_its_checkpoint(tmp_path):
    model, optimizer = stepped()
    save(tmp_path, 3, model, optimizer, progress=Progress(step=3, tokens_seen=1))
    save(tmp_path, 3, model, optimizer, progress=Progress(step=3, tokens_seen=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003"]
    assert read_checkpoint(tmp_path / "step_0000003")[3].tokens_seen == 2


def test_a_killed_runs_half_written_checkpoint_goes_and_a_live_runs_stays(tmp_path):
    dead = tmp_path / f".step_0000004.tmp-{dead_pid()}"
    live = tmp_path / f".step_0000004.tmp-{os.getppid()}"  # pytest's parent: alive
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    save(tmp_path, 4)
    assert not dead.exists() and live.is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004"]


# --- damaged checkpoints and failed saves --------------------------------------------------------


def assert_one_line_naming(error: PipelineError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: not a readable checkpoint ("), message
    assert "train_run.resume: never" in message, message


@pytest.mark.parametrize("damaged", ["state.pt", "model.safetensors", "best.safetensors"])
def test_a_truncated_checkpoint_file_is_one_line_naming_the_checkpoint(tmp_path, damaged):
    best, _ = stepped(seed=1)
    path = save(tmp_path, 5, best=best.state_dict())
    f = path / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(PipelineError) as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(None, id="state-missing"),
        pytest.param(b"", id="state-empty"),
        pytest.param({"optimizer": {}}, id="state-of-another-program"),
        pytest.param("newer-progress", id="progress-with-an-unknown-field"),
    ],
)
def test_a_foreign_or_incomplete_state_is_one_line_naming_the_checkpoint(tmp_path, state):
    path = save(tmp_path, 5)
    target = path / "state.pt"
    if state is None:
        target.unlink()
    elif isinstance(state, bytes):
        target.write_bytes(state)
    elif state == "newer-progress":
        saved = torch.load(target, weights_only=True)
        saved["progress"]["something_new"] = 1
        torch.save(saved, target)
    else:
        torch.save(state, target)
    with pytest.raises(PipelineError) as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path)


def test_a_save_that_fails_midway_leaves_every_checkpoint_as_it_was(tmp_path):
    """A failure after the model's weights are written (its best weights cannot be): no temporary
    folder left, the earlier checkpoints (the same step's included) and the replaced ones intact."""
    model, optimizer = stepped()
    earlier = tmp_path / "earlier"
    old = save(earlier, 90, model, optimizer)
    save(tmp_path, 1, model, optimizer)
    save(tmp_path, 2, model, optimizer)
    before = files(tmp_path)
    for step in (2, 3):
        with pytest.raises(AttributeError):
            save(tmp_path, step, model, optimizer, best={"wte.weight": "not a tensor"}, replaced=[old])
    assert files(tmp_path) == before


def test_a_full_disk_when_writing_the_state_is_one_line_and_leaves_every_checkpoint_as_it_was(tmp_path, monkeypatch):
    model, optimizer = stepped()
    save(tmp_path, 1, model, optimizer)
    before = files(tmp_path)
    write_bytes = pathlib.Path.write_bytes

    def full(self, data):
        if self.name == "state.pt":
            write_bytes(self, data[: len(data) // 2])  # what fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    with pytest.raises(PipelineError) as info:
        save(tmp_path, 2, model, optimizer)
    message = str(info.value)
    assert "\n" not in message and "state.pt: cannot write the checkpoint (No space left on device)" in message
    assert files(tmp_path) == before


# --- Checkpoints: resume from the newest, or start fresh -----------------------------------------


def checkpoints(folder: Path, resume: str = "auto", **fp_kw) -> Checkpoints:
    run = dataclasses.replace(P.TrainRun(), checkpoint_dir=str(folder), resume=resume)
    return Checkpoints(MODEL, TRAIN, run, VOCAB, fp(**fp_kw), Processes(), CPU)


def test_resume_loads_the_newest_checkpoint_into_the_model_and_optimizer_and_restores_the_rng(tmp_path, capsys):
    model, optimizer = stepped(steps=1)
    cks = checkpoints(tmp_path)
    assert same(dataclasses.asdict(cks.resume(model, optimizer)[0]), dataclasses.asdict(Progress()))  # nothing yet
    best, _ = stepped(seed=3)
    cks.save(model, optimizer, Progress(step=1), None)
    optimizer.zero_grad()
    sum(p.square().sum() for p in model.parameters()).backward()
    optimizer.step()
    cks.save(model, optimizer, Progress(step=2, best_step=1), best.state_dict())
    expected_draw = torch.rand(4)  # the RNG state saved with step 2 gives this next
    capsys.readouterr()

    torch.manual_seed(12345)
    fresh_model, fresh_optimizer = stepped(seed=9)
    again = checkpoints(tmp_path)
    progress, best_weights = again.resume(fresh_model, fresh_optimizer)
    assert torch.equal(torch.rand(4), expected_draw)
    assert progress.step == 2 and progress.best_step == 1 and again.resumed_from == tmp_path / "step_0000002"
    assert same(fresh_model.state_dict(), model.state_dict())
    assert same(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert same(best_weights, best.state_dict())
    assert f"train: resuming from {tmp_path / 'step_0000002'} (step 2 of {TRAIN.max_steps})" in capsys.readouterr().out
    again.save(fresh_model, fresh_optimizer, Progress(step=3), None)  # a resumed run keeps pruning as usual
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000002"]


def test_an_incompatible_checkpoint_starts_fresh_and_goes_at_the_first_save(tmp_path, capsys):
    model, optimizer = stepped()
    checkpoints(tmp_path).save(model, optimizer, Progress(step=40), None)
    before = model.state_dict()["wte.weight"].clone()
    other_model, other_optimizer = stepped(seed=7)
    cks = checkpoints(tmp_path, vocab=64)
    progress, best = cks.resume(other_model, other_optimizer)
    assert progress.step == 0 and best is None and cks.resumed_from is None
    assert not torch.equal(other_model.state_dict()["wte.weight"], before)  # nothing loaded
    out = capsys.readouterr().out
    assert "not resuming" in out and "different token files" in out and "starting fresh" in out
    assert (tmp_path / "step_0000040").is_dir()  # still there until the fresh run has a checkpoint
    cks.save(other_model, other_optimizer, Progress(step=5), None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005"]


def test_strict_resume_refuses_an_incompatible_checkpoint_in_one_line(tmp_path):
    model, optimizer = stepped()
    checkpoints(tmp_path).save(model, optimizer, Progress(step=40), None)
    with pytest.raises(PipelineError) as info:
        checkpoints(tmp_path, resume="strict", world=1, m=dataclasses.replace(MODEL, n_embd=32)).resume(
            model, optimizer
        )
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'step_0000040'}: cannot resume, it was made with a different model")
    assert "model.n_embd" in message and "train_run.resume: strict" in message and str(tmp_path) in message
    assert (tmp_path / "step_0000040").is_dir()


def test_resume_never_ignores_even_an_unreadable_checkpoint_as_the_error_advises(tmp_path):
    model, optimizer = stepped()
    checkpoints(tmp_path).save(model, optimizer, Progress(step=40), None)
    (tmp_path / "step_0000040" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="set train_run.resume: never"):
        checkpoints(tmp_path).resume(model, optimizer)
    cks = checkpoints(tmp_path, resume="never")
    progress, best = cks.resume(model, optimizer)
    assert progress.step == 0 and best is None
    cks.save(model, optimizer, Progress(step=1), None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
