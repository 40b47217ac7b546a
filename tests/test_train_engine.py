"""The training engine: exact resume after SIGKILL, SIGTERM, incompatible and corrupt checkpoints,
accumulation, DDP and FSDP with Gloo, time budget, schedules, weight-decay groups.

Training runs in this process (call_stage) unless the command line is what is under test: killing
and signalling `python -m pipeline.train`, `torchrun`, and the one-line error of a run that fails
midway.
"""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_clean_error, call_stage, copy_project, run_stage, set_params, stage_error

from pipeline.core import params as P

CURVES = "metrics/train/plots/metrics"
TIMING = {"tokens_per_second", "train_seconds", "mfu"}  # wall-clock figures, never identical


def curves(folder: Path) -> dict[str, list[list[str]]]:
    """Every logged curve except the wall-clock ones, as rows of text."""
    out = {}
    for tsv in sorted((folder / CURVES).rglob("*.tsv")):
        if tsv.stem not in TIMING:
            with open(tsv) as f:
                out[str(tsv.relative_to(folder))] = list(csv.reader(f, delimiter="\t"))
    return out


def step_losses(folder: Path) -> list[float]:
    return [float(r[1]) for r in curves(folder)[f"{CURVES}/train/step_loss.tsv"][1:]]


def train_metrics(folder: Path) -> dict:
    m = json.loads((folder / "metrics/train.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


def assert_same_run(folder: Path, reference: Path) -> None:
    """The same weights, curves (but the wall-clock ones) and metrics as the reference run."""
    for name in ("last.safetensors", "best.safetensors"):
        assert (folder / "data/model" / name).read_bytes() == (reference / "data/model" / name).read_bytes(), name
    assert curves(folder) == curves(reference)
    assert train_metrics(folder) == train_metrics(reference)


def start_train(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.01)


def torchrun(folder: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "pipeline.train",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """An uninterrupted tiny run that writes a checkpoint every 10 of its 60 steps."""
    folder = copy_project(prepared, tmp_path_factory.mktemp("engine") / "ref")
    set_params(folder, train_run={"checkpoint_interval": 10})
    call_stage("train", folder)
    return folder


@pytest.mark.slow  # a training killed in a process of its own (~10 s): CI runs it
def test_a_killed_run_resumes_to_bit_identical_weights_and_curves(reference, tmp_path, capsys):
    folder = copy_project(reference, tmp_path / "p")
    for d in ("data/checkpoints", "data/model", "metrics/train"):
        subprocess.run(["rm", "-rf", str(folder / d)], check=True)
    # SIGKILL just after the step-20 checkpoint appears, then again early in the resumed run.
    for kill_after in ("step_0000020", "step_0000030"):
        proc = start_train(folder)
        wait_for(folder / "data/checkpoints" / kill_after, proc)
        proc.kill()
        proc.wait()
        assert not (folder / "data/model").exists()  # no half-written output
    call_stage("train", folder)
    assert "resuming from data/checkpoints/step_00000" in capsys.readouterr().out
    assert_same_run(folder, reference)
    # Only the newest checkpoints are kept; each holds weights in safetensors, the rest weights_only.
    kept = sorted(p.name for p in (folder / "data/checkpoints").iterdir())
    assert kept == ["step_0000050", "step_0000060"]
    state = torch.load(folder / "data/checkpoints/step_0000060/state.pt", weights_only=True)
    assert state["progress"]["step"] == 60 and state["progress"]["tokens_seen"] == 60 * 16 * 64
    assert len(state["progress"]["rng"]) == 1
    # Muon (the blocks' matrices) beside AdamW (the rest): each optimizer's state, resumed exactly above
    assert sorted(state["optimizer"]) == ["AdamW", "Muon"]
    assert all(len(o["state"]) > 0 for o in state["optimizer"].values())
    assert state["loader"]["next_step"] == 60 and state["scheduler"]["schedule"] == "cosine"


def test_reading_losses_every_few_steps_without_dvclive_changes_nothing(reference, tmp_path, monkeypatch):
    """Losses stay on the device and are read every train_run.log_interval steps (CUDA's way), and
    curves are written without dvclive where it is missing (a GPU machine without DVC): the same
    weights, the same curves and the same metrics.json as reading every step through dvclive."""
    folder = copy_project(reference, tmp_path / "p")
    for d in ("data/checkpoints", "data/model", "metrics/train"):
        shutil.rmtree(folder / d)
    set_params(folder, train_run={"log_interval": 7})  # not a divisor of the 10-step checkpoints
    monkeypatch.setitem(sys.modules, "dvclive", None)  # `import dvclive` raises ImportError
    call_stage("train", folder)
    assert_same_run(folder, reference)
    live = [json.loads((f / "metrics/train/metrics.json").read_text()) for f in (folder, reference)]
    for summary in live:
        for key in TIMING:
            summary.pop(key, None)
    assert live[0] == live[1]


def test_the_plain_output_layer_trains_to_the_same_weights_as_the_chunked_one(prepared, tmp_path, monkeypatch):
    """CUDA's loss (the plain head and cross-entropy, for torch.compile) and the CPU's chunked one
    take the same steps: its CPU form trained here, against the default on this CPU."""
    from safetensors.torch import load_file

    from pipeline.training.loss import OutputLayer

    weights = {}
    for chunked in (True, False):
        folder = copy_project(prepared, tmp_path / str(chunked))
        set_params(folder, train={**BATCH, "batch_size": 16})
        monkeypatch.setattr(OutputLayer, "chunked", chunked)
        call_stage("train", folder)
        weights[chunked] = load_file(folder / "data/model/last.safetensors")
    for name, w in weights[True].items():
        assert torch.allclose(w, weights[False][name], atol=1e-5), name


def test_every_knob_that_changes_nothing_computed_still_resumes(reference, tmp_path, capsys):
    """Every train_run knob, and each train knob declared resumable (pipeline.core.params, the one
    list the checkpoint's fingerprint reads), set to another value: the run resumes its checkpoint
    and ends bit-identical. train.log_interval once discarded the checkpoint and trained from scratch."""
    folder = copy_project(reference, tmp_path / "p")
    shutil.rmtree(folder / "data/checkpoints/step_0000060")  # resume from step 50
    shutil.rmtree(folder / "data/model")
    (folder / "data/checkpoints").rename(folder / "data/moved")  # where checkpoint_dir now points
    run_changes = {
        "checkpoint_interval": 7,
        "log_interval": 5,
        "resume": "strict",  # an incompatible checkpoint would be an error, not a fresh start
        "checkpoint_dir": "data/moved",
    }
    changes = {
        "device": "cpu",
        "compile": False,
        "threads": 0,  # OMP_NUM_THREADS (tests/conftest.py), the reference's THREADS: the same bits
        "fused_loss": "none",  # its other value, liger, runs on CUDA only (refused here, see below)
    }
    assert set(changes) == P.RESUMABLE and set(run_changes) == {f.name for f in dataclasses.fields(P.TrainRun)}
    set_params(folder, train=changes, train_run=run_changes)
    call_stage("train", folder)
    assert "resuming from data/moved/step_0000050" in capsys.readouterr().out
    assert_same_run(folder, reference)


def test_a_resumed_run_with_dropout_is_bit_identical(prepared, tmp_path):
    """Dropout draws from torch's global RNG, saved in each checkpoint: nothing else (such as
    measuring the CPU's peak FLOP/s for MFU) may draw from it between the restore and the steps."""
    reference = copy_project(prepared, tmp_path / "ref")
    set_params(reference, model={"dropout": 0.1}, train_run={"checkpoint_interval": 10})
    call_stage("train", reference)
    folder = copy_project(reference, tmp_path / "p")
    shutil.rmtree(folder / "data/checkpoints/step_0000060")  # resume from step 50
    shutil.rmtree(folder / "data/model")
    call_stage("train", folder)
    for name in ("last.safetensors", "best.safetensors"):
        assert (folder / "data/model" / name).read_bytes() == (reference / "data/model" / name).read_bytes(), name


@pytest.mark.slow  # a training stopped by SIGTERM in a process of its own (~10 s): CI runs it
def test_sigterm_saves_a_checkpoint_and_stops_cleanly(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"max_steps": 100000, "eval_interval": 1000}, train_run={"checkpoint_interval": 0})
    proc = start_train(folder)
    # training has begun: its curves are being logged (into a scratch copy, published at the end)
    wait_for(folder / "metrics" / f".train.tmp-{proc.pid}" / "plots/metrics/lr.tsv", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert_clean_error(subprocess.CompletedProcess([], proc.returncode, out, err), "SIGTERM", "data/checkpoints")
    (ckpt,) = (folder / "data/checkpoints").iterdir()
    assert int(ckpt.name[5:]) > 0
    assert not (folder / "data/model").exists()
    assert (folder / CURVES / "lr.tsv").is_file()  # the curves up to the checkpoint, published
    # It resumes from there: a run to a nearer end continues rather than restarts.
    set_params(folder, train={"max_steps": 100000})
    proc = start_train(folder)
    while True:
        line = proc.stdout.readline()
        if line.startswith("train: resuming") or not line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert line.startswith(f"train: resuming from {Path('data/checkpoints') / ckpt.name}"), line + out + err
    assert proc.returncode == 128 + signal.SIGINT and "SIGINT" in err


def test_an_incompatible_checkpoint_is_not_resumed(reference, tmp_path, capsys):
    def train() -> str:
        call_stage("train", folder)
        return capsys.readouterr().out

    folder = copy_project(reference, tmp_path / "p")
    set_params(folder, model={"n_embd": 32}, train={"max_steps": 5}, train_run={"resume": "strict"})
    stage_error("train", folder, "cannot resume", "model.n_embd", "train_run.resume")
    assert (folder / "data/model/last.safetensors").read_bytes() == (
        reference / "data/model/last.safetensors"
    ).read_bytes()
    set_params(folder, train_run={"resume": "auto"})
    out = train()
    assert "not resuming" in out and "model.n_embd" in out and "starting fresh" in out
    assert train_metrics(folder)["steps"] == 5
    # Training params that change the result are named too.
    set_params(folder, train={"lr": 1.0e-3})
    assert "train.lr: 0.005 -> 0.001" in train()
    # Another architecture; other token files (a sidecar that differs: the vocabulary itself must
    # agree with tokenizer.model, which train checks first).
    set_params(folder, model={"arch": "lstm"}, train={"optimizer": "adamw"})
    assert "model.arch" in train()
    sidecar = folder / "data/tokens/train.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "documents": meta["documents"] + 1}))
    assert "different token files (vocabulary or data changed)" in train()


@pytest.mark.parametrize("damaged", ["state.pt", "model.safetensors"])
def test_a_corrupt_checkpoint_is_a_clean_error(reference, tmp_path, damaged):
    folder = copy_project(reference, tmp_path / "p")
    f = folder / "data/checkpoints/step_0000060" / damaged
    f.write_bytes(f.read_bytes()[:200])
    stage_error("train", folder, "step_0000060", "not a readable checkpoint")
    assert (folder / "data/model/last.safetensors").exists()


def test_training_errors_name_the_knob(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"batch_tokens": 1000})
    stage_error("train", folder, "train.batch_tokens", "16 x 64")
    for bad in (0, -3):
        set_params(folder, train={"batch_tokens": 0, "max_steps": bad})
        stage_error("train", folder, "train.max_steps")
    assert not (folder / "data/model").exists()


def test_cuda_out_of_memory_says_which_knob_to_turn(prepared, tmp_path, monkeypatch):
    import pipeline.train as train

    folder = copy_project(prepared, tmp_path / "p")

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    stage_error(
        "train", folder, "out of memory", "tried to allocate 2.00 GiB", "lower train.batch_size", "train.batch_tokens"
    )
    assert not (folder / "data/model").exists()


# Global batch 16x64 in 20 steps: one micro-batch of 16 in one process, and the ways to split it.
# AdamW: Muon's Newton-Schulz steps run in bfloat16 (torch's), which turns float32 rounding
# differences between the ways of summing a batch into more than these tests' 1e-5.
BATCH = {"max_steps": 20, "eval_interval": 10, "optimizer": "adamw"}
HALVES = {**BATCH, "batch_size": 8, "batch_tokens": 1024}


@pytest.fixture(scope="module")
def one_batch_losses(prepared, tmp_path_factory) -> list[float]:
    folder = copy_project(prepared, tmp_path_factory.mktemp("single") / "p")
    set_params(folder, train={**BATCH, "batch_size": 16})
    call_stage("train", folder)
    losses = step_losses(folder)
    assert len(losses) == 20 and train_metrics(folder)["processes"] == 1
    assert losses[-1] < losses[0] - 1
    return losses


def test_accumulated_micro_batches_match_one_batch(prepared, tmp_path, one_batch_losses):
    folder = copy_project(prepared, tmp_path / "accumulated")
    set_params(folder, train=HALVES)
    call_stage("train", folder)
    assert train_metrics(folder)["processes"] == 1
    assert step_losses(folder) == pytest.approx(one_batch_losses, rel=1e-5, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(prepared, tmp_path, one_batch_losses, strategy):
    """torchrun, 2 processes of 8 sequences each."""
    folder = copy_project(prepared, tmp_path / strategy)
    set_params(folder, train={**HALVES, "strategy": strategy})
    torchrun(folder, 2)
    assert train_metrics(folder)["processes"] == 2
    # Rank 0 alone writes: one curve row per step, one set of outputs.
    losses = step_losses(folder)
    assert len(losses) == 20
    assert losses == pytest.approx(one_batch_losses, rel=1e-5, abs=1e-5)
    assert len(list((folder / "data/checkpoints").iterdir())) == 1


def test_time_budget_stops_training_and_decays_the_rate(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"max_steps": 100000, "time_budget_s": 1.5, "eval_interval": 100000, "schedule": "wsd"})
    call_stage("train", folder)
    m = train_metrics(folder)
    assert 5 < m["steps"] < 100000
    with open(folder / CURVES / "lr.tsv") as f:
        lr = [float(r["lr"]) for r in csv.DictReader(f, delimiter="\t")]
    p = yaml.safe_load((folder / "params.yaml").read_text())["train"]
    assert lr[len(lr) // 2] == pytest.approx(p["lr"])  # wsd: stable in the middle
    assert lr[-1] < 0.5 * p["lr"]  # decaying as the budget runs out
    assert (folder / "data/model/last.safetensors").exists()


def test_schedules():
    from pipeline.core.params import Train
    from pipeline.training.optim import lr_at

    t = Train(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)
    w = Train(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w) == lr_at(89, w) == 1.0
    assert lr_at(100, w) == pytest.approx(0.55) and lr_at(110, w) == pytest.approx(0.1)
    assert lr_at(20, w, time_fraction=1.0) == pytest.approx(0.1)  # the time budget is spent


def test_weight_decay_skips_norms_biases_and_optionally_embeddings():
    from pipeline.core.params import ModelConfig as Model
    from pipeline.core.params import Train
    from pipeline.model.model import build_model
    from pipeline.training.optim import make_optimizer

    model = build_model(Model(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True), 50)
    for decay_embeddings in (True, False):
        opt = make_optimizer(model, Train(decay_embeddings=decay_embeddings, optimizer="adamw"), torch.device("cpu"))
        decayed = {id(p) for p in opt.param_groups[0]["params"]}
        assert opt.param_groups[0]["weight_decay"] > 0 and opt.param_groups[1]["weight_decay"] == 0
        assert id(model.blocks[0].attn.qkv.weight) in decayed
        assert id(model.blocks[0].attn.qkv.bias) not in decayed and id(model.ln_f.weight) not in decayed
        assert (id(model.wte.weight) in decayed) == decay_embeddings
    # Muon: the blocks' matrices (and only they) go to Muon, at muon_lr / lr times the scheduled rate
    opt = make_optimizer(model, Train(optimizer="muon", lr=2e-3, muon_lr=0.01), torch.device("cpu"))
    adamw, muon = opt.optimizers
    matrices = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices
    assert not matrices & {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon.param_groups[0]["lr_ratio"] == pytest.approx(5.0)


def test_muon_is_torchs_in_bfloat16_and_orthogonalises_in_float32_on_a_cpu():
    """The project's Muon takes torch.optim.Muon's steps bit for bit when its Newton-Schulz
    iteration runs in bfloat16 (torch's), and close to them in float32, which a CPU uses: a
    bfloat16 matmul is tens of times slower than float32 on a CPU without native bfloat16."""
    from pipeline.training.optim import Muon, orthogonalization_dtype, orthogonalize

    assert orthogonalization_dtype("cpu") == torch.float32
    assert orthogonalization_dtype("cuda") == torch.bfloat16
    shapes = [(24, 16), (16, 40), (32, 32)]  # tall, wide, square
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")

    def run(make):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach().clone() for p in params], opt

    theirs, torch_opt = run(lambda ps: torch.optim.Muon(ps, **settings))
    same, _ = run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **settings))
    fp32, ours = run(lambda ps: Muon(ps, ns_dtype=torch.float32, **settings))
    for a, b, c in zip(theirs, same, fp32):
        assert torch.equal(a, b)
        assert not torch.equal(a, c) and torch.allclose(a, c, atol=2e-3)  # bfloat16 keeps 8 bits
    # the same state as torch's: a checkpoint of one loads into the other
    assert ours.state_dict()["state"].keys() == torch_opt.state_dict()["state"].keys()
    ours.load_state_dict(torch_opt.state_dict())
    # float32 orthogonalises: the singular values of the update land near 1 (0.5 to 1.5, by design)
    update = orthogonalize(
        torch.randn(64, 24, generator=torch.Generator().manual_seed(1)),
        (3.4445, -4.7750, 2.0315),
        5,
        1e-7,
        torch.float32,
    )
    assert update.dtype == torch.float32 and update.shape == (64, 24)
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    """As a command: an error in the middle of training is one line on stderr too, in a git
    repository (dvclive's) too: nothing more at interpreter exit."""
    folder = copy_project(prepared, tmp_path / "p")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    set_params(
        folder,
        train={
            "lr": 1.0e30,
            "min_lr": 1.0e30,
            "warmup_steps": 0,
            "grad_clip": 0.0,
            "eval_interval": 1000,
        },
        train_run={"checkpoint_interval": 1},
    )
    proc = run_stage("train", folder, check=False)
    assert proc.returncode == 1
    assert_clean_error(proc, "loss became", "train.lr", "data/checkpoints")
    kept = sorted(p.name for p in (folder / "data/checkpoints").iterdir())
    assert kept and all(name.startswith("step_") for name in kept)
    state = torch.load(folder / "data/checkpoints" / kept[-1] / "state.pt", weights_only=True)
    assert 0 < state["progress"]["step"] < 60
    assert not (folder / "data/model").exists()


@pytest.mark.slow  # compiling (C++ kernels on a CPU) takes a minute or two when nothing is cached
def test_compiled_training_matches_eager(prepared, tmp_path):
    losses = {}
    for compile_ in (False, True):
        folder = copy_project(prepared, tmp_path / str(compile_))
        set_params(folder, train={"compile": compile_, "max_steps": 4, "eval_interval": 2})
        call_stage("train", folder)
        losses[compile_] = step_losses(folder)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_pair_loss_target_leaves_the_source_out_of_the_targets(prepared, tmp_path, capsys):
    """train.pair_loss: target: the targets from <src> to <tgt> are IGNORE, inputs untouched; the
    target tokens and the </s> after them count, and so does every token of a text document."""
    import numpy as np

    from pipeline.data.tokenizer import Tokenizer, load_tokens
    from pipeline.model.model import IGNORE
    from pipeline.training.dataloader import pair_sources, windows

    tok = Tokenizer(prepared / "data/tokens/tokenizer.model")
    eos, src, tgt = tok.eos_id, tok.src_id, tok.tgt_id
    data = np.array([eos, 7, 8, eos, src, 9, 10, tgt, 11, 12, eos, 13, eos, src, 14, tgt, 15, eos], dtype=np.uint16)
    ignored = pair_sources(data, src, tgt)
    assert ignored.tolist() == [False] * 4 + [True] * 4 + [False] * 5 + [True] * 3 + [False] * 2
    x, y = windows(data, [2, 9], 8, torch.device("cpu"), ignored)
    assert torch.equal(x, torch.from_numpy(np.stack([data[2:10], data[9:17]]).astype(np.int64)))
    assert y[0].tolist() == [eos, IGNORE, IGNORE, IGNORE, IGNORE, 11, 12, eos]
    assert y[1].tolist() == [eos, 13, eos, IGNORE, IGNORE, IGNORE, 15, eos]
    # The real token files: the ignored share is the pairs' sources, and training runs on the rest.
    train = load_tokens("train", prepared / "data/tokens")
    share = pair_sources(train, src, tgt).mean()
    assert 0.05 < share < 0.5
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"pair_loss": "target", "max_steps": 20, "eval_interval": 10})
    call_stage("train", folder)
    metrics = train_metrics(folder)
    assert metrics["steps"] == 20 and metrics["best_val_loss"] < 8


# A rate so high that the val loss stops improving after some 40 steps (evaluated every 2).
PATIENCE = {
    "max_steps": 200,  # far beyond where a rate this high stops improving (step 26 to 42 on the CPUs seen)
    "eval_interval": 2,
    "lr": 0.05,
    "min_lr": 0.05,
    "muon_lr": 0.3,
    "warmup_steps": 0,
    "patience": 3,
}
PATIENCE_RUN = {"checkpoint_interval": 2}  # one at every evaluation: the newest two are inside the count


def test_patience_stops_training_where_the_val_loss_stopped_improving_and_resumes_exactly(prepared, tmp_path):
    """train.patience: 3 stops at the third evaluation in a row without a better val loss (read
    off the run's own val curve, wherever this CPU's floats take it), says so in
    metrics/train.json, and a run resumed from a checkpoint taken while the count was under way
    (or from the one it ended with) ends bit-identical: the count is part of the checkpoint."""
    reference = copy_project(prepared, tmp_path / "ref")
    set_params(reference, train=PATIENCE, train_run=PATIENCE_RUN)
    call_stage("train", reference)
    val = [(int(r[0]), float(r[1])) for r in curves(reference)[f"{CURVES}/val/loss.tsv"][1:]]
    best, since, expected = float("inf"), 0, None
    for step, loss in val:
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == PATIENCE["patience"]:
            expected = step
            break
    assert expected is not None and val[-1][0] == expected < PATIENCE["max_steps"], val
    m = train_metrics(reference)
    assert m["steps"] == expected and m["stopped"] == "patience" and m["evals_without_improvement"] == 3
    assert m["best_step"] == expected - 3 * PATIENCE["eval_interval"]
    assert m["best_val_loss"] == round(best, 4) <= m["final_val_loss"] and val[-1][1] >= best
    # a checkpoint at every evaluation (taken before it): the two kept are the last two, both while
    # the count was under way
    kept = sorted(p.name for p in (reference / "data/checkpoints").iterdir())
    assert kept == [f"step_{expected - 2:07d}", f"step_{expected:07d}"], kept
    for name in kept:
        under_way = torch.load(reference / "data/checkpoints" / name / "state.pt", weights_only=True)["progress"]
        assert 0 < under_way["evals_without_improvement"] < PATIENCE["patience"], (name, under_way)
    for resume_from in kept:
        folder = copy_project(reference, tmp_path / resume_from)
        for later in kept[kept.index(resume_from) + 1 :]:
            shutil.rmtree(folder / "data/checkpoints" / later)
        shutil.rmtree(folder / "data/model")
        call_stage("train", folder)
        assert_same_run(folder, reference)


def test_the_fused_loss_is_refused_on_a_cpu_and_without_the_gpu_extra(prepared, tmp_path, monkeypatch):
    """train.fused_loss: liger on a CPU, or on CUDA without Liger-Kernel installed: one line naming
    the key and the [gpu] extra, before any work; never the plain loss in its place."""
    from pipeline.core.common import PipelineError
    from pipeline.training.hardware import check_fused_loss

    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"fused_loss": "liger"})
    stage_error("train", folder, "train.fused_loss", "[gpu]", "cpu")
    assert not (folder / "data/model").exists() and not (folder / "data/checkpoints").exists()
    check_fused_loss("none", torch.device("cpu"))  # the plain path needs nothing
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # `import liger_kernel...` raises ImportError
    with pytest.raises(PipelineError) as e:
        check_fused_loss("liger", torch.device("cuda"))
    message = str(e.value)
    assert "\n" not in message and "train.fused_loss" in message and 'pip install -e ".[gpu]"' in message
