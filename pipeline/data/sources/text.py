"""Text: UTF-8 decoding with its damage counted (invalid bytes become U+FFFD, NUL bytes and a BOM
are removed), the check that refuses binary files, a file's lines read as a stream, and cutting
lines into documents (the whole file, paragraphs or lines, optionally merged into chunks)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline.core.common import PipelineError


def looks_binary(data: bytes, utf8: bool = True) -> bool:
    """Over 30% of the first 64 KB are control bytes (other than tab, newline, FF, CR) or not UTF-8.

    Latin-1 or damaged text stays well under that (its odd bytes are letters); executables,
    images, archives and UTF-16 are far over it.

    utf8=False, for text in an unknown encoding (a web page): over 5% are control bytes (ESC, which
    ISO-2022 shifts with, allowed too). Text in any ASCII-based encoding (UTF-8, cp1251, Shift-JIS,
    GB2312...) has next to none, even where most of its bytes are not UTF-8; random, compressed and
    executable bytes have 10% or more (27 of the 256 values).
    """
    head = data[:65536]
    allowed = (9, 10, 12, 13) if utf8 else (9, 10, 12, 13, 27)
    controls = sum(head.count(bytes([b])) for b in range(32) if b not in allowed)
    if not utf8:
        return controls > 0.05 * len(head)
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


def text_lines(stream: BinaryIO, origin: str, stats: Counter, limit: int = 0) -> Iterator[str]:
    """The lines of a file read as a stream (memory: one line at a time), decoded as decode_text()
    decodes a whole file; CRLF and lone CR end lines too (counted in stats["crlf_lines"]). An empty
    or whitespace-only file is counted (stats["empty_files"]) and yields nothing.
    A line longer than `limit` bytes (a decompression bomb's) is cut there, counted in
    stats["truncated_lines"]: memory holds at most `limit` bytes of it."""
    first = stream.read(65536)
    if not first.strip():
        rest = stream.read(65536)
        while rest and not rest.strip():
            rest = stream.read(65536)
        if not rest:  # nothing but whitespace
            stats["empty_files"] += 1
            return
        first += rest
    _refuse_binary(first, origin)
    start = True
    parts: list[bytes] = []  # the line so far, when it spans blocks (at most `limit` bytes of it)
    size, over = 0, False
    for block in itertools.chain([first], iter(lambda: stream.read(1 << 20), b"")):
        *complete, rest = block.split(b"\n")
        for raw in complete:
            if parts:
                raw, parts, size = b"".join([*parts, raw]), [], 0
            if limit and (over or len(raw) > limit):
                raw, over = raw[:limit], False
                stats["truncated_lines"] += 1
            yield from _lines_of(_decode(raw, stats), start, stats)
            start = False
        keep = min(len(rest), limit - size) if limit else len(rest)
        over = over or keep < len(rest)
        if keep > 0:
            parts.append(rest[:keep])
            size += keep
    if any(parts):
        if over:
            stats["truncated_lines"] += 1
        yield from _lines_of(_decode(b"".join(parts), stats), start, stats)


def _lines_of(line: str, first: bool, stats: Counter) -> Iterator[str]:
    if first:
        line = _without_bom(line, stats)
    if "\r" not in line:
        yield line
    else:
        stats["crlf_lines"] += line.endswith("\r")
        yield from line.removesuffix("\r").replace("\r", "\n").split("\n")


def documents(
    lines: Iterable[str], how: str, chunk_chars: int, limit: int = 0, stats: Counter | None = None
) -> Iterator[str]:
    """Cut a file's lines into documents: the whole file, blank-line paragraphs, or lines.

    With `chunk_chars`, consecutive units are merged into documents of at least that many
    characters, so a long work becomes many documents of similar size (what the split needs).
    Streams: memory holds one document, of at most `limit` bytes: a longer file or paragraph is
    cut there (its other lines skipped), counted in stats["truncated_documents"].
    """
    stats = stats if stats is not None else Counter()

    def bounded(unit_lines: Iterable[str]) -> Iterator[list[str]]:
        """Groups of consecutive lines (a file, or each paragraph), each cut at `limit` bytes."""
        group: list[str] = []
        size, cut = 0, False
        for line in unit_lines:
            if line is None:  # the end of a group
                if group:
                    yield group
                group, size, cut = [], 0, False
                continue
            if cut:
                continue
            size += len(line.encode("utf-8")) + 1
            if limit and size > limit:
                cut = True
                stats["truncated_documents"] += 1
                continue
            group.append(line)
        if group:
            yield group

    def units() -> Iterator[str]:
        if how == "file":
            for group in bounded(lines):
                text = "\n".join(group).strip("\n")
                if text.strip():
                    yield text
        elif how == "lines":
            yield from (line for line in lines if line.strip())
        else:
            marked = (line if line.strip(" \t") else None for line in lines)  # None: a blank line
            for paragraph in bounded(marked):
                yield "\n".join(paragraph)

    if chunk_chars <= 0:
        yield from units()
        return
    sep = "\n\n" if how == "paragraphs" else "\n"
    current, size = [], 0
    for unit in units():
        current.append(unit)
        size += len(unit)
        if size >= chunk_chars:
            yield sep.join(current)
            current, size = [], 0
    if current:
        yield sep.join(current)
