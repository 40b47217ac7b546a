"""What killed runs leave behind, and what the next run does with it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import (
    assert_clean_error,
    call_stage,
    collect_project,
    copy_project,
    default_params,
    run_stage,
    set_params,
    snapshot,
    stage_error,
    write_params,
)

from pipeline.core.common import atomic_dir, remove_stale


def dead_pid() -> int:
    """The id of a process that has ended (and is not reused within the test)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_what_a_killed_run_left_and_spares_a_live_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = dead_pid()
        (tmp_path / f"raw.tmp-{gone}").mkdir()
        (tmp_path / f"raw.tmp-{gone}" / "half.jsonl").write_text("{")
        (tmp_path / f"raw.old-{gone}").mkdir()
        (tmp_path / f"raw.tmp-{live.pid}").mkdir()  # a concurrent run's
        (tmp_path / f"rawer.tmp-{gone}").mkdir()  # another output's
        (tmp_path / "raw.tmp-notapid").mkdir()
        with atomic_dir(tmp_path / "raw") as out:
            (out / "a.jsonl").write_text("{}\n")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["raw", f"raw.tmp-{live.pid}", f"rawer.tmp-{gone}", "raw.tmp-notapid"])
        remove_stale(tmp_path, "rawer")
        assert not (tmp_path / f"rawer.tmp-{gone}").exists()
    finally:
        live.kill()
        live.wait()


def test_a_killed_trainings_half_written_checkpoint_is_removed(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    checkpoints = folder / "data" / "checkpoints"
    stale = checkpoints / f".step_0000010.tmp-{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    call_stage("train", folder)
    assert not stale.exists() and any(p.name.startswith("step_") for p in checkpoints.iterdir())


@pytest.fixture(scope="module")
def trained_tiny(prepared, tmp_path_factory):
    folder = copy_project(prepared, tmp_path_factory.mktemp("reliability") / "p")
    set_params(folder, train={"max_steps": 2})
    call_stage("train", folder)
    return folder


@pytest.mark.parametrize(
    "damage, needles",
    [
        (
            lambda t: t.joinpath("train.bin").write_bytes(t.joinpath("train.bin").read_bytes()[:-3]),
            ["train.bin", "truncated"],
        ),
        (lambda t: _sidecar(t, dtype="banana"), ["train.json", "uint16 or uint32"]),
        (lambda t: _sidecar(t, dtype="float64"), ["train.json", "uint16 or uint32"]),
        (lambda t: _sidecar(t, dtype=None), ["train.json", "uint16 or uint32"]),
        (lambda t: _sidecar(t, vocab_size=1000), ["train.json", "vocabulary 1000", "tokenizer.model has 512"]),
    ],
)
def test_damaged_token_files_are_one_line_and_leave_the_model_alone(trained_tiny, tmp_path, damage, needles):
    folder = copy_project(trained_tiny, tmp_path / "p")
    before = snapshot(folder, "data/model", "metrics")
    damage(folder / "data/tokens")
    stage_error("train", folder, *needles)
    assert snapshot(folder, "data/model", "metrics") == before


def _sidecar(tokens, **changes):
    meta = json.loads((tokens / "train.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (tokens / "train.json").write_text(json.dumps(meta))


def test_a_tokenizer_of_random_bytes_is_one_line(trained_tiny, tmp_path):
    folder = copy_project(trained_tiny, tmp_path / "p")
    (folder / "data/tokens/tokenizer.model").write_bytes(bytes(range(256)) * 4)
    before = snapshot(folder, "metrics")
    for stage, args in (("generate", ("ROMEO:",)), ("evaluate", ())):
        stage_error(stage, folder, "tokenizer.model", "not a sentencepiece model", args=args)
    assert snapshot(folder, "metrics") == before


def test_generate_refuses_a_prompt_of_invalid_utf8_and_a_nan_temperature(trained_tiny):
    proc = run_stage("generate", trained_tiny, os.fsdecode(b"\xff\xfe ROMEO"), check=False)
    assert_clean_error(proc, "prompt", "UTF-8")
    proc = run_stage("generate", trained_tiny, "ROMEO:", "--temperature", "nan", check=False)
    assert_clean_error(proc, "temperature", "finite")
    assert proc.stdout == ""  # nothing printed before the error


def test_a_params_file_of_many_aliases_is_refused_before_it_expands(tmp_path):
    """The "billion laughs": nine levels of ten aliases each would expand to 10**9 strings."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\nevaluate:\n  prompts: *a9\n")
    proc = run_stage("params", tmp_path, "check", check=False)
    assert_clean_error(proc, "params.yaml", "91 YAML aliases", "at most 50")


def test_an_ill_typed_huge_value_is_quoted_short(tmp_path):
    from pipeline.core.params import merge

    data = merge(default_params(), {"model": {"n_layer": "x" * 100_000}})
    write_params(tmp_path, data)
    proc = run_stage("params", tmp_path, "check", check=False)
    assert_clean_error(proc, "model.n_layer", "expected an integer", "(100,002 characters)")
    assert len(proc.stderr) < 300


def test_collect_stopping_early_in_a_database_prints_nothing_at_exit(tmp_path):
    """max_documents stops reading a SQLite source midway: its scratch copy is closed while it
    still exists, with no "Exception ignored" traceback at exit."""
    import sqlite3

    con = sqlite3.connect(tmp_path / "verses.db")
    con.execute("CREATE TABLE v (en TEXT, ru TEXT)")
    con.executemany("INSERT INTO v VALUES (?, ?)", [(f"Jesus wept {i}.", f"Иисус прослезился {i}.") for i in range(50)])
    con.commit()
    con.close()
    source = {"name": "db", "kind": "file", "format": "sqlite", "path": "verses.db", "query": "SELECT en, ru FROM v"}
    collect_project(tmp_path, [source], max_documents=10)
    proc = run_stage("collect", tmp_path)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert len((tmp_path / "data/raw/db.jsonl").read_text(encoding="utf-8").splitlines()) == 10
    assert (tmp_path / "verses.db").is_file()  # the user's file, never the scratch copy, stays
