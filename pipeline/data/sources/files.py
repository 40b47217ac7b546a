"""Local files: a source's path (a file, a glob or a folder) as files or archive members, opened
as binary streams with .gz, .bz2, .xz and .zst decompressed on the fly; a damaged compressed file
is an error naming it."""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from pipeline.core.common import PipelineError, first_line
from pipeline.core.params import Source
from pipeline.data.sources.archives import archive_members, too_large

DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
COMPRESSED_SUFFIXES = (*DECOMPRESS, ".zst")
# what opening, reading or closing a damaged compressed file raises
CORRUPT_FILE_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


class Limits(NamedTuple):
    """What one read may hold in memory (0: no limit), so a decompression bomb (a 1 MB zip of
    4 GB) is cut or refused rather than read whole: a document or line (collect.max_document_bytes),
    a file or archive member read whole (collect_run.max_file_bytes), and a web page (a larger one
    is dropped, counted: collect.max_page_bytes)."""

    document_bytes: int = 0
    file_bytes: int = 0
    page_bytes: int = 0


def open_local(path: str | Path) -> BinaryIO:
    """A file as a binary stream; .gz, .bz2, .xz and .zst files decompressed as they are read."""
    suffix = Path(path).suffix.lower()
    if suffix in DECOMPRESS:
        return DECOMPRESS[suffix](path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def corrupt_file_error(path: str | Path, e: BaseException) -> PipelineError:
    """The one-line error for a damaged compressed file, naming it and its compression."""
    return PipelineError(f"{path}: truncated or corrupt {Path(path).suffix.lower()[1:]} file ({first_line(e)})")


def read_local(path: str | Path, limit: int = 0, name: str = "") -> bytes:
    """A file's bytes, decompressed (a truncated one is an error, and so is one over `limit` bytes);
    errors name it `name` (default: its path)."""
    name = name or str(path)
    try:
        with open_local(path) as f:
            data = f.read(limit + 1) if limit else f.read()
    except CORRUPT_FILE_ERRORS as e:
        raise corrupt_file_error(name, e) from None
    if limit and len(data) > limit:
        raise too_large(name, limit)
    return data


def open_stream(data: bytes | Path) -> BinaryIO:
    """An archive member's bytes, or a local file (read as it goes), as a binary stream."""
    return io.BytesIO(data) if isinstance(data, bytes) else open_local(data)


def local_files(src: Source, pattern: str | None = None, limit: int = 0) -> Iterator[tuple[str, bytes | Path]]:
    """(name, Path) of the files matching `pattern` (src.path: a file, a glob or a folder), or
    (name, bytes) of the members of those archives (each at most `limit` bytes)."""
    pattern = os.path.expanduser(pattern or src.path)
    if os.path.isdir(pattern):  # a folder: every file below it
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise PipelineError(f"source '{src.name}': no file matches path '{pattern}'")
    if src.format == "aligned" and len(paths) != 1:
        raise PipelineError(
            f"source '{src.name}': format 'aligned' needs one file per side, '{pattern}' matches {len(paths)}"
        )
    for p in paths:
        if src.members and src.kind == "file":
            yield from archive_members(Path(p), src.members, limit)
        else:
            yield p, Path(p)
