"""tokenize's encoding as Ray tasks (data_run.executor: ray): a batch of whole lines of clean's
JSON lines in; out, its records parsed, encoded (single-threaded: a task is one CPU's work) and
rendered as the token file holds them, with each source's run of records in the batch. What
depends on earlier batches (each source's token range, one range per source) stays with the
driver, in input order, so the token files are the same for any batch size and executor.

The worker's tokenizer comes from the model's bytes, loaded once per worker process
(init_worker, run by the Pool's initializer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.common import PipelineError, json_line
from pipeline.data.pool import Lines, read_lines
from pipeline.data.tokenizer import Tokenizer, dtype_for

BATCH_BYTES = 1 << 20  # the most bytes of lines a task gets (about 2,000 records of the default corpus)
MIN_BATCH_BYTES = 16 << 10  # the least, but for a file's last batch
BATCHES_PER_FILE = 16  # a file under 16 MiB is cut into about this many: it too spreads over the cluster

_WORKER: dict = {}


class Encoded(NamedTuple):
    """A batch's tokens as the token file holds them, and where each source's records end in them."""

    ids: np.ndarray  # the token file's dtype: each record rendered (pipeline.data.tokenizer), in order
    runs: list[tuple[str, int, int, int]]  # (source, end in ids, documents, bytes): consecutive records of a source


def batches(path: Path) -> Iterator[Lines]:
    """A file's lines in batches of whole lines, about BATCH_BYTES each, fewer bytes for a small
    file (BATCHES_PER_FILE batches, of MIN_BATCH_BYTES at least)."""
    size = max(MIN_BATCH_BYTES, min(BATCH_BYTES, path.stat().st_size // BATCHES_PER_FILE))
    return read_lines(path, size)


def init_worker(model: bytes) -> None:
    """Load the tokenizer from tokenizer.model's bytes: once per worker process."""
    tok = Tokenizer.from_bytes(model)
    _WORKER.update(tok=tok, token_bytes=tok.token_bytes(), dtype=dtype_for(tok.vocab_size))


def encode_lines(batch: Lines) -> Encoded:
    """Parse, encode and render a batch's records, as tokenize.encode_split does in the main process."""
    tok: Tokenizer = _WORKER["tok"]
    lines = enumerate(batch.chunk.split(b"\n"), batch.first_line)
    records = [json_line(line, batch.path, i) for i, line in lines if line.strip()]
    encoded = iter(tok.encode_records(records, 1))
    flat: list[int] = []
    runs: list[list] = []  # [source, end in flat, documents]
    for r in records:
        if not runs or r["source"] != runs[-1][0]:
            runs.append([r["source"], 0, 0])
        try:
            tok.render(r, encoded, flat)
        except PipelineError as e:
            raise PipelineError(f"{batch.path}: source '{r['source']}': {e} (no pairs of it in train?)") from None
        runs[-1][1:] = len(flat), runs[-1][2] + 1
    ids = np.fromiter(flat, _WORKER["dtype"], len(flat))
    token_bytes, start, out = _WORKER["token_bytes"], 0, []
    for source, end, documents in runs:
        out.append((source, end, documents, int(token_bytes[ids[start:end]].sum())))
        start = end
    return Encoded(ids, out)
