"""Pool: a function over a stream of items by worker processes, or by tasks on a Ray cluster
(data_run.executor), the results given back in input order with a bounded number in flight, so
memory does not grow with the input. The data stages' per-file and per-shard work runs through it
(clean's shards, collect's web pages); deciding what depends on earlier items stays with the
caller, in order, so the outputs are the same for any executor and number of workers."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from pipeline.core.params import DataRun
from pipeline.data.ray_pool import RayBackend


class Lines(NamedTuple):
    """Whole lines of one file (JSON lines), about a task's worth of them."""

    chunk: bytes
    first_line: int  # the line number of the chunk's first line, from 1
    path: str


def read_lines(path: Path, size: int) -> Iterator[Lines]:
    """A file's lines in chunks of whole lines of about `size` bytes, for the pool's tasks."""
    with open(path, "rb") as f:
        line = 1
        while chunk := f.read(size):
            chunk += f.readline()
            yield Lines(chunk, line, str(path))
            line += chunk.count(b"\n")


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Pool:
    """fn(item, *extra) for each item, in input order, by `workers` processes (0: one per core)
    that ran initializer(*initargs) first; at most 2 items per worker are in flight. One worker:
    everything runs in this process. On Linux the workers are forked, so large initargs are shared
    copy-on-write. With `executor` ray (data_run), Ray tasks do it instead (0 workers: 2 tasks in
    flight per CPU of the cluster; pipeline.data.ray_pool)."""

    def __init__(
        self, workers: int, initializer: Callable | None = None, initargs: tuple = (), executor: DataRun | None = None
    ):
        self.pool = self.ray = None
        if executor is not None and executor.executor == "ray":
            self.ray = RayBackend(workers, initializer, initargs, executor)
            self.workers = self.ray.workers
            return
        self.workers = workers or cores()
        if self.workers == 1:
            if initializer is not None:
                initializer(*initargs)
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=initializer, initargs=initargs)

    def map(self, fn: Callable, items: Iterable, *extra) -> Iterator:
        if self.ray is not None:
            yield from self.ray.map(fn, items, *extra)
            return
        if self.pool is None:
            yield from (fn(item, *extra) for item in items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item, *extra)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.ray is not None:
            self.ray.close()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
