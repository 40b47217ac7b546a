"""Zip and tar archives: the members matching a glob, in name order; a member that would land
outside the archive's folder if extracted (an absolute path, `..`, a link) is refused."""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import lzma
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.core.common import PipelineError


def check_member(archive: Path, name: str, link: bool = False) -> None:
    """Refuse a member that would land outside the archive's folder if extracted."""
    parts = name.replace("\\", "/").split("/")
    if link or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        what = "a link" if link else "a path outside the archive's folder"
        raise PipelineError(f"{archive}: member {name!r} is {what}; refused")


def too_large(what: str, limit: int) -> PipelineError:
    return PipelineError(
        f"{what} holds more than collect_run.max_file_bytes ({limit:,} bytes) once decompressed; refused "
        "(a decompression bomb? raise the limit for a real file this large)"
    )


def archive_members(archive: Path, pattern: str, limit: int = 0) -> Iterator[tuple[str, bytes]]:
    """("archive:member", bytes) of the archive members matching `pattern`, in name order (the
    archive's name comes first, so an error about a member names both); a member of more than
    `limit` bytes once decompressed is refused, having read no more than that."""
    try:
        with _archive_entries(archive) as entries:
            for name, is_link, read in sorted(
                (entry for entry in entries if fnmatch.fnmatchcase(entry[0], pattern)), key=lambda entry: entry[0]
            ):
                check_member(archive, name, is_link)
                data = read(limit + 1 if limit else -1)
                if data is not None and limit and len(data) > limit:
                    raise too_large(f"{archive}: member {name!r}", limit)
                if data is not None:
                    yield f"{archive.name}:{name}", data
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        raise PipelineError(f"{archive}: truncated or corrupt archive ({e})") from None


@contextlib.contextmanager
def _archive_entries(archive: Path) -> Iterator[list[tuple[str, bool, Callable[[], bytes | None]]]]:
    """(name, is_link, read) of each member of a zip or tar archive but its folders, while it is open;
    read(n) returns (up to n of) the member's bytes, or None for a tar member that is not a regular file."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            yield [
                (
                    info.filename,
                    (info.external_attr >> 16) & 0o170000 == 0o120000,
                    functools.partial(_zip_member_bytes, zip_file, info),
                )
                for info in zip_file.infolist()
                if not info.is_dir()
            ]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            yield [
                (member.name, member.issym() or member.islnk(), functools.partial(_tar_file_bytes, tar, member))
                for member in tar.getmembers()
                if not member.isdir()
            ]
    else:
        raise PipelineError(f"{archive}: neither a zip nor a tar archive")


def _zip_member_bytes(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, n: int = -1) -> bytes:
    with zip_file.open(info) as f:
        return f.read(n)


def _tar_file_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, n: int = -1) -> bytes | None:
    return tar.extractfile(member).read(n) if member.isfile() else None
