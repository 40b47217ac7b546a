"""The playground's decoding engine: many people's requests decoded on one thread, together.

A request that arrives while others decode joins their batch at its next step (continuous
batching: `Batch.join`) when it decodes alike (greedy, or sampled with the same settings) and the
batch has room (its cache's columns; a GPT with no sliding window and no repetition penalty).
Otherwise the requests that arrived together start a batch of their own (a wave: pipeline.decoding's
Decoder, the step loop every decoding uses), and every wave in flight takes one step in turn, so a
new request starts at the next step instead of waiting for the others to finish. Beam search is a
wave too: it advances a step at a time like the others (its text comes whole, when it is ranked).
At most `max_rows` rows (a beam search: its beams) decode at once; at most `max_queue` requests
wait for room; one more is told the server is busy.

Each request streams events to its `sink` (called on the engine's thread): `start`, `token`
(the new text, whole characters only), then `done` (why: eos, length, stopped) or `error`.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, replace

import torch

from pipeline.core.common import first_line
from pipeline.decoding.answer import first_answer
from pipeline.decoding.decode import Decoder, Decoding, TextStream


class Busy(Exception):
    """The queue of waiting requests is full."""


@dataclass
class Request:
    prompt: list[int]  # token ids, already cut to fit the context
    decoding: Decoding  # its max_new_tokens is this request's own limit
    first_line: bool = False  # an answer: its first line only (decoding ends at a line break)
    note: str = ""  # said in the start event (a prompt cut to fit the context, say)


class Job:
    """One request being served: its new tokens and text, whether it is to stop."""

    def __init__(self, job_id: str, request: Request, sink: Callable[[dict], None], tok):
        self.id, self.request, self.sink = job_id, request, sink
        self.text = TextStream(tok, first_answer if request.first_line else None)  # an answer: its first line
        self.stopped = False  # asked to stop (the Stop button, or the client went away)
        self.finished = False
        self.started = time.perf_counter()

    def emit(self, event: str, **data) -> None:
        try:
            self.sink({"event": event, **data})
        except Exception:  # a client gone: its events go nowhere, the engine goes on
            self.stopped = True

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def add(self, token: int) -> bool:
        """Take a new token; stream the text it completes. True once an answer's first line ends."""
        new = self.text.push(token)
        if new:
            self.emit("token", text=new)
        return self.request.first_line and "\n" in self.text.whole.lstrip()

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            rest = "" if self.request.first_line else self.text.rest()  # what waited for the rest of a character
            if rest:
                self.emit("token", text=rest)
            self.emit("done", reason=reason, tokens=len(self.ids), seconds=round(time.perf_counter() - self.started, 3))

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.emit("error", message=message)


def _kind(decoding: Decoding) -> tuple:
    """What requests must share to decode in one batch: everything but their seed, and their
    limit of new tokens, which a batch holds per row (a beam search's ranking depends on it)."""
    d = replace(decoding, max_new_tokens=decoding.max_new_tokens if decoding.beam_size > 1 else 1, seed=0)
    if d.temperature == 0:
        d = replace(d, top_k=0, top_p=1.0)
    return astuple(d)


class Wave:
    """Requests that started together, decoding as one batch (a Decoder), a step at a time."""

    def __init__(self, model, jobs: list[Job], eos_id: int, gen: torch.Generator | None):
        limits = [j.request.decoding.max_new_tokens for j in jobs]
        self.decoding = replace(jobs[0].request.decoding, max_new_tokens=max(limits))
        self.kind = _kind(self.decoding)
        self.jobs, self.eos_id = jobs, eos_id
        prompts = [j.request.prompt for j in jobs]
        # every=1: its tokens are read on the host every step anyway
        self.decoder = Decoder(model, prompts, eos_id, self.decoding, limits, gen, every=1)

    def fits(self, job: Job) -> bool:
        return (
            not self.decoder.search
            and _kind(job.request.decoding) == self.kind
            and self.decoder.batch.fits(job.request.prompt, job.request.decoding.max_new_tokens)
        )

    def join(self, jobs: list[Job]) -> bool:
        """Requests that arrive while this batch decodes join it at its next step."""
        limits = [j.request.decoding.max_new_tokens for j in jobs]
        self.decoder.batch.join([j.request.prompt for j in jobs], limits, len(self.jobs))
        self.jobs += jobs
        return True

    @property
    def batch(self):
        return self.decoder.batch

    @property
    def rows(self) -> int:
        return sum(j.request.decoding.beam_size for j in self.jobs if not j.finished)

    def step(self) -> bool:
        """One token for every row; False once every request has finished."""
        decoder, batch = self.decoder, self.decoder.batch
        decoder.choose()
        ended = []  # rows whose request has finished while its row decodes on: stopped, or an answer's line ended
        if not decoder.search:
            tokens, done = batch.out[:, batch.n - 1].tolist(), batch.done.tolist()
            for row, (token, row_done) in enumerate(zip(tokens, done)):
                job = self.jobs[int(batch.rows[row])]
                if not job.finished:
                    reason = self._streamed(job, token, row_done)
                    if reason:
                        job.finish(reason)
                if job.finished and not row_done:
                    ended.append(row)
        else:
            ended = [row for row in range(len(batch.rows)) if self.jobs[int(batch.rows[row])].stopped]
        if ended:
            decoder.stop(ended)
        running = decoder.settle()
        if decoder.search:
            for prompt in decoder.finished:
                self._ranked(self.jobs[prompt], decoder.results[prompt][0])
        return running

    def _streamed(self, job: Job, token: int, row_done: bool) -> str:
        """Stream a request's new token; why it has finished ("" while it goes on)."""
        if job.stopped:
            return "stopped"
        if token == self.eos_id or job.add(token):  # (an answer ends at its line break)
            return "eos"
        return "length" if row_done else ""

    def _ranked(self, job: Job, out: list[int]) -> None:
        """A beam search's request, ranked: its best beam's text, whole."""
        if job.finished:
            return
        ended = any(job.add(token) for token in out)  # (stops at an answer's line break)
        limit = job.request.decoding.max_new_tokens
        job.finish("stopped" if job.stopped else "eos" if ended or len(out) < limit else "length")


class Engine:
    def __init__(self, model, tok, max_rows: int = 32, max_queue: int = 64, seed: int = 0):
        self.model, self.tok = model, tok
        self.max_rows, self.max_queue = max_rows, max_queue
        self.device = next(model.parameters()).device
        self.seeds = itertools.count(seed)
        self.ids = iter(lambda: secrets.token_urlsafe(12), None)  # unguessable: no stop for another user's request
        self.lock = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}  # waiting or decoding, by id
        self.waves: list[Wave] = []
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="lmpipe-decoding", daemon=True)
        self.thread.start()

    def submit(self, request: Request, sink: Callable[[dict], None]) -> Job:
        """Queue a request; raises Busy when max_queue requests already wait."""
        with self.lock:
            if len(self.pending) >= self.max_queue:
                raise Busy(f"busy: {len(self.pending)} requests are waiting; try again in a moment")
            job = Job(next(self.ids), request, sink, self.tok)
            job.emit("start", id=job.id, prompt_tokens=len(request.prompt), note=request.note)  # before any token
            self.jobs[job.id] = job
            self.pending.append(job)
            self.lock.notify()
        return job

    def stop(self, job_id: str) -> bool:
        """Ask a request to stop (it ends at its next step); False if none decodes by that id."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:  # (a finished one leaves `jobs` after its step: no race with that)
            return False
        job.stopped = True
        with self.lock:
            self.lock.notify()
        return True

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(timeout=10)

    @property
    def load(self) -> dict:
        return {"decoding": sum(w.rows for w in self.waves), "waiting": len(self.pending)}

    @torch.inference_mode()  # (thread-local: this thread's every step)
    def _run(self) -> None:
        while True:
            with self.lock:
                while not (self.pending or self.waves or self.closing):
                    self.lock.wait()
                if self.closing:
                    break
                admitted = self._admit()
            self._start(admitted)
            for wave in list(self.waves):
                self._step(wave)
            for job in [j for j in list(self.jobs.values()) if j.finished]:
                self.jobs.pop(job.id, None)
        for job in list(self.jobs.values()):
            job.fail("the server is shutting down")

    def _admit(self) -> list[Job]:
        """The waiting requests there is room for, in order of arrival (a stopped one ends here)."""
        room = self.max_rows - sum(w.rows for w in self.waves)
        admitted = []
        while self.pending:
            job = self.pending[0]
            rows = job.request.decoding.beam_size
            if not job.stopped and rows > room and (admitted or self.waves):
                break  # (a request wider than max_rows still runs, alone)
            self.pending.popleft()
            if job.stopped:
                job.finish("stopped")
                continue
            admitted.append(job)
            room -= rows
        return admitted

    def _start(self, jobs: list[Job]) -> None:
        """Group the admitted requests by how they decode: each group joins a wave or starts one."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(_kind(job.request.decoding), []).append(job)
        for group in groups.values():
            self._guarded(group, self._new_wave, group)

    def _new_wave(self, jobs: list[Job]) -> None:
        """The requests join a batch in flight that decodes alike and has room for them (continuous
        batching); those that fit none start a batch of their own."""
        for wave in list(self.waves):
            joining = [j for j in jobs if wave.fits(j)]
            if joining:
                if not self._guarded(wave.jobs + joining, wave.join, joining):
                    self.waves.remove(wave)
                jobs = [j for j in jobs if j not in joining]
            if not jobs:
                return
        gen = None
        if jobs[0].request.decoding.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(next(self.seeds))
        self.waves.append(Wave(self.model, jobs, self.tok.eos_id, gen))

    def _step(self, wave: Wave) -> None:
        if not self._guarded(wave.jobs, wave.step):
            self.waves.remove(wave)

    def _guarded(self, jobs: list[Job], work: Callable, *args) -> bool:
        """Run one piece of decoding (its result); if it fails, its requests end with the reason,
        and the engine goes on serving the others."""
        try:
            return work(*args)
        except Exception as e:
            message = f"decoding failed: {first_line(e)}"
            if isinstance(e, torch.cuda.OutOfMemoryError):
                message = "decoding failed: out of GPU memory; lower --max-rows"
            for job in jobs:
                job.fail(message)
            return False
