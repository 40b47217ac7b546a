"""The Ray executor of the data stages' Pool (data_run.executor: ray): each item is a Ray task,
retried elsewhere if its node dies, the results taken back in input order with at most two tasks
per CPU of the cluster in flight, so the driver's memory does not grow with the input.

A task runs the pool's initializer once per worker process (the first time a process meets this
pool), then the function: what a local worker does, so the outputs are the same. The initializer's
arguments (clean's settings, val/test's n-grams) go to the object store once. Ray is imported
only here, and only when a stage runs on it (pip install -e ".[cluster]").
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from pipeline.core.common import PipelineError, first_line
from pipeline.core.params import DataRun

PROBE_S = 2.0  # while waiting for a task, how often the head is asked whether it still answers
RETRIES = 3  # a task whose worker or node died runs again, elsewhere, up to this many times
_READY: dict[str, bool] = {}  # in a worker process: the pools whose initializer has run here


def _task(setup: tuple, fn: Callable, item, *extra):
    token, initializer, initargs = setup
    if token not in _READY:
        if initializer is not None:
            initializer(*initargs)
        _READY.clear()  # one pool at a time: a later pool's state replaces an earlier one's
        _READY[token] = True
    return fn(item, *extra)


def _ray():
    try:
        import ray
    except ImportError:
        raise PipelineError('data_run.executor: ray needs Ray installed: pip install -e ".[cluster]"') from None
    return ray


def address_of(run: DataRun) -> str:
    """The cluster to use: data_run.address, else $RAY_ADDRESS, else "" (start one here)."""
    return run.address or os.environ.get("RAY_ADDRESS", "")


def check_answers(address: str, timeout: float) -> None:
    """A host:port address must accept a connection within `timeout` seconds (ray.init would wait longer)."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"data_run.address: {address!r} is not host:port (nor auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PipelineError(f"data_run.address: nothing answers at {address} ({e.strerror or e})") from None


def has_token() -> bool:
    """Whether this machine holds a Ray cluster token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or the
    ~/.ray/auth_token that `ray start` writes)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


class RayBackend:
    """fn(item, *extra) for each item as Ray tasks, in input order, at most 2 per CPU in flight."""

    def __init__(self, workers: int, initializer: Callable | None, initargs: tuple, run: DataRun):
        self.address = address_of(run)
        if self.address and "RAY_AUTH_MODE" not in os.environ and has_token():
            os.environ["RAY_AUTH_MODE"] = "token"  # `ray start` clusters want its token; read when ray is imported
        ray = self.ray = _ray()
        if not ray.is_initialized():  # the stage's first pool: join the cluster (or start one) for the stage
            check_answers(self.address, run.connect_timeout_s)
            options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            try:
                if self.address:
                    ray.init(address=self.address, **options)
                else:
                    ray.init(address="local", num_cpus=workers or None, **options)  # a new one, not a running one
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.address or "a Ray started here"
                raise PipelineError(
                    f"data_run.address: cannot join the Ray cluster at {where} ({first_line(e)})"
                ) from None
        self.gcs = ray.get_runtime_context().gcs_address  # host:port of the head, whatever the address said
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or cpus
        self.setup = ray.put((uuid.uuid4().hex, initializer, initargs))
        self.task = ray.remote(num_cpus=1, max_retries=RETRIES)(_task)

    def map(self, fn: Callable, items: Iterable, *extra) -> Iterator:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((self.task.remote(self.setup, fn, item, *extra), item))
                if len(pending) >= 2 * self.workers:
                    yield self.result(*pending.popleft())
            while pending:
                yield self.result(*pending.popleft())
        finally:
            for ref, _ in pending:
                self.ray.cancel(ref, force=True)

    def result(self, ref, item):
        """A task's result; its failure as one line naming what it worked on. While it waits, the
        head is asked every PROBE_S seconds whether it still answers (Ray itself waits a minute for
        a lost head, then ends the process without a word this stage could say)."""
        ray = self.ray
        try:
            while True:
                try:
                    return ray.get(ref, timeout=PROBE_S)
                except ray.exceptions.GetTimeoutError:
                    self.probe()
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, PipelineError):
                raise PipelineError(str(cause)) from None
            raise PipelineError(f"{describe(item)}: a Ray task failed ({first_line(cause or e)})") from None
        except ray.exceptions.OutOfMemoryError:
            raise PipelineError(
                f"{describe(item)}: a Ray worker ran out of memory (more memory, or smaller shards)"
            ) from None
        except ray.exceptions.RayError as e:
            where = self.address or "the Ray started here"
            raise PipelineError(f"data_run.address: lost the Ray cluster at {where} ({first_line(e)})") from None

    def probe(self) -> None:
        """Raise the one-line error if the cluster's head (its GCS) no longer takes a connection."""
        host, _, port = self.gcs.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_S).close()
        except OSError as e:
            where = self.address if self.address not in ("", "auto") else self.gcs
            raise PipelineError(f"data_run.address: lost the Ray cluster at {where} ({e.strerror or e})") from None

    def close(self) -> None:
        """Nothing to stop: the stage's later pools use the same connection (or the Ray started for
        it), which ends with the process."""


def describe(item) -> str:
    """What a task worked on, for an error: a shard's file and first line, else its type."""
    path, line = getattr(item, "path", None), getattr(item, "first_line", None)
    if path is not None:
        return f"{path} (the shard from line {line})" if line is not None else str(path)
    return f"a task on {type(item).__name__}"
