"""tokenize on Ray (data_run.executor: ray): Ray tasks parse, encode and render the batches of each
split, and the token files and metrics are byte-identical to the local run's, on a cluster (the
session's `ray_cluster`: a head and a worker node on this machine) and on a Ray started for the
stage, which the stage stops. A task's failure is one line.

A small project of English, Russian and Chinese documents and English-to-Russian pairs, cleaned
and tokenized locally once; each test tokenizes a copy of it as a command (run_stage).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    PAIRS,
    SONNET,
    assert_clean_error,
    call_stage,
    copy_project,
    jsonl_source,
    run_stage,
    set_params,
    snapshot,
    stage_error,
    tiny_params,
    write_jsonl,
    write_params,
)

import pipeline.tokenize as T
from pipeline.data import encode
from pipeline.data.pool import Pool

OUTPUTS = ("data/tokens", "metrics/tokenize.json")

RUSSIAN = "Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил и лучше выдумать не мог."


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The project, cleaned and tokenized by this machine's processes."""
    folder = tmp_path_factory.mktemp("multilingual")
    rnd = random.Random(0)
    hanzi = [chr(0x4E00 + i) for i in range(300)]
    lines, words = SONNET.split("\n"), RUSSIAN.split()
    corpus = {
        "en": [{"text": f"{i}. " + " ".join(rnd.sample(lines, 4))} for i in range(300)],
        "ru": [{"text": f"{i}. " + " ".join(rnd.choices(words, k=30))} for i in range(300)],
        "zh": [{"text": "".join(rnd.choices(hanzi, k=60)) + f"。{i}"} for i in range(300)],
        "pairs": [{"src": f"{s} ({i})", "tgt": f"{t} ({i})"} for i in range(400) for s, t in [PAIRS[i % len(PAIRS)]]],
    }
    for name, records in corpus.items():
        write_jsonl(folder / "corpus" / f"{name}.jsonl", records)
    sources = [jsonl_source(name, f"corpus/{name}.jsonl") for name in ("en", "ru", "zh")]
    sources.append(jsonl_source("pairs", "corpus/pairs.jsonl", languages=["en", "ru"]))
    write_params(folder, tiny_params({"sources": sources, "max_documents": 0}, clean_run={"workers": 1}))
    for stage in ("collect", "clean", "tokenize"):
        call_stage(stage, folder)
    return folder


def on_ray(local: Path, folder: Path, address: str) -> Path:
    """A copy of the project whose data stages run on Ray at `address`, its token files removed."""
    folder = copy_project(local, folder)
    set_params(folder, data_run={"executor": "ray", "address": address})
    shutil.rmtree(folder / "data/tokens")
    (folder / "metrics/tokenize.json").unlink()
    return folder


def test_the_project_has_every_kind_of_record_and_many_batches(local):
    train = (local / "data/clean/train.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in train]
    assert {r["source"] for r in records} == {"en", "ru", "zh", "pairs"}
    assert any(r.get("tgt_lang") == "ru" for r in records)
    assert len(list(encode.batches(local / "data/clean/train.jsonl"))) > encode.BATCHES_PER_FILE / 2


def test_the_tasks_give_the_local_token_files_for_any_batch_size(local, tmp_path, monkeypatch):
    """In this process (a one-worker Pool runs the tasks' code here): batches of a few lines, cut
    anywhere in a source's run, give the same files as the local encoder."""
    model = local / "data/tokens/tokenizer.model"
    tok = T.Tokenizer(model)
    for batch_bytes in (1, 700, 5000):
        monkeypatch.setattr(encode, "BATCH_BYTES", batch_bytes)
        monkeypatch.setattr(encode, "MIN_BATCH_BYTES", 1)
        for split in ("train", "val"):
            out = tmp_path / f"{split}.bin"
            with Pool(1, encode.init_worker, (model.read_bytes(),)) as pool:
                meta = T.encode_split_tasks(tok, local / f"data/clean/{split}.jsonl", out, pool)
            assert out.read_bytes() == (local / f"data/tokens/{split}.bin").read_bytes()
            assert meta == json.loads((local / f"data/tokens/{split}.json").read_text())


def test_on_a_cluster_the_outputs_are_the_local_ones(local, ray_cluster, tmp_path):
    folder = on_ray(local, tmp_path / "p", ray_cluster.address)
    run_stage("tokenize", folder)
    assert snapshot(folder, *OUTPUTS) == snapshot(local, *OUTPUTS)


def ray_processes(mark: str) -> list[int]:
    """The processes whose environment holds `mark`: those a stage started with it, and theirs."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_ray_started_for_the_stage_gives_the_same_outputs_and_stops(local, tmp_path, monkeypatch):
    folder = on_ray(local, tmp_path / "p", "")
    mark = f"LMPIPE_TEST_{uuid.uuid4().hex}"
    monkeypatch.setenv(mark, "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_stage("tokenize", folder)
    assert snapshot(folder, *OUTPUTS) == snapshot(local, *OUTPUTS)
    deadline = time.monotonic() + 10
    while ray_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes(mark), "the stage left Ray processes running"


def test_a_failed_task_is_one_line(local, ray_cluster, tmp_path):
    """A line that is not JSON: the error the local run gives, as is. A text that is not a string: the
    batch it was in, and what failed."""
    folder = on_ray(local, tmp_path / "p", ray_cluster.address)
    val = folder / "data/clean/val.jsonl"
    lines = val.read_text(encoding="utf-8").splitlines(keepends=True)
    val.write_text("".join([*lines[:-1], "{not json\n"]), encoding="utf-8")
    proc = run_stage("tokenize", folder, check=False)
    assert_clean_error(proc, f"data/clean/val.jsonl:{len(lines)}: not valid JSON")
    set_params(folder, data_run={"executor": "local"})
    assert proc.stderr.strip() == "error: " + stage_error("tokenize", folder)
    set_params(folder, data_run={"executor": "ray"})
    val.write_text("".join([*lines, json.dumps({"source": "en", "text": 7}) + "\n"]), encoding="utf-8")
    proc = run_stage("tokenize", folder, check=False)
    assert_clean_error(proc, "data/clean/val.jsonl (the shard from line", "a Ray task failed")
    assert not (folder / "data/tokens").exists()
