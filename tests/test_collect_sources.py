"""collect: URL sources (served by a local HTTP server in the test: timeouts, 404, wrong bytes,
retries and resume), gettext catalogs (.po and .mo) as pair sources, and Hugging Face datasets
read from local files; the stage runs in this process."""

from __future__ import annotations

import contextlib
import gettext
import gzip
import hashlib
import http.server
import json
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import call_stage, collect_project, raw_records, raw_texts, stage_error

BODY = gzip.compress(b'{"text": "served over HTTP"}\n{"text": "second line"}\n' * 200)
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    calls: list = []  # (path, Range header) of every request

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.calls.append((self.path, self.headers.get("Range")))
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/missing":
            self.send_error(404, "Not Found")
            return
        if self.path in ("/trickle", "/steady"):  # promise a MB, then send 1 byte (or 400) every 0.1 s
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client gives up and hangs up
                for _ in range(100):
                    self.wfile.write(b"x" * (1 if self.path == "/trickle" else 400))
                    self.wfile.flush()
                    time.sleep(0.1)
            return
        if self.path == "/flaky" and len([c for c in Handler.calls if c[0] == "/flaky"]) == 1:
            # first attempt: promise everything, send half, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        self.wfile.write(BODY[start:])


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def url_source(url: str, sha: str = SHA, **kw) -> dict:
    return {
        "name": "web",
        "kind": "url",
        "url": url,
        "sha256": sha,
        "format": "jsonl",
        "filename": "docs.jsonl.gz",
        **kw,
    }


def test_a_url_is_downloaded_verified_cached_and_decompressed(tmp_path, server):
    Handler.calls.clear()
    collect_project(tmp_path, [url_source(f"{server}/docs.jsonl.gz")], run={"cache_dir": str(tmp_path / "cache")})
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "web") == ["served over HTTP", "second line"] * 200
    assert (tmp_path / "cache/downloads" / SHA / "docs.jsonl.gz").read_bytes() == BODY
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())["sources"][0]
    assert manifest["url"] == f"{server}/docs.jsonl.gz" and manifest["sha256"] == SHA
    call_stage("collect", tmp_path)  # the second time from the cache
    assert len(Handler.calls) == 1


def test_an_interrupted_download_is_retried_and_resumed(tmp_path, server):
    Handler.calls.clear()
    collect_project(
        tmp_path, [url_source(f"{server}/flaky")], run={"cache_dir": str(tmp_path / "cache"), "download_retries": 2}
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "web") == ["served over HTTP", "second line"] * 200
    assert Handler.calls == [("/flaky", None), ("/flaky", f"bytes={len(BODY) // 2}-")]  # resumed, not restarted


@pytest.mark.parametrize(
    "path,sha,needles",
    [
        ("/missing", SHA, ["HTTP 404"]),
        ("/docs.jsonl.gz", "0" * 64, ["sha256 mismatch", "0" * 64, SHA]),
        ("/slow", SHA, ["timed out", "after 2 attempts"]),
    ],
)
def test_url_failures_are_clean_errors_and_leave_nothing_behind(tmp_path, server, path, sha, needles):
    collect_project(
        tmp_path,
        [url_source(f"{server}{path}", sha)],
        run={"cache_dir": str(tmp_path / "cache"), "download_timeout_s": 0.5, "download_retries": 1},
    )
    stage_error("collect", tmp_path, "source 'web'", path, *needles)
    assert not (tmp_path / "data/raw").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".part")]


@pytest.mark.parametrize(
    "path,settings,needles",
    [
        (
            "/trickle",
            {"download_min_rate": 100},
            ["too slow", "bytes/s (collect_run.download_min_rate 100)", "after 2 attempts"],
        ),
        ("/steady", {"download_deadline_s": 1}, ["not downloaded within collect_run.download_deadline_s (1 s)"]),
    ],
)
def test_a_slow_server_fails_the_minimum_rate_or_the_deadline(tmp_path, server, path, settings, needles):
    collect_project(
        tmp_path,
        [url_source(f"{server}{path}")],
        run={"cache_dir": str(tmp_path / "cache"), "download_timeout_s": 0.5, "download_retries": 1, **settings},
    )
    started = time.monotonic()
    stage_error("collect", tmp_path, "source 'web'", path, *needles)
    assert time.monotonic() - started < 8  # not the 10 s the server would take
    parts = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert all(p.name.endswith(".part") and p.stat().st_size > 0 for p in parts)  # kept to resume, never empty


def test_an_unreachable_host_is_a_clean_error(tmp_path):
    collect_project(
        tmp_path,
        [url_source("http://127.0.0.1:9/nothing")],
        run={"cache_dir": str(tmp_path / "cache"), "download_timeout_s": 0.5, "download_retries": 0},
    )
    stage_error("collect", tmp_path, "source 'web'", "127.0.0.1:9", "after 1 attempts")


PO = r"""# Translation template
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: app.py:1
msgid "Save changes"
msgstr "Сохранить изменения"

msgid ""
"A long message "
"on two lines with \"quotes\"."
msgstr "Длинное сообщение в две строки с «кавычками»."

#, fuzzy
msgid "Delete"
msgstr "Удалить?"

msgid "Untranslated"
msgstr ""

msgid "%(count)s"
msgstr "%(count)s"

msgid "{0} <b>{1}</b>"
msgstr "{0} <b>{1}</b>"

msgctxt "menu"
msgid "One file"
msgid_plural "%d files"
msgstr[0] "Один файл"
msgstr[1] "%d файла"

#~ msgid "Old"
#~ msgstr "Старый"
"""


def write_mo(path: Path, pairs: list[tuple[str, str]]) -> None:
    """A minimal GNU .mo file (the layout msgfmt writes; no hash table)."""
    pairs = sorted(pairs)
    ids = [k.encode() for k, _ in pairs]
    strs = [v.encode() for _, v in pairs]
    n = len(pairs)
    start = 28 + 16 * n
    offsets, blob = [], b""
    for b in ids + strs:
        offsets.append((len(b), start + len(blob)))
        blob += b + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    table = b"".join(struct.pack("<2I", *o) for o in offsets)
    path.write_bytes(header + table + blob)


def test_gettext_catalogs_become_pairs_skipping_what_is_not_a_translation(tmp_path):
    (tmp_path / "ru.po").write_text(PO, encoding="utf-8")
    write_mo(
        tmp_path / "de.mo",
        [
            ("", "Content-Type: text/plain; charset=UTF-8\n"),
            ("Open", "Öffnen"),
            ("%s", "%s"),
            ("menu\x04Close", "Schließen"),
            ("Empty", ""),
        ],
    )
    assert gettext.GNUTranslations(open(tmp_path / "de.mo", "rb")).gettext("Open") == "Öffnen"  # a valid .mo
    collect_project(
        tmp_path,
        [
            {"name": "po", "kind": "file", "format": "gettext", "path": "ru.po"},
            {"name": "mo", "kind": "file", "format": "gettext", "path": "de.mo"},
        ],
    )
    call_stage("collect", tmp_path)
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "po")] == [
        ("Save changes", "Сохранить изменения"),
        ('A long message on two lines with "quotes".', "Длинное сообщение в две строки с «кавычками»."),
        ("One file", "Один файл"),
    ]
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "mo")] == [("Open", "Öffnen"), ("Close", "Schließen")]
    m = json.loads((tmp_path / "metrics/collect.json").read_text())
    assert (
        m["po"]["gettext_fuzzy"],
        m["po"]["gettext_obsolete"],
        m["po"]["gettext_untranslated"],
        m["po"]["gettext_placeholder_only"],
    ) == (1, 1, 1, 2)
    assert (m["mo"]["gettext_untranslated"], m["mo"]["gettext_placeholder_only"]) == (1, 1)


def test_a_broken_catalog_is_a_clean_error_naming_file_and_line(tmp_path):
    (tmp_path / "bad.po").write_text('msgid "ok"\nmsgstr "fine"\n\nmsgid unquoted\n', encoding="utf-8")
    collect_project(tmp_path, [{"name": "po", "kind": "file", "format": "gettext", "path": "bad.po"}])
    stage_error("collect", tmp_path, "bad.po:4", "quoted string")
    (tmp_path / "bad.po").unlink()
    (tmp_path / "bad.mo").write_bytes(struct.pack("<7I", 0x950412DE, 0, 5, 28, 68, 0, 0))
    collect_project(tmp_path, [{"name": "mo", "kind": "file", "format": "gettext", "path": "bad.mo"}])
    stage_error("collect", tmp_path, "bad.mo", "truncated or corrupt .mo")


def test_a_catalog_with_no_translated_entries_says_so(tmp_path):
    po = 'msgid "Resource Types"\nmsgstr ""\n\n#, fuzzy\nmsgid "Open"\nmsgstr "打开"\n\nmsgid "%s"\nmsgstr "%s"\n'
    (tmp_path / "zh.po").write_text(po, encoding="utf-8")
    collect_project(tmp_path, [{"name": "zh", "kind": "file", "format": "gettext", "path": "zh.po"}])
    stage_error(
        "collect",
        tmp_path,
        "source 'zh': no translated entries in zh.po",
        "fuzzy 1, untranslated 1, placeholder only 1",
    )
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_an_obsolete_entry_between_others_does_not_hide_the_next_one(tmp_path):
    (tmp_path / "mid.po").write_text('#~ msgid "Old"\n#~ msgstr "Alt"\n\nmsgid "New"\nmsgstr "Neu"\n', encoding="utf-8")
    collect_project(tmp_path, [{"name": "po", "kind": "file", "format": "gettext", "path": "mid.po"}])
    call_stage("collect", tmp_path)
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "po")] == [("New", "Neu")]
    assert json.loads((tmp_path / "metrics/collect.json").read_text())["po"]["gettext_obsolete"] == 1


def test_a_hugging_face_dataset_is_streamed_from_local_files(tmp_path):
    pytest.importorskip("datasets", reason="the [hf] extra")
    import pandas as pd

    (tmp_path / "hf").mkdir()
    for i in range(2):
        pd.DataFrame(
            {"title": [f"Title {i}-{j}" for j in range(3)], "body": [f"Body of article {i}-{j}." for j in range(3)]}
        ).to_parquet(tmp_path / "hf" / f"part-{i}.parquet")
    with open(tmp_path / "hf" / "pairs.jsonl", "w", encoding="utf-8") as f:
        for src, tgt in [("Jesus wept.", "Иисус прослезился."), ("Amen.", "Аминь.")]:
            f.write(json.dumps({"en": src, "ru": tgt}, ensure_ascii=False) + "\n")
    collect_project(
        tmp_path,
        [
            {
                "name": "articles",
                "kind": "hf",
                "dataset": "parquet",
                "data_files": [str(tmp_path / "hf" / "part-*.parquet")],
                "text_columns": ["title", "body"],
            },
            {
                "name": "bilingual",
                "kind": "hf",
                "dataset": "json",
                "data_files": [str(tmp_path / "hf" / "pairs.jsonl")],
                "pair_columns": ["en", "ru"],
            },
        ],
    )
    call_stage("collect", tmp_path)
    assert raw_texts(tmp_path, "articles") == [
        f"Title {i}-{j}\n\nBody of article {i}-{j}." for i in range(2) for j in range(3)
    ]
    assert [(r["src"], r["tgt"]) for r in raw_records(tmp_path, "bilingual")] == [
        ("Jesus wept.", "Иисус прослезился."),
        ("Amen.", "Аминь."),
    ]
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    lineage = [
        {k: m[k] for k in ("name", "kind", "dataset", "data_files", "hf_split", "pairs", "documents")}
        for m in manifest["sources"]
    ]
    assert lineage == [
        {
            "name": "articles",
            "kind": "hf",
            "dataset": "parquet",
            "data_files": [str(tmp_path / "hf" / "part-*.parquet")],
            "hf_split": "train",
            "pairs": False,
            "documents": 6,
        },
        {
            "name": "bilingual",
            "kind": "hf",
            "dataset": "json",
            "data_files": [str(tmp_path / "hf" / "pairs.jsonl")],
            "hf_split": "train",
            "pairs": True,
            "documents": 2,
        },
    ]


@pytest.mark.parametrize(
    "column, data_files, needles",
    [
        ("body", "missing-*.parquet", ["source 'articles'", "no file matches data_files", "missing-*.parquet"]),
        ("text", "part-*.parquet", ["source 'articles'", "row 0", "no field 'text'", "has: body"]),
    ],
)
def test_hugging_face_source_errors_are_one_line(tmp_path, column, data_files, needles):
    pytest.importorskip("datasets", reason="the [hf] extra")
    import pandas as pd

    (tmp_path / "hf").mkdir()
    pd.DataFrame({"body": ["one", "two"]}).to_parquet(tmp_path / "hf" / "part-0.parquet")
    collect_project(
        tmp_path,
        [
            {
                "name": "articles",
                "kind": "hf",
                "dataset": "parquet",
                "data_files": [str(tmp_path / "hf" / data_files)],
                "text_columns": [column],
            }
        ],
    )
    stage_error("collect", tmp_path, *needles)
    assert not (tmp_path / "data/raw").exists()
