"""Web pages through collect: pages/s per core against trafilatura's own speed, and memory on a 1 GB WARC.

    python benchmarks/speed/web_extract.py [--pages 3000] [--repeats 3] [--warc-mb 100 1000]

The pages are the 8 real ones in trafilatura 2.3.1's sdist (tests/resources/*.html: an Apache
status page, a Mozilla product page, a Moby-Dick chapter, a UTF-8 demo, a scam list...), fetched
as the pipeline fetches a pinned PyPI source. From them it builds --pages varied pages (fixed
seed): page i is page i % 8 with the words of each text node drawn from that page's own words, and
an inline <script> of 0 to 100 KB, as real pages carry; each has its own URL and date in a WARC
written with warcio.

Timed in this process, one core, alternating, median of --repeats:
- bare: `trafilatura.extract` of each page's bytes, with collect's settings (the floor);
- html: collect_source() on the pages as files (format html, collect_run.workers 1);
- warc: collect_source() on the WARC (.warc.gz) of the same pages (workers 1), and with 2 workers.
It prints pages/s of each and the ratio to bare.

Memory: for each --warc-mb size it writes a .warc of about that many MB of those pages and runs the
collect stage on it (`python -m pipeline.collect` in a scratch project, collect_run.workers 2),
sampling the proportional set size (PSS) of its process tree every 0.2 s: the peak should not grow
with the WARC.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_scale import run_stage  # noqa: E402  (benchmarks/speed: a stage's time and peak PSS)

from pipeline.collect import collect_source  # noqa: E402
from pipeline.core import params as P  # noqa: E402
from pipeline.data.sources.archives import archive_members  # noqa: E402
from pipeline.data.sources.fetch import fetch_pypi  # noqa: E402

SDIST = {
    "name": "trafilatura_pages",
    "kind": "pypi",
    "package": "trafilatura==2.3.1",
    "dist": "sdist",
    "filename": "trafilatura-2.3.1.tar.gz",
    "sha256": "2e5557aeab32d33b9da7ff0debbb677a676c5b648a927e50d91b8277011e1105",
    "members": "trafilatura-2.3.1/tests/resources/*.html",
    "format": "html",
    "license": "Apache-2.0 (trafilatura's test pages)",
}
WORD = re.compile(r"(?<=>)([^<]+)(?=<)")


def real_pages() -> list[bytes]:
    src = P.Source(**SDIST)
    archive = fetch_pypi(src, Path(P.CollectRun().cache_dir).expanduser())
    return [data for _, data in archive_members(archive, src.members)]


def varied(pages: list[bytes], n: int, seed: int = 0) -> list[bytes]:
    """n pages: page i is page i % len(pages), the words between its tags drawn from its own words, with an
    inline script of 0 to 100 KB before </head>."""
    rng = random.Random(seed)
    texts = [p.decode("utf-8", errors="replace") for p in pages]
    vocab = [[w for chunk in WORD.findall(t) for w in chunk.split()] or ["word"] for t in texts]
    out = []
    for i in range(n):
        k = i % len(texts)

        def redraw(m: re.Match, k=k) -> str:
            words = m.group(1).split()
            return " ".join(rng.choice(vocab[k]) for _ in words) if words else m.group(1)

        script = (
            "<script>var x = [" + ",".join(str(rng.random()) for _ in range(rng.randrange(0, 5000))) + "];</script>"
        )
        page = WORD.sub(redraw, texts[k])
        page = page.replace("</head>", script + "</head>", 1) if "</head>" in page else script + page
        out.append(page.encode("utf-8"))
    return out


def write_warc(path: Path, pages: list[bytes], repeat_to_bytes: int = 0) -> int:
    """A .warc(.gz) of the pages as HTTP responses, each with its own URL and date (the list cycled until
    `repeat_to_bytes` if given); return the number of records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    n = 0
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=path.suffix == ".gz")
        while (n < len(pages) and not repeat_to_bytes) or f.tell() < repeat_to_bytes:
            page = pages[n % len(pages)]
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            record = writer.create_warc_record(
                f"https://site{n % 97}.example/page/{n}",
                "response",
                payload=io.BytesIO(page),
                http_headers=headers,
                warc_headers_dict={"WARC-Date": (start + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")},
            )
            writer.write_record(record)
            n += 1
    return n


def bare(pages: list[bytes]) -> float:
    import trafilatura

    t0 = time.perf_counter()
    for page in pages:
        trafilatura.extract(
            page, include_comments=False, include_links=False, include_images=False, include_tables=True
        )
    return time.perf_counter() - t0


def through_collect(src: P.Source, workers: int, out: Path) -> tuple[float, int]:
    run = dataclasses.replace(P.CollectRun(), workers=workers)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        entry = collect_source(src, P.Collect(sources=[src]), run, out)
    return time.perf_counter() - t0, entry["documents"]


def speed(pages: list[bytes], repeats: int, tmp: Path) -> None:
    folder = tmp / "pages"
    folder.mkdir()
    for i, page in enumerate(pages):
        (folder / f"{i:06d}.html").write_bytes(page)
    warc = tmp / "pages.warc.gz"
    write_warc(warc, pages)
    html_src = P.Source(name="html", kind="file", format="html", path=str(folder / "*.html"))
    warc_src = P.Source(name="warc", kind="file", format="warc", path=str(warc))
    out = tmp / "raw"
    out.mkdir()
    runs: dict[str, list[float]] = {"bare": [], "html": [], "warc": [], "warc, 2 workers": []}
    documents = {}
    bare(pages[:8])  # trafilatura's first call loads its settings
    for r in range(repeats):
        runs["bare"].append(bare(pages))
        for name, src, workers in (("html", html_src, 1), ("warc", warc_src, 1), ("warc, 2 workers", warc_src, 2)):
            seconds, documents[name] = through_collect(src, workers, out)
            runs[name].append(seconds)
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)
    base = statistics.median(runs["bare"])
    print(f"\n{len(pages)} pages ({sum(map(len, pages)) / 1e6:.1f} MB of HTML), median of {repeats}:")
    for name, times in runs.items():
        s = statistics.median(times)
        kept = f", {documents[name]} documents" if name in documents else ""
        print(f"  {name:18s} {len(pages) / s:7.1f} pages/s  ({s:.2f} s, {base / s:.2f}x bare{kept})")


def memory(pages: list[bytes], sizes_mb: list[int], tmp: Path) -> None:
    print("\nmemory: the collect stage on one .warc (collect_run.workers 2), peak PSS of its processes")
    for mb in sizes_mb:
        project = tmp / f"mem{mb}"
        project.mkdir()
        warc = project / "crawl.warc"
        records = write_warc(warc, pages, mb * 1_000_000)
        params = {
            "collect": {"sources": [{"name": "crawl", "kind": "file", "format": "warc", "path": "crawl.warc"}]},
            "collect_run": {"workers": 2},
        }
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        seconds, peak, _ = run_stage("collect", project)
        size = warc.stat().st_size
        print(
            f"  {size / 1e6:7.0f} MB, {records} records: {seconds:.0f} s ({records / seconds:.0f} pages/s), peak {peak:.0f} MB"
        )
        warc.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warc-mb", type=int, nargs="*", default=[100, 1000])
    args = ap.parse_args()
    pages = real_pages()
    print(f"{len(pages)} real pages; building {args.pages} varied ones", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print("\nthe 8 real pages, 25 times each:")
        real = Path(tmp) / "real"
        real.mkdir()
        speed(pages * 25, args.repeats, real)
        many = Path(tmp) / "varied"
        many.mkdir()
        print(f"\n{args.pages} varied pages:")
        speed(varied(pages, args.pages), args.repeats, many)
        if args.warc_mb:
            memory(varied(pages, 400, seed=1), args.warc_mb, Path(tmp))


if __name__ == "__main__":
    main()
