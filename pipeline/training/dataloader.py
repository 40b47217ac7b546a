"""Training batches: random windows of block_size + 1 tokens from a memory-mapped token file.

Window starts are a pure function of a key such as (seed, stream, step), so the loader's position
is the step number: a resumed run draws exactly the batches an uninterrupted one would, and every
process of a distributed run takes its own slice of the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model.model import IGNORE


def pair_sources(data: np.ndarray, src_id: int, tgt_id: int) -> np.ndarray:
    """Which tokens of a token file are a pair's `<src> source <tgt>`: as prediction targets they
    do not count when the loss is on the targets only (train.pair_loss: target)."""
    delta = np.zeros(len(data) + 1, dtype=np.int8)
    delta[np.flatnonzero(data == src_id)] += 1
    delta[np.flatnonzero(data == tgt_id) + 1] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8) > 0


def window_starts(n_tokens: int, block_size: int, rows: int, *key: int) -> np.ndarray:
    """`rows` random window starts, a pure function of `key` (e.g. seed, stream, step)."""
    return np.random.default_rng(list(key)).integers(0, n_tokens - block_size, size=rows)


def mixture_starts(
    sources: dict[str, dict], weights: dict[str, float], n_tokens: int, block_size: int, rows: int, *key: int
) -> np.ndarray:
    """`rows` window starts drawn source by source: a source's windows are its share of the tokens
    times its weight (1 when not listed; 0: never), each start uniform within the source's token
    range ({"start", "end"} in the token file's sidecar). A pure function of `key`, as window_starts."""
    names = list(sources)
    sizes = np.array([sources[n]["end"] - sources[n]["start"] for n in names], dtype=np.float64)
    p = sizes * np.array([weights.get(n, 1.0) for n in names])
    rng = np.random.default_rng(list(key))
    which = rng.choice(len(names), size=rows, p=p / p.sum())
    lo = np.array([sources[n]["start"] for n in names])
    hi = np.maximum(lo + 1, np.minimum([sources[n]["end"] - block_size for n in names], n_tokens - block_size))
    return rng.integers(lo[which], hi[which])


def windows(data: np.ndarray, starts, block_size: int, device, ignored=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (the same windows shifted by one token), on `device`; targets where
    `ignored` (a boolean array over `data`) is true become IGNORE."""
    rows = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    x, y = xy[:, :-1], xy[:, 1:]
    if ignored is not None:
        mask = torch.from_numpy(np.stack([ignored[s + 1 : s + block_size + 1] for s in starts]))
        y = y.masked_fill(mask.to(device, non_blocking=True), IGNORE)
    return x, y


def step_batches(
    data: np.ndarray,
    block_size: int,
    batch_size: int,
    accum: int,
    seed: int,
    step: int,
    rank: int = 0,
    world: int = 1,
    device=torch.device("cpu"),
    ignored=None,
    mixture: tuple[dict, dict] | None = None,
) -> list:
    """This process's micro-batches of training step `step`: its slice of the global batch. With
    `mixture` (the sources of the token file, their weights), windows are drawn by mixture_starts."""
    rows = accum * world * batch_size
    if mixture:
        starts = mixture_starts(*mixture, len(data), block_size, rows, seed, 0, step)
    else:
        starts = window_starts(len(data), block_size, rows, seed, 0, step)
    mine = starts.reshape(accum, world, batch_size)[:, rank]
    return [windows(data, s, block_size, device, ignored) for s in mine]


def fixed_batches(data, block_size: int, batch_size: int, n: int, seed: int, stream: int, device, ignored=None) -> list:
    """The same n batches every time: validation curves compare like with like."""
    starts = window_starts(len(data), block_size, n * batch_size, seed, stream)
    return [windows(data, starts[i * batch_size : (i + 1) * batch_size], block_size, device, ignored) for i in range(n)]
