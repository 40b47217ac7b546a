"""Small helpers every stage shares: the user-facing error, atomic outputs, JSON/JSONL I/O."""

from __future__ import annotations

import contextlib
import gc
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEXT_FIELDS = ("text", "src", "tgt")  # a record is a document {"text"} or a pair {"src", "tgt"}


def text_fields(record: dict) -> list[str]:
    return [k for k in TEXT_FIELDS if k in record]


def utf8_bytes(record: dict) -> int:
    """Bytes of a record's text (both sides of a pair): the denominator of bits per byte."""
    return sum(len(record[k].encode("utf-8")) for k in text_fields(record))


class PipelineError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit status 1 (or exit_code)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e: BaseException) -> str:
    """An exception as one short line, "Type: first line of its message", for error messages."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:200]}" if msg else type(e).__name__


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main(): user errors become one line on stderr and a non-zero exit."""
    try:
        main()
        return
    except PipelineError as e:
        message, code = str(e), e.exit_code
    except OSError as e:  # the machine's, not the input's: a full disk, a read-only folder, no permission
        where = f"{e.filename}: " if e.filename else ""
        message, code = f"{where}{e.strerror or first_line(e)}", 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    print(f"error: {message}", file=sys.stderr)
    # Out of the except block, the failed work's frames are gone: what they held (dvclive's git
    # repository, say) is finalised now, and not at interpreter exit, where a finaliser that
    # imports fails with a traceback of its own ("sys.meta_path is None").
    gc.collect()
    sys.exit(code)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove `prefix`.tmp-PID and `prefix`.old-PID entries of `folder` whose process is gone: what
    a killed stage left behind (a live process's, a concurrent run's, are left alone)."""
    if not folder.is_dir():
        return
    for entry in folder.glob(f"{glob.escape(prefix)}.*-*"):
        kind, _, pid = entry.name[len(prefix) + 1 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces `path` only if the block succeeds.

    A failed or killed stage leaves the previous output exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            raise _naming(e, path) from None
        raise
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:
            raise _naming(e, path) from None
        raise
    os.replace(tmp, path)


def _naming(e: OSError, path: Path) -> PipelineError:
    """A write's OSError (a full disk names no file) as one line naming what was being written."""
    return PipelineError(f"{path}: {e.strerror or first_line(e)} while writing it; the earlier {path} is unchanged")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON (line {e.lineno})") from None


def json_line(line: bytes | str, path: str | Path, lineno: int) -> Any:
    """One line of a JSON lines file; a line that is not JSON is an error naming the file and line."""
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        raise PipelineError(f"{path}:{lineno}: not valid JSON") from None


def read_jsonl(path: str | Path, keep: Callable[[bytes], bool] | None = None) -> Iterator[dict]:
    """The records of a JSON lines file, read as it goes; with `keep`, only the lines (raw bytes)
    it accepts are parsed."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the stage that writes it first: dvc repro)")
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip() and (keep is None or keep(line)):
                yield json_line(line, path, i)


def cpu_threads() -> int:
    """The threads torch uses where a knob says 0: OMP_NUM_THREADS where it is set (the convention
    torch and every BLAS follow: a shared machine's limit, or a test run's), else all cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads if threads > 0 else cpu_threads())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
