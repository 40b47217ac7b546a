"""Tables: CSV, TSV and Parquet files read by pandas a chunk of rows at a time, and SQLite
databases (archive members) read by a query."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.common import PipelineError, first_line
from pipeline.data.sources.files import COMPRESSED_SUFFIXES, Limits, open_stream, read_local
from pipeline.data.sources.records import record
from pipeline.data.sources.text import text_lines

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


def table_chunks(data: bytes | Path, fmt: str, origin: str, stats: Counter, limits: Limits = Limits()) -> Iterator:
    """A CSV, TSV (no quoting) or Parquet file as pandas DataFrames of up to TABLE_ROWS rows:
    memory holds one chunk, not the file."""
    import pandas as pd

    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PipelineError(f"{origin}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        if isinstance(data, Path) and data.suffix.lower() in COMPRESSED_SUFFIXES:
            data = read_local(data, limits.file_bytes, origin)  # Parquet needs to seek: read whole
        if isinstance(data, Path) and data.stat().st_size == 0:
            stats["empty_files"] += 1
            return
        parquet = pq.ParquetFile(io.BytesIO(data) if isinstance(data, bytes) else str(data))
        for batch in parquet.iter_batches(batch_size=TABLE_ROWS):
            yield batch.to_pandas()
        return
    with open_stream(data) as f:
        reader = _LinesAsFile(text_lines(f, origin, stats, limits.document_bytes))
        try:
            yield from pd.read_csv(
                reader,
                sep="," if fmt == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE,
                chunksize=TABLE_ROWS,
            )
        except pd.errors.EmptyDataError:
            return


def records_from_table(
    data: bytes | Path, fmt: str, origin: str, columns, stats: Counter, limits: Limits = Limits()
) -> Iterator[dict]:
    """Rows of a CSV, TSV (no quoting) or Parquet file, read with pandas a chunk at a time."""
    import pandas as pd

    chunks = table_chunks(data, fmt, origin, stats, limits)
    row_number = 2 if fmt != "parquet" else 1  # CSV rows are numbered as lines, after the header
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
        present = [n for n in columns[1] if n in df.columns] if columns[0] == "qa" else columns[1]
        for name in columns[1][:2] if columns[0] == "qa" else columns[1]:  # a QA context column may be absent
            if name not in df.columns:
                raise PipelineError(f"{origin}: no column {name!r} (columns: {', '.join(map(str, df.columns))})")
            if fmt == "parquet" and not (pd.api.types.is_string_dtype(df[name]) or df[name].dtype == object):
                raise PipelineError(f"{origin}: column {name!r} holds {df[name].dtype}, expected strings")
        for row in df[present].itertuples(index=False, name=None):
            yield record(
                dict(zip(present, row)),
                columns,
                origin,
                f"{origin}:{row_number}" if fmt != "parquet" else f"{origin} row {row_number}",
            )
            row_number += 1


def records_from_sqlite(data: bytes, query: str, origin: str, scratch: Path) -> Iterator[dict]:
    """Rows of `query` on a SQLite database (an archive member): (text) or (src, tgt), and any
    columns named `meta_<key>` as the record's metadata {"meta": {key: value}} (the default Bible's
    book, which the default QA set asks for)."""
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
        names = [d[0] for d in cur.description]
        meta = [k for k, name in enumerate(names) if name.startswith("meta_")]
        width = len(names) - len(meta)
        if width not in (1, 2) or meta != list(range(width, len(names))):
            raise PipelineError(
                f"{origin}: query must return 1 column (text) or 2 (src, tgt), then any meta_<key> columns; "
                f"got {', '.join(names)}"
            )
        for row in cur:
            rec = {"text": str(row[0])} if width == 1 else {"src": str(row[0]), "tgt": str(row[1])}
            if meta:
                rec["meta"] = {names[k].removeprefix("meta_"): row[k] for k in meta}
            yield {**rec, "origin": origin}
        con.close()
    finally:
        os.unlink(db)
