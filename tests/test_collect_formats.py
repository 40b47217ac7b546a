"""collect: compressed files, CSV/TSV/Parquet, aligned pair files, local archives, and the bad
input the issue lists (invalid UTF-8, NUL bytes, BOM, CRLF, empty and binary files, missing
columns, wrong Parquet schema, truncated gzip, unsafe archive members), through the stage run in
this process; the memory test runs it as a command, to measure that process's peak memory."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import zstandard
from conftest import call_stage, collect_project, raw_records, raw_texts, stage_error


def source(name: str, fmt: str, path: str, **kw) -> dict:
    return {"name": name, "kind": "file", "format": fmt, "path": path, **kw}


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics/collect.json").read_text())


JSONL = b'{"text": "first document"}\n{"text": "second document"}\n'


@pytest.mark.parametrize(
    "suffix,compress",
    [
        (".gz", gzip.compress),
        (".bz2", bz2.compress),
        (".xz", lzma.compress),
        (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_compressed_files_are_read_transparently(tmp_path, suffix, compress):
    (tmp_path / f"docs.jsonl{suffix}").write_bytes(compress(JSONL))
    collect_project(tmp_path, [source("docs", "jsonl", f"docs.jsonl{suffix}")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "docs") == ["first document", "second document"]


def test_a_truncated_gzip_is_a_clean_error_naming_the_file(tmp_path):
    data = gzip.compress(JSONL * 50)
    (tmp_path / "docs.jsonl.gz").write_bytes(data[: len(data) // 2])
    collect_project(tmp_path, [source("docs", "jsonl", "docs.jsonl.gz")])
    stage_error("collect", tmp_path, "docs.jsonl.gz", "truncated or corrupt gz file", "EOFError")
    assert not (tmp_path / "data/raw").exists()


def test_csv_tsv_and_parquet_with_named_columns(tmp_path):
    pd.DataFrame({"id": [1, 2], "body": ["Hello, world", "Line one\nline two"], "title": ["A", "B"]}).to_csv(
        tmp_path / "docs.csv", index=False
    )
    (tmp_path / "pairs.tsv").write_text("en\tru\nGood morning\tДоброе утро\nThank you\tСпасибо\n", encoding="utf-8")
    pd.DataFrame({"text": ["parquet one", "parquet two"]}).to_parquet(tmp_path / "docs.parquet")
    collect_project(
        tmp_path,
        [
            source("csv", "csv", "docs.csv", text_columns=["title", "body"]),
            source("tsv", "tsv", "pairs.tsv", pair_columns=["en", "ru"]),
            source("pq", "parquet", "docs.parquet"),
        ],
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "csv") == ["A\n\nHello, world", "B\n\nLine one\nline two"]
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "tsv")] == [
        ("Good morning", "Доброе утро"),
        ("Thank you", "Спасибо"),
    ]
    assert raw_texts(tmp_path, "pq") == ["parquet one", "parquet two"]


def test_a_table_without_the_named_column_is_a_clean_error(tmp_path):
    pd.DataFrame({"body": ["x"]}).to_csv(tmp_path / "docs.csv", index=False)
    collect_project(tmp_path, [source("csv", "csv", "docs.csv", text_columns=["text"])])
    stage_error("collect", tmp_path, "docs.csv", "no column 'text'", "body")


def test_a_parquet_file_with_the_wrong_schema_is_a_clean_error(tmp_path):
    pd.DataFrame({"text": [1, 2]}).to_parquet(tmp_path / "numbers.parquet")
    collect_project(tmp_path, [source("pq", "parquet", "numbers.parquet")])
    stage_error("collect", tmp_path, "numbers.parquet", "column 'text'", "int64")
    (tmp_path / "numbers.parquet").write_bytes(b"PAR1 not really parquet")
    stage_error("collect", tmp_path, "numbers.parquet", "not a readable PARQUET")


def test_pairs_from_two_aligned_files(tmp_path):
    (tmp_path / "en.txt").write_text("One\r\nTwo\n\nFour\n", encoding="utf-8")
    (tmp_path / "ru.txt").write_text("Один\nДва\nТри\nЧетыре\n", encoding="utf-8")
    collect_project(tmp_path, [source("pairs", "aligned", "en.txt", target_path="ru.txt")])
    call_stage("collect", tmp_path)
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "pairs")] == [
        ("One", "Один"),
        ("Two", "Два"),
        ("Four", "Четыре"),
    ]
    assert metrics(tmp_path)["pairs"]["empty_aligned_lines"] == 1
    (tmp_path / "ru.txt").write_text("Один\nДва\n", encoding="utf-8")
    stage_error("collect", tmp_path, "en.txt has 4 lines", "ru.txt has 2")


def test_damaged_text_is_cleaned_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nbad \xff byte\r\nnul\x00here\r\n")
    (tmp_path / "b.txt").write_bytes(b"")
    collect_project(tmp_path, [source("t", "text", "*.txt", split="lines")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "t") == ["line one", "bad \ufffd byte", "nulhere"]
    m = metrics(tmp_path)["t"]
    assert (m["files"], m["empty_files"], m["invalid_utf8"], m["nul_bytes"], m["bom"]) == (2, 1, 1, 1, 1)


def test_a_binary_file_given_as_text_is_a_clean_error(tmp_path):
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 40)
    collect_project(tmp_path, [source("t", "text", "image.txt")])
    stage_error("collect", tmp_path, "image.txt", "looks like a binary file")


def test_a_50_mb_single_line_is_one_document(tmp_path):
    (tmp_path / "long.txt").write_bytes(b"word " * 10_000_000)
    collect_project(tmp_path, [source("t", "text", "long.txt", split="lines")])
    call_stage("collect", tmp_path)
    assert metrics(tmp_path)["t"]["documents"] == 1 and metrics(tmp_path)["t"]["bytes"] == 50_000_000


def tar_with(path: Path, members: dict[str, bytes], link: str | None = None) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)


def test_local_archives_are_read_by_member_glob(tmp_path):
    tar_with(tmp_path / "corpus.tar.gz", {"corpus/a.txt": b"Alpha", "corpus/b.txt": b"Beta", "corpus/c.md": b"no"})
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.writestr("more/c.txt", "Gamma")
    collect_project(
        tmp_path,
        [
            source("tar", "text", "corpus.tar.gz", members="corpus/*.txt"),
            source("zip", "text", "more.zip", members="more/*.txt"),
        ],
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "tar") == ["Alpha", "Beta"] and raw_texts(tmp_path, "zip") == ["Gamma"]


@pytest.mark.parametrize("bad", ["corpus/../../evil.txt", "/abs/evil.txt", "link"])
def test_unsafe_archive_members_are_refused(tmp_path, bad):
    if bad == "link":
        tar_with(tmp_path / "corpus.tar.gz", {"corpus/a.txt": b"Alpha"}, link="corpus/evil.txt")
    else:
        tar_with(tmp_path / "corpus.tar.gz", {"corpus/a.txt": b"Alpha", bad: b"Evil"})
    collect_project(tmp_path, [source("tar", "text", "corpus.tar.gz", members="*evil.txt")])
    if bad == "link":
        stage_error("collect", tmp_path, "corpus.tar.gz", "member 'corpus/evil.txt' is a link; refused")
    else:
        stage_error(
            "collect", tmp_path, "corpus.tar.gz", f"member {bad!r} is a path outside the archive's folder; refused"
        )
    assert not (tmp_path / "data/raw").exists()


def test_zip_with_a_parent_path_member_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("../evil.txt", "Evil")
    collect_project(tmp_path, [source("zip", "text", "bad.zip", members="*.txt")])
    stage_error("collect", tmp_path, "bad.zip", "member '../evil.txt' is a path outside the archive's folder; refused")


@pytest.mark.slow
@pytest.mark.parametrize("fmt, split", [("jsonl", "file"), ("text", "paragraphs"), ("csv", "file")])
def test_large_compressed_files_are_streamed_in_bounded_memory(tmp_path, fmt, split):
    """200 MB of text in a .gz: collect's peak memory stays far below the file's size."""
    import subprocess
    import sys

    line = "All the world's a stage, and all the men and women merely players. " * 30
    unit = {"jsonl": json.dumps({"text": line}) + "\n", "text": line + "\n\n", "csv": f'"{line}"\n'}[fmt]
    n = 200_000_000 // len(unit)
    with gzip.open(tmp_path / f"big.{fmt}.gz", "wt", compresslevel=1, encoding="utf-8") as f:
        if fmt == "csv":
            f.write("text\n")
        for _ in range(n // 1000):
            f.write(unit * 1000)
    collect_project(tmp_path, [source("big", fmt, f"big.{fmt}.gz", split=split)])
    probe = (
        "import resource, subprocess, sys; p = subprocess.run([sys.executable, '-m', 'pipeline.collect']); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024
    assert metrics(tmp_path)["big"]["documents"] == n // 1000 * 1000
    assert peak_mb < 250, peak_mb  # pandas alone is ~110 MB; the whole-file read took 540-600 MB


def test_tables_are_read_in_chunks_of_rows_in_order(tmp_path):
    n = 20_000  # several chunks of TABLE_ROWS
    df = pd.DataFrame({"text": [f"row {i}" for i in range(n)]})
    df.to_parquet(tmp_path / "big.parquet", row_group_size=7_000)
    with gzip.open(tmp_path / "big.csv.gz", "wt", encoding="utf-8") as f:
        df.to_csv(f, index=False)
    collect_project(tmp_path, [source("pq", "parquet", "big.parquet"), source("csv", "csv", "big.csv.gz")])
    call_stage("collect", tmp_path)
    for name in ("pq", "csv"):
        assert raw_texts(tmp_path, name) == [f"row {i}" for i in range(n)]


def test_decompression_bombs_are_cut_or_refused_within_the_limits(tmp_path):
    big = b"All the world's a stage. " * 40_000  # 1,000,000 bytes, no newline
    (tmp_path / "line.txt.gz").write_bytes(gzip.compress(big * 3))  # one line of 3 MB
    (tmp_path / "file.txt.gz").write_bytes(gzip.compress(b"line\n" * 600_000))  # one file of 3 MB
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/a.txt", big * 3)
    limits = {"max_document_bytes": 1_000_000, "run": {"max_file_bytes": 2_000_000}}
    collect_project(
        tmp_path,
        [source("line", "text", "line.txt.gz", split="lines"), source("file", "text", "file.txt.gz")],
        **limits,
    )
    call_stage("collect", tmp_path)
    m = metrics(tmp_path)
    assert m["line"]["truncated_lines"] == 1 and m["line"]["bytes"] == 1_000_000
    assert m["file"]["truncated_documents"] == 1 and 999_000 < m["file"]["bytes"] <= 1_000_000
    collect_project(tmp_path, [source("zip", "text", "bomb.zip", members="bomb/*.txt")], **limits)
    stage_error(
        "collect", tmp_path, "bomb.zip: member 'bomb/a.txt'", "more than collect_run.max_file_bytes (2,000,000 bytes)"
    )
    (tmp_path / "db.sqlite.gz").write_bytes(gzip.compress(big * 3))
    collect_project(tmp_path, [source("db", "sqlite", "db.sqlite.gz", query="SELECT 1")], **limits)
    stage_error("collect", tmp_path, "db.sqlite.gz", "more than collect_run.max_file_bytes")


def test_crlf_lines_and_whitespace_only_files_are_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\r\nthree\n")
    (tmp_path / "b.txt").write_bytes(b" \n\t\n  " * 30_000)  # whitespace beyond the first block read
    collect_project(tmp_path, [source("t", "text", "*.txt", split="lines")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "t") == ["one", "two", "three"]
    m = metrics(tmp_path)["t"]
    assert (m["files"], m["empty_files"], m["crlf_lines"]) == (2, 1, 2)


def test_an_error_inside_an_archive_names_the_archive_and_the_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "dump.zip", "w") as z:
        z.writestr("dump/a.jsonl", '{"text": "fine"}\n{broken\n')
    collect_project(tmp_path, [source("j", "jsonl", "dump.zip", members="dump/*.jsonl")])
    stage_error("collect", tmp_path, "dump.zip:dump/a.jsonl:2: not valid JSON")
