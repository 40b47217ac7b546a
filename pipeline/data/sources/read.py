"""read_documents: a source's files (or archive members) as records, by the source's format; with
data_run.executor ray, the files of a source read to its end as Ray tasks, a file per task."""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from pipeline.core.common import PipelineError
from pipeline.core.params import DataRun, Source
from pipeline.data.pool import Pool
from pipeline.data.sources.files import (
    CORRUPT_FILE_ERRORS,
    Limits,
    corrupt_file_error,
    local_files,
    open_stream,
    read_local,
)
from pipeline.data.sources.gettext import records_from_catalog
from pipeline.data.sources.records import Tally, json_line, named_columns, records_from_aligned, records_from_jsonl
from pipeline.data.sources.tables import records_from_sqlite, records_from_table
from pipeline.data.sources.text import decode_text, documents, text_lines
from pipeline.data.sources.web import WEB_FORMATS, records_from_pages

STREAMED_FORMATS = ("text", "jsonl", "csv", "tsv", "parquet")  # read a document or a chunk of rows at a time


class FileRecords(NamedTuple):
    """A file's records as a Ray task read them: their JSON lines as data/raw writes them, what
    reading counted (stats), their Tally, and the error that stopped the reading ("": none; the
    records before it are here, as the local path would have written them before stopping)."""

    lines: bytes
    stats: Counter
    tally: Tally
    error: str = ""


def read_documents(
    src: Source,
    files: Iterator[tuple[str, bytes | Path]],
    scratch: Path,
    stats: Counter,
    limits: Limits = Limits(),
    workers: int = 1,
    dropped: dict[str, str] | None = None,
    executor: DataRun | None = None,
    to_the_end: bool = True,
) -> Iterator[dict | FileRecords]:
    """Records of each file. Text, JSON lines, CSV/TSV and Parquet are streamed (memory: a document
    or a chunk of rows, each within `limits`); web pages (html, warc) too, their main text extracted
    by `workers` processes (or Ray tasks: `executor`), the first page dropped for each reason in
    `dropped`; the other formats read a file (or archive member) at a time, refused beyond
    `limits.file_bytes`.

    With `executor` ray, a source of several streamed files read `to_the_end` (no max_documents)
    gives FileRecords instead, a file's at a time (file_tasks); one file, or a source cut short,
    is streamed here, as without Ray."""
    if src.format in WEB_FORMATS:
        yield from records_from_pages(src, files, stats, limits, workers, dropped, executor)
        return
    columns = named_columns(src)
    if executor is not None and executor.executor == "ray" and to_the_end and src.format in STREAMED_FORMATS:
        files = for_tasks(files)
        head = list(itertools.islice(files, 2))
        if len(head) > 1:
            yield from file_tasks(src, itertools.chain(head, files), stats, limits, columns, executor)
            return
        if head and isinstance(head[0], PipelineError):  # listing the files failed at the first
            raise head[0]
        files = iter(head)  # one file (or none): streamed here
    for name, data in files:
        if src.format in STREAMED_FORMATS:
            yield from file_records(src, name, data, stats, limits, columns)
            continue
        stats["files"] += 1
        if isinstance(data, Path):
            data = read_local(data, limits.file_bytes)
        if not data.strip():
            stats["empty_files"] += 1
            continue
        if src.format == "gettext":
            yield from records_from_catalog(data, name, stats)
        elif src.format == "aligned":
            ((tgt_name, tgt_path),) = local_files(src, src.target_path)
            tgt_data = read_local(tgt_path, limits.file_bytes)
            yield from records_from_aligned(
                decode_text(data, name, stats), decode_text(tgt_data, tgt_name, stats), name, tgt_name, stats
            )
        else:
            yield from records_from_sqlite(data, src.query, name, scratch)


def file_records(src: Source, name: str, data: bytes | Path, stats: Counter, limits: Limits, columns) -> Iterator[dict]:
    """The records of one file (or archive member) of a streamed format, read as it goes."""
    stats["files"] += 1
    origin = name.rsplit("/", 1)[-1]
    try:
        if src.format in ("text", "jsonl"):
            with open_stream(data) as f:
                lines = text_lines(f, name, stats, limits.document_bytes)
                if src.format == "jsonl":
                    yield from records_from_jsonl(lines, name, columns)
                else:
                    for doc in documents(lines, src.split, src.chunk_chars, limits.document_bytes, stats):
                        yield {"text": doc, "origin": origin}
        else:
            yield from records_from_table(data, src.format, name, columns, stats, limits)
    except CORRUPT_FILE_ERRORS as e:  # opening or closing a damaged compressed file
        raise corrupt_file_error(name, e) from None


# --- a file per Ray task ---------------------------------------------------------------------


def file_tasks(
    src: Source, files: Iterable, stats: Counter, limits: Limits, columns, executor: DataRun
) -> Iterator[FileRecords]:
    """Each file's FileRecords, read by a Ray task (2 per CPU of the cluster in flight), in input
    order: memory holds the records of those files, the driver's one file's at a time. A file's
    error is raised once the records read before it are taken, as the local path raises it."""
    with (
        Pool(0, executor=executor) as pool,
        contextlib.closing(pool.map(read_file, files, src, limits, columns)) as parts,
    ):
        for part in parts:
            stats.update(part.stats)
            yield part
            if part.error:
                raise PipelineError(part.error)


def read_file(item: tuple[str, bytes | Path] | PipelineError, src: Source, limits: Limits, columns) -> FileRecords:
    """A Ray task: one file's records (file_records, as the local path reads them) as FileRecords."""
    stats: Counter = Counter()
    tally = Tally(src)
    lines: list[bytes] = []
    try:
        if isinstance(item, PipelineError):  # listing the files failed there (for_tasks)
            raise item
        for rec in file_records(src, *item, stats, limits, columns):
            tally.add(rec)
            lines.append(json_line(rec))
    except PipelineError as e:
        return FileRecords(b"".join(lines), stats, tally, str(e))
    return FileRecords(b"".join(lines), stats, tally)


def for_tasks(files: Iterator[tuple[str, bytes | Path]]) -> Iterator[tuple[str, bytes | Path] | PipelineError]:
    """The files as the tasks take them: a local file by its absolute path (a task's working folder
    is not this one; its name, which errors give, stays as it was), an archive member as its bytes;
    then the error that listing them raised (an archive member over the limit, a damaged archive)
    as an item of its own: the Pool lists files ahead of the results it gives back, and the error
    is raised in its turn, after the files before it, as the local path does."""
    try:
        for name, data in files:
            yield name, data.absolute() if isinstance(data, Path) else data
    except PipelineError as e:
        yield e
