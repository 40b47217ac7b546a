"""read_documents: a source's files (or archive members) as records, by the source's format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.params import Source
from pipeline.data.sources.files import (
    CORRUPT_FILE_ERRORS,
    Limits,
    corrupt_file_error,
    local_files,
    open_stream,
    read_local,
)
from pipeline.data.sources.gettext import records_from_catalog
from pipeline.data.sources.records import named_columns, records_from_aligned, records_from_jsonl
from pipeline.data.sources.tables import records_from_sqlite, records_from_table
from pipeline.data.sources.text import decode_text, documents, text_lines
from pipeline.data.sources.web import WEB_FORMATS, records_from_pages


def read_documents(
    src: Source,
    files: Iterator[tuple[str, bytes | Path]],
    scratch: Path,
    stats: Counter,
    limits: Limits = Limits(),
    workers: int = 1,
    dropped: dict[str, str] | None = None,
) -> Iterator[dict]:
    """Records of each file. Text, JSON lines, CSV/TSV and Parquet are streamed (memory: a document
    or a chunk of rows, each within `limits`); web pages (html, warc) too, their main text extracted
    by `workers` processes, the first page dropped for each reason in `dropped`; the other formats
    read a file (or archive member) at a time, refused beyond `limits.file_bytes`."""
    if src.format in WEB_FORMATS:
        yield from records_from_pages(src, files, stats, limits, workers, dropped)
        return
    columns = named_columns(src)
    for name, data in files:
        stats["files"] += 1
        origin = name.rsplit("/", 1)[-1]
        if src.format in ("text", "jsonl"):
            try:
                with open_stream(data) as f:
                    lines = text_lines(f, name, stats, limits.document_bytes)
                    if src.format == "jsonl":
                        yield from records_from_jsonl(lines, name, columns)
                    else:
                        for doc in documents(lines, src.split, src.chunk_chars, limits.document_bytes, stats):
                            yield {"text": doc, "origin": origin}
            except CORRUPT_FILE_ERRORS as e:  # opening or closing a damaged compressed file
                raise corrupt_file_error(name, e) from None
            continue
        if src.format in ("csv", "tsv", "parquet"):
            try:
                yield from records_from_table(data, src.format, name, columns, stats, limits)
            except CORRUPT_FILE_ERRORS as e:
                raise corrupt_file_error(name, e) from None
            continue
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
