"""Web pages: HTML files (a page per file or archive member) and WARC files (their HTML responses,
with their URL and date), each page's main text extracted by trafilatura: no navigation,
boilerplate, comments, scripts or links.

The main process reads the pages in order and sends them in batches to worker processes, or to
Ray tasks with data_run.executor ray (pipeline.data.pool), which extract them; their results come
back in input order, so data/raw is the same for any number of workers and either executor. Memory stays flat: a WARC is read a record at a time, a page
at most collect.max_page_bytes, and a few batches are in flight.

A page that gives no document is dropped and counted by reason (stats "web_<reason>"):
too_large (over collect.max_page_bytes: never parsed), binary, extract_error (trafilatura raised)
and no_main_text. A damaged WARC (truncated, a wrong Content-Length, not a WARC at all) is an
error naming the file and the record.

trafilatura and warcio are imported only here, when a source of these formats is read
(pip install -e ".[web]").
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pipeline.core.common import PipelineError, first_line
from pipeline.core.params import DataRun, Source
from pipeline.data.pool import Pool
from pipeline.data.sources.archives import too_large
from pipeline.data.sources.files import CORRUPT_FILE_ERRORS, Limits, corrupt_file_error, open_local
from pipeline.data.sources.text import looks_binary

WEB_FORMATS = ("html", "warc")
DROP_REASONS = ("no_main_text", "binary", "too_large", "extract_error")
DROP_COUNTS = tuple(f"web_{reason}" for reason in DROP_REASONS)
# what the manifest and the metrics count of a web source's input (warc: WARC_COUNTS too)
WEB_COUNTS = ("web_pages", *DROP_COUNTS)
WARC_COUNTS = ("warc_other_records",)  # records that are not an HTML response with a 2xx status
HTML_TYPES = ("text/html", "application/xhtml+xml")
BATCH_PAGES = 32  # pages sent to a worker at once, or fewer making up BATCH_BYTES
BATCH_BYTES = 4_000_000


class Page(NamedTuple):
    """A page as read: its bytes (None: nothing to extract, `drop` says why, or a mere marker for
    `counts`), its origin (the file's name), where it is ("FILE record N (offset X)", or the file),
    its meta ({"url", "date"} from a WARC), and the stats keys it adds one to when it is reached."""

    data: bytes | None
    origin: str
    where: str
    meta: dict
    counts: tuple[str, ...] = ()
    drop: str = ""


def records_from_pages(
    src: Source,
    files: Iterable[tuple[str, bytes | Path]],
    stats: Counter,
    limits: Limits = Limits(),
    workers: int = 1,
    dropped: dict[str, str] | None = None,
    executor: DataRun | None = None,
) -> Iterator[dict]:
    """{"text", "origin"} (WARC: and "meta" {"url", "date"}) of each page with main text, in input
    order, extracted by `workers` processes (0: one per core), or by Ray tasks where `executor`
    (data_run) says ray (0: two in flight per CPU of the cluster). Drops are counted in stats
    ("web_<reason>"), and `dropped` gets the first page of each reason. Stats count the pages
    reached, so they do not depend on `workers` where the reader stops early."""
    require(src)
    quiet_libraries()
    dropped = dropped if dropped is not None else {}
    read = warc_pages if src.format == "warc" else html_pages
    pages = (page for name, data in files for page in read(name, data, limits))
    with (
        contextlib.closing(pages),
        Pool(workers, initializer=quiet_libraries, executor=executor) as pool,
        contextlib.closing(pool.map(extract_batch, batches(pages), extract_options(src), limits.page_bytes)) as results,
    ):
        for batch in results:
            for page, drop, text in batch:
                stats.update(page.counts)
                if drop:
                    stats[f"web_{drop}"] += 1
                    dropped.setdefault(drop, page.where)
                elif text:
                    yield {"text": text, "origin": page.origin, **({"meta": page.meta} if page.meta else {})}


def require(src: Source) -> None:
    """Refuse, in one line, a web source whose libraries are not installed."""
    for module in ("trafilatura", "warcio") if src.format == "warc" else ("trafilatura",):
        try:
            importlib.import_module(module)
        except ImportError:
            raise PipelineError(
                f"source '{src.name}': format {src.format} needs {module}: pip install -e \".[web]\""
            ) from None


def extract_options(src: Source) -> dict:
    """trafilatura.extract's settings for a source: main text only, its tables if `src.tables`."""
    return {
        "include_comments": False,
        "include_links": False,
        "include_images": False,
        "include_tables": src.tables,
        "favor_precision": src.favor == "precision",
        "favor_recall": src.favor == "recall",
        "deduplicate": False,
        "with_metadata": False,
    }


def drop_summary(stats: Counter, dropped: dict[str, str]) -> str:
    """'dropped N pages: no_main_text 1 (first: a.html), binary 1 (first: ...)'."""
    counts = {reason: stats[f"web_{reason}"] for reason in DROP_REASONS if stats[f"web_{reason}"]}
    reasons = ", ".join(f"{reason} {n} (first: {dropped[reason]})" for reason, n in counts.items())
    return f"dropped {sum(counts.values())} pages: {reasons}"


# --- reading pages ---------------------------------------------------------------------------


def html_pages(name: str, data: bytes | Path, limits: Limits) -> Iterator[Page]:
    """A file (or archive member) as one page; one over limits.page_bytes is never read whole."""
    limit = limits.page_bytes or limits.file_bytes
    if isinstance(data, Path):
        try:
            with open_local(data) as f:
                data = read_up_to(f, limit + 1 if limit else 0)
        except CORRUPT_FILE_ERRORS as e:
            raise corrupt_file_error(name, e) from None
    counts = ("files", "web_pages")
    if limit and len(data) > limit:
        if not limits.page_bytes:  # no page limit: the file limit stops the stage, as for other formats
            raise too_large(name, limit)
        yield Page(None, origin_of(name), name, {}, counts, "too_large")
    else:
        yield Page(data, origin_of(name), name, {}, counts)


def warc_pages(name: str, data: bytes | Path, limits: Limits) -> Iterator[Page]:
    """The HTML responses (2xx) of a WARC file as pages with their URL and date, in order; every
    other record is a marker counted as warc_other_records. A damaged file is an error."""
    with open_warc(data) as f:
        records = warc_iterator()(f)
        counts: tuple[str, ...] = ("files",)  # added to the file's first page
        n = 0
        while True:
            n += 1
            where = f"{name} record {n} (offset {records.offset})"
            try:
                record = next(records, None)
            except Exception as e:  # warcio's parser on damaged input raises more than ArchiveLoadFailed
                what = "not a WARC file" if n == 1 else "damaged WARC record"
                raise PipelineError(f"{where}: {what} ({first_line(e)})") from None
            if record is None:
                break
            if n == 1 and record.format != "warc":
                raise PipelineError(f"{name}: not a WARC file (its first record is {record.format.upper()})")
            page = warc_page(record, records, origin_of(name), where, limits.page_bytes)
            yield page._replace(counts=counts + page.counts)
            counts = ()
        if records.cut or records.offset < records.fh.tell():
            raise PipelineError(f"{where}: truncated WARC file (it ends inside this record)")
        if counts:  # a file of no records
            yield Page(None, origin_of(name), name, {}, counts)


def warc_page(record, records, origin: str, where: str, limit: int) -> Page:
    """One WARC record as a page (an HTML response), a too-large page, or a marker; read to its end
    to check that it is whole (its Content-Length, the blank line after it)."""
    headers = record.rec_headers
    if headers.get_header("Content-Length") is None:
        raise PipelineError(f"{where}: truncated WARC record (no Content-Length)")
    http = record.http_headers
    is_page = (
        record.rec_type == "response"
        and http is not None
        and (http.get_statuscode() or "").startswith("2")
        and (http.get_header("Content-Type") or "").split(";")[0].strip().lower() in HTML_TYPES
    )
    data = read_up_to(record.content_stream(), limit + 1 if limit else 0) if is_page else None
    records.get_record_offset()  # reads the rest of the record, and the blank line after it
    if getattr(record.raw_stream, "limit", 0) > 0:
        raise PipelineError(f"{where}: truncated WARC record (it ends before its Content-Length)")
    if records.err_count:
        raise PipelineError(f"{where}: not followed by a blank line (a wrong Content-Length?)")
    if not is_page:
        return Page(None, origin, where, {}, ("warc_other_records",))
    meta = {"url": headers.get_header("WARC-Target-URI"), "date": headers.get_header("WARC-Date")}
    meta = {k: v for k, v in meta.items() if v}
    if limit and len(data) > limit:
        return Page(None, origin, where, meta, ("web_pages",), "too_large")
    return Page(data, origin, where, meta, ("web_pages",))


def open_warc(data: bytes | Path) -> BinaryIO:
    """A WARC as a binary stream: a .gz one as it is (warcio reads its gzip members, and its
    offsets are the file's), other compressions decompressed."""
    if isinstance(data, bytes):
        return io.BytesIO(data)
    return open(data, "rb") if data.suffix.lower() == ".gz" else open_local(data)


@functools.cache
def warc_iterator() -> type:
    """warcio's ArchiveIterator, quiet: a record not followed by a blank line is counted in
    err_count (not printed), and `cut` says whether the file ended inside a gzip member."""
    from warcio.archiveiterator import ArchiveIterator

    class Records(ArchiveIterator):
        INC_RECORD = ""
        cut = False

        def close(self) -> None:
            decompressor = self.reader.decompressor if self.reader else None
            self.cut = decompressor is not None and not getattr(decompressor, "eof", True)
            super().close()

    return Records


def read_up_to(stream: BinaryIO, n: int) -> bytes:
    """At most n bytes of a stream (0: all of it)."""
    parts, size = [], 0
    while not n or size < n:
        block = stream.read(min(n - size, 1 << 20) if n else 1 << 20)
        if not block:
            break
        parts.append(block)
        size += len(block)
    return b"".join(parts)


def origin_of(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# --- extracting them (in the workers) ---------------------------------------------------------


def batches(pages: Iterable[Page]) -> Iterator[list[Page]]:
    """The pages in lists of BATCH_PAGES, or fewer holding BATCH_BYTES."""
    batch: list[Page] = []
    size = 0
    for page in pages:
        batch.append(page)
        size += len(page.data or b"")
        if len(batch) >= BATCH_PAGES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def extract_batch(pages: list[Page], options: dict, max_bytes: int) -> list[tuple[Page, str, str]]:
    """(the page without its bytes, why it is dropped or "", its main text) of each page."""
    return [(page._replace(data=None), *extract_page(page, options, max_bytes)) for page in pages]


def extract_page(page: Page, options: dict, max_bytes: int) -> tuple[str, str]:
    """(why the page is dropped, or "", its main text); trafilatura detects its encoding."""
    import trafilatura

    if page.data is None:
        return page.drop, ""
    if looks_binary(page.data, utf8=False):
        return "binary", ""
    try:
        text = trafilatura.extract(page.data, config=trafilatura_config(max_bytes), **options)
    except Exception:  # anything trafilatura or lxml raise on one page drops that page
        return "extract_error", ""
    return ("", text) if text and text.strip() else ("no_main_text", "")


@functools.cache
def trafilatura_config(max_bytes: int):
    """trafilatura's settings, with its own page size limit (20 MB) at collect.max_page_bytes."""
    from trafilatura.settings import use_config

    config = use_config()
    config["DEFAULT"]["MAX_FILE_SIZE"] = str(max_bytes or sys.maxsize)
    return config


def quiet_libraries() -> None:
    """trafilatura logs what it cannot extract, and warcio the URLs it repairs: the pages dropped
    are counted instead, and a damaged WARC is an error."""
    for name in ("trafilatura", "warcio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
