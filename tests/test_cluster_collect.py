"""collect on Ray (data_run.executor: ray): a source's many files read by Ray tasks, a file per
task, and web pages extracted by them, on a real cluster on this machine (conftest's ray_cluster):
data/raw and metrics/collect.json byte-identical to the local run's, and a bad file's error the
same one line."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import (
    PAIRS,
    REPO,
    SONNET,
    assert_clean_error,
    call_stage,
    collect_project,
    copy_project,
    jsonl_source,
    run_stage,
    set_params,
    snapshot,
    stage_error,
    text_source,
    write_jsonl,
)

pytest.importorskip("ray", reason="the [cluster] extra is not installed")
pd = pytest.importorskip("pandas")
pytestmark = pytest.mark.cluster

RUSSIAN = "Москва — столица России, крупнейший по численности населения город страны.\nОна стоит на реке Москве."
CHINESE = "北京是中华人民共和国的首都，是全国的政治中心和文化中心。\n北京有三千多年的建城史。"
PAGE = (
    "<html><head><title>{0}</title></head><body><nav>Home | News</nav><article><h1>{0}</h1>{1}</article></body></html>"
)


def paragraphs(text: str, n: int, tag: str) -> str:
    return "\n\n".join(f"{tag} {i}.\n{text}" for i in range(n)) + "\n"


def write_corpus(folder: Path) -> list[dict]:
    """Files in English, Russian and Chinese (one gzipped, one with CRLF and a BOM, one empty),
    pairs as JSON lines, CSV and Parquet tables (one gzipped), the members of a zip, a single
    file, and HTML pages."""
    books = folder / "corpus" / "books"
    books.mkdir(parents=True)
    (books / "a_sonnets.txt").write_text(paragraphs(SONNET, 30, "SONNET"), encoding="utf-8")
    (books / "b_moscow.txt.gz").write_bytes(gzip.compress(paragraphs(RUSSIAN, 20, "ГЛАВА").encode()))
    (books / "c_beijing.txt").write_bytes(
        b"\xef\xbb\xbf" + paragraphs(CHINESE, 20, "第").replace("\n", "\r\n").encode()
    )
    (books / "d_empty.txt").write_text("\n \n", encoding="utf-8")
    pairs = [{"src": f"{s} ({i})", "tgt": f"{t} ({i})"} for i in range(40) for s, t in PAIRS]
    write_jsonl(folder / "corpus" / "pairs" / "1.jsonl", pairs[:100])
    write_jsonl(folder / "corpus" / "pairs" / "2.jsonl", pairs[100:])
    table = folder / "corpus" / "table"
    table.mkdir()
    for k in range(3):
        rows = "".join(f'"{k}: {line}",{i}\n' for i, line in enumerate(SONNET.split("\n")))
        (table / f"{k}.csv").write_text("text,n\n" + rows, encoding="utf-8")
    (folder / "corpus" / "parquet").mkdir()
    for k, text in enumerate((RUSSIAN, CHINESE)):
        buffer = io.BytesIO()
        pd.DataFrame({"text": text.split("\n") * 5}).to_parquet(buffer)
        data = gzip.compress(buffer.getvalue()) if k else buffer.getvalue()
        (folder / "corpus" / "parquet" / f"{k}.parquet{'.gz' if k else ''}").write_bytes(data)
    with zipfile.ZipFile(folder / "corpus" / "texts.zip", "w") as z:
        for k, text in enumerate((SONNET, RUSSIAN, CHINESE)):
            z.writestr(f"texts/{k}.txt", paragraphs(text, 5, f"PART {k}"))
    (folder / "pages").mkdir()
    for name, title, text in (("en", "Sonnets", SONNET), ("ru", "Москва", RUSSIAN), ("zh", "北京", CHINESE)):
        body = "".join(f"<p>{line} {line}</p>" for line in text.split("\n") * 3)
        (folder / "pages" / f"{name}.html").write_text(PAGE.format(title, body), encoding="utf-8")
    return [
        text_source("books", "corpus/books", split="paragraphs"),
        jsonl_source("pairs", "corpus/pairs/*.jsonl", languages=["en", "ru"]),
        {"name": "table", "kind": "file", "format": "csv", "path": "corpus/table/*.csv"},
        {"name": "parquet", "kind": "file", "format": "parquet", "path": "corpus/parquet/*"},
        text_source("zipped", "corpus/texts.zip", split="paragraphs", members="texts/*.txt"),
        text_source("one", "corpus/books/a_sonnets.txt", split="lines"),
        {"name": "web", "kind": "file", "format": "html", "path": "pages/*.html"},
    ]


def on_ray(folder: Path, address: str) -> Path:
    set_params(folder, data_run={"executor": "ray", "address": address})
    return folder


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The corpus collected on this machine (shared, read-only: copies go to Ray)."""
    folder = tmp_path_factory.mktemp("local")
    collect_project(folder, write_corpus(folder), run={"workers": 1})
    call_stage("collect", folder)
    return folder


def test_collect_on_ray_writes_what_the_local_run_writes(local_run, ray_cluster, tmp_path):
    folder = on_ray(copy_project(local_run, tmp_path / "p"), ray_cluster.address)
    shutil.rmtree(folder / "data")
    shutil.rmtree(folder / "metrics")
    run_stage("collect", folder)
    assert snapshot(folder, "data/raw", "metrics/collect.json") == snapshot(
        local_run, "data/raw", "metrics/collect.json"
    )
    counts = json.loads((folder / "metrics/collect.json").read_text())
    assert counts["books"]["files"] == 4 and counts["books"]["empty_files"] == 1 and counts["books"]["bom"] == 1
    assert counts["web"]["web_pages"] == 3 and counts["zipped"]["files"] == 3 and counts["parquet"]["files"] == 2


def test_a_bad_file_on_ray_is_the_local_run_s_one_line_error(local_run, ray_cluster, tmp_path):
    folder = on_ray(copy_project(local_run, tmp_path / "p"), ray_cluster.address)
    before = snapshot(folder, "data/raw", "metrics/collect.json")
    bad = folder / "corpus" / "pairs" / "1b.jsonl"
    bad.write_text(json.dumps({"src": "Jesus wept.", "tgt": "Иисус прослезился."}) + "\n\n{not json\n")
    set_params(folder, data_run={"executor": "local"})
    local = stage_error("collect", folder, "1b.jsonl:3", "not valid JSON")
    on_ray(folder, ray_cluster.address)
    proc = run_stage("collect", folder, check=False)
    assert_clean_error(proc, "1b.jsonl:3", "not valid JSON")
    assert proc.stderr.strip() == f"error: {local}"
    assert snapshot(folder, "data/raw", "metrics/collect.json") == before


def test_ray_tasks_read_a_file_each_and_a_single_file_is_read_here(local_run, ray_cluster):
    """read_documents itself (in a process of its own, as Ray wants its token before it is
    imported): the tasks' FileRecords, in order, are the local run's lines; a source of one file
    gives records, read here."""
    code = f"""
import dataclasses, json, sys
from collections import Counter
from pipeline.core.params import DataRun, Source
from pipeline.data.sources.files import local_files
from pipeline.data.sources.read import read_documents
src = Source(name="books", kind="file", format="text", path="corpus/books", split="paragraphs")
one = dataclasses.replace(src, path="corpus/books/a_sonnets.txt")
run = DataRun(executor="ray", address={ray_cluster.address!r})
stats = Counter()
parts = list(read_documents(src, local_files(src), None, stats, executor=run))
sys.stdout.buffer.write(b"".join(part.lines for part in parts))
records = list(read_documents(one, local_files(one), None, Counter(), executor=run))
print(json.dumps([[type(p).__name__ for p in parts], stats["files"], sorted({{type(r).__name__ for r in records}})]))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=local_run, env=env, capture_output=True, timeout=120, check=True
    )
    lines, _, summary = proc.stdout.rstrip(b"\n").rpartition(b"\n")
    assert lines + b"\n" == (local_run / "data/raw/books.jsonl").read_bytes()
    assert json.loads(summary) == [["FileRecords"] * 4, 4, ["dict"]]


BAD_FILES = {  # a bad file among good ones, and what the error names
    "binary": ("b.txt", bytes(range(256)) * 64, "b.txt: looks like a binary file"),
    "truncated gz": ("b.txt.gz", gzip.compress(SONNET.encode() * 50)[:-200], "b.txt.gz: truncated or corrupt gz file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_binary_or_truncated_file_on_ray_is_the_local_run_s_error(tmp_path, ray_cluster, case):
    name, data, needle = BAD_FILES[case]
    (tmp_path / "texts").mkdir()
    for good in ("a.txt", "c.txt"):
        (tmp_path / "texts" / good).write_text(f"{SONNET}\n", encoding="utf-8")
    (tmp_path / "texts" / name).write_bytes(data)
    collect_project(tmp_path, [text_source("texts", "texts")])
    local = stage_error("collect", tmp_path, needle)
    proc = run_stage("collect", on_ray(tmp_path, ray_cluster.address), check=False)
    assert_clean_error(proc, needle)
    assert proc.stderr.strip() == f"error: {local}"


PAIR = json.dumps({"src": "Jesus wept.", "tgt": "Иисус прослезился."})
BAD_MEMBERS = {  # what follows a good member, and the error the local run gives
    "a member over the limit after a bad one": (["not json", json.dumps({"text": "x" * 5000})], "b.jsonl:1"),
    "pairs after texts, then a bad line": ([f"{PAIR}\nnot json", ""], "mixes text records and src/tgt pairs"),
}


@pytest.mark.parametrize("case", BAD_MEMBERS)
def test_errors_come_in_their_turn(tmp_path, ray_cluster, case):
    """The Ray tasks read ahead of the records written, but an error is the local run's: the first
    one a reader meets, in order."""
    members, needle = BAD_MEMBERS[case]
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as z:
        for name, text in zip("abc", [json.dumps({"text": "fine"}), *members]):
            z.writestr(f"{name}.jsonl", text + "\n")
    collect_project(tmp_path, [jsonl_source("docs", "docs.zip", members="*.jsonl")], run={"max_file_bytes": 1000})
    local = stage_error("collect", tmp_path, needle)
    proc = run_stage("collect", on_ray(tmp_path, ray_cluster.address), check=False)
    assert_clean_error(proc, needle)
    assert proc.stderr.strip() == f"error: {local}"


def test_ray_is_used_for_web_pages_and_for_the_files_of_a_source_of_several(tmp_path, monkeypatch):
    """With a cluster that does not answer: a web page, or two text files, fail to reach it; one
    text file, or two read up to collect.max_documents, are read here and never ask for it; a
    path that matches nothing is the same error as without Ray."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what joining sets: gone after the test
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{SONNET}\n", encoding="utf-8")
    (tmp_path / "page.html").write_text(PAGE.format("Sonnet", f"<p>{SONNET}</p>"), encoding="utf-8")
    nowhere = {"executor": "ray", "address": "127.0.0.1:9", "connect_timeout_s": 2}
    for source, max_documents, error in (
        ({"name": "web", "kind": "file", "format": "html", "path": "page.html"}, 0, True),
        (text_source("two", "*.txt"), 0, True),
        (text_source("one", "a.txt"), 0, False),
        (text_source("two", "*.txt"), 1, False),
        (text_source("none", "*.md"), 0, "no file matches path '*.md'"),
    ):
        collect_project(tmp_path, [source], max_documents=max_documents)
        set_params(tmp_path, data_run=nowhere)
        if error:
            stage_error("collect", tmp_path, error if isinstance(error, str) else "nothing answers at 127.0.0.1:9")
        else:
            call_stage("collect", tmp_path)
