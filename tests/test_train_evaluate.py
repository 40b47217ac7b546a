"""train, evaluate and generate through their commands, on the tiny corpus."""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_clean_error, run_stage, write_params
from pipeline.generate import generate, load_checkpoint
from pipeline.tokenize import Tokenizer


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def set_params(folder: Path, **groups) -> None:
    data = yaml.safe_load((folder / "params.yaml").read_text())
    for group, values in groups.items():
        data[group].update(values)
    write_params(folder, data)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    folder = copy_project(prepared, tmp_path_factory.mktemp("trained") / "p")
    run_stage("train", folder)
    run_stage("evaluate", folder)
    return folder


def read_curve(folder: Path, name: str) -> list[float]:
    path = folder / "metrics/train/plots/metrics" / f"{name}.tsv"
    with open(path) as f:
        return [float(r[name.split("/")[-1]]) for r in csv.DictReader(f, delimiter="\t")]


def test_train_writes_checkpoints_metrics_and_curves(trained):
    p = yaml.safe_load((trained / "params.yaml").read_text())
    steps, batch, block = p["train"]["max_steps"], p["train"]["batch_size"], p["model"]["block_size"]
    m = json.loads((trained / "metrics/train.json").read_text())
    assert m["arch"] == "gpt" and m["steps"] == steps and m["parameters"] > 0
    assert m["tokens_seen"] == steps * batch * block
    assert m["tokens_per_second"] > 0
    val = read_curve(trained, "val/loss")
    assert len(val) == steps // p["train"]["eval_interval"] + 1  # steps 0, 10, ..., max_steps
    assert val[-1] < val[0] - 0.5, val  # it learns
    assert m["best_val_loss"] == pytest.approx(min(val), abs=1e-4)
    lr = read_curve(trained, "lr")
    assert len(lr) == steps and max(lr) == pytest.approx(p["train"]["lr"]) and lr[-1] < lr[len(lr) // 2]
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(trained / "data/model" / name, weights_only=True)
        assert ckpt["vocab_size"] == 512 and ckpt["model_config"]["arch"] == "gpt"


def test_train_is_deterministic_on_cpu(trained, tmp_path):
    again = copy_project(trained, tmp_path / "again")
    run_stage("train", again)
    a = torch.load(trained / "data/model/last.pt", weights_only=True)["model"]
    b = torch.load(again / "data/model/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_recurrent_baselines_train_and_evaluate(prepared, tmp_path, arch):
    folder = copy_project(prepared, tmp_path / arch)
    set_params(folder, model={"arch": arch}, train={"max_steps": 10, "eval_interval": 5})
    run_stage("train", folder)
    run_stage("evaluate", folder)
    ev = json.loads((folder / "metrics/eval.json").read_text())
    assert ev["val"]["bits_per_byte"] > 0 and ev["translation"]["pairs"] == 20


def test_block_size_larger_than_token_file_is_a_clean_error(trained, tmp_path):
    folder = copy_project(trained, tmp_path / "p")
    before = (folder / "data/model/best.pt").read_bytes()
    set_params(folder, model={"block_size": 100000})
    assert_clean_error(run_stage("train", folder, check=False), "model.block_size")
    assert (folder / "data/model/best.pt").read_bytes() == before


def test_evaluate_reports_bits_per_byte_baselines_bleu_and_samples(trained):
    ev = json.loads((trained / "metrics/eval.json").read_text())
    for split in ("val", "test"):
        s = ev[split]
        assert s["bits_per_byte"] == pytest.approx(s["cross_entropy"] * s["tokens"] / math.log(2) / s["bytes"], rel=1e-3)
        assert s["perplexity"] == pytest.approx(math.exp(s["cross_entropy"]), rel=1e-3)
        # The model beats the unigram baseline after 60 steps on this repetitive corpus.
        assert s["bits_per_byte"] < s["unigram_bits_per_byte"]
        assert set(s["sources"]) == {"sonnets", "pairs"}
        assert sum(x["bytes"] for x in s["sources"].values()) == s["bytes"]
    tr = ev["translation"]
    assert tr["pairs"] == 20 and 0 <= tr["bleu"] <= 100 and 0 <= tr["chrf"] <= 100
    assert tr["bleu_signature"].startswith("nrefs:1|") and tr["chrf_signature"].startswith("nrefs:1|")
    samples = (trained / "metrics/samples.md").read_text()
    assert "## ROMEO:" in samples and "| source | reference | model |" in samples


def test_generate_command_continues_and_translates(trained):
    out = run_stage("generate", trained, "Shall I compare", "--max-new-tokens", "20", "--seed", "3")
    assert out.stdout.startswith("Shall I compare")
    again = run_stage("generate", trained, "Shall I compare", "--max-new-tokens", "20", "--seed", "3")
    assert again.stdout == out.stdout  # seeded sampling is reproducible
    tr = run_stage("generate", trained, "--translate", "Jesus wept.", "--max-new-tokens", "20")
    assert tr.returncode == 0


def test_generate_rejects_bad_input(trained, tmp_path):
    assert_clean_error(run_stage("generate", trained, "", check=False), "prompt")
    assert_clean_error(run_stage("generate", trained, "x", "--temperature", "-1", check=False), "temperature")
    assert_clean_error(run_stage("generate", trained, "x", "--checkpoint", "nope.pt", check=False), "nope.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes((trained / "data/model/best.pt").read_bytes()[:1000])
    assert_clean_error(run_stage("generate", trained, "x", "--checkpoint", str(broken), check=False), "broken.pt")


def test_batched_greedy_decoding_equals_one_at_a_time(trained):
    tok = Tokenizer(trained / "data/tokens/tokenizer.model")
    model = load_checkpoint(trained / "data/model/best.pt", tok)
    texts = ["Shall I compare", "Rough winds", "And summer's lease", "Thou art", "Jesus wept.", "So long"]
    prompts = [[tok.eos_id, *ids] for ids in tok.encode(texts)]
    batched = generate(model, prompts, 20, tok.eos_id, temperature=0.0, batch_size=4)
    single = [generate(model, [p], 20, tok.eos_id, temperature=0.0)[0] for p in prompts]
    assert batched == single
    assert any(len(b) > 0 for b in batched)
    # Past the context (64): generation goes on by re-encoding the last half context.
    long = generate(model, [prompts[0]], 150, eos_id=-1, temperature=1.0, top_k=0, seed=1)[0]
    assert len(long) == 150
    assert np.all(np.asarray(long) < tok.vocab_size)
