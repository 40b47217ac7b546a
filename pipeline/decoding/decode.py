"""Decoding: greedy, sampled (temperature, top-k, top-p) and beam search, for every use of a model
that writes text (translation, question answering, samples, `python -m pipeline.generate`).

Decoding is incremental: a GPT keeps a key/value cache, a recurrent model its hidden state. When
a GPT's cache reaches its context (block_size), the last half context is re-encoded and decoding
goes on. Prompts of equal length are decoded together in batches, so no padding (and no mask)
is needed and a batched result is identical to decoding each prompt alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from pipeline.core.common import PipelineError


@dataclass
class Decoding:
    """How to pick tokens. temperature 0 is greedy; beam_size > 1 is beam search (deterministic)."""

    max_new_tokens: int = 128
    max_ratio: float = 0.0  # also at most this many new tokens per prompt token (0: no such cap)
    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    no_repeat_ngram: int = 0  # never write an n-gram of this many tokens twice in the output (0: off)
    beam_size: int = 1
    length_penalty: float = 1.0  # beams are ranked by log-probability / length ** length_penalty
    seed: int = 0

    def check(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "max_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise PipelineError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise PipelineError(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if self.max_new_tokens <= 0:
            raise PipelineError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise PipelineError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.beam_size < 1 or self.repetition_penalty <= 0:
            raise PipelineError("top_k must be >= 0, beam_size >= 1 and repetition_penalty > 0")
        if self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            raise PipelineError(f"no_repeat_ngram: must be 0 (off) or >= 2, got {self.no_repeat_ngram}")


def _adjust(logits: torch.Tensor, seen: torch.Tensor | None, decoding: Decoding) -> torch.Tensor:
    """Repetition penalty (as in CTRL): shrink the logits of tokens already present."""
    if seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / decoding.repetition_penalty, logits * decoding.repetition_penalty)
    return torch.where(seen, penalized, logits)


def _seen(idx: torch.Tensor, vocab: int, decoding: Decoding) -> torch.Tensor | None:
    """Which tokens each prompt holds, for the repetition penalty (None without one)."""
    if decoding.repetition_penalty == 1.0:
        return None
    return torch.zeros(idx.size(0), vocab, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)


def _ban_repeats(logits: torch.Tensor, out: torch.Tensor | None, n: int) -> torch.Tensor:
    """-inf for each row's tokens that would end an n-gram already in its output `out` (rows x
    tokens so far): those that followed an earlier occurrence of the output's last n - 1 tokens."""
    if n == 0 or out is None or out.size(1) < n:
        return logits
    suffix = out[:, out.size(1) - n + 1 :]
    windows = out[:, :-1].unfold(1, n - 1, 1)  # every (n-1)-gram that has a token after it
    rows, starts = ((windows == suffix[:, None, :]).all(-1)).nonzero(as_tuple=True)
    if rows.numel():
        logits = logits.index_put((rows, out[rows, starts + n - 1]), torch.tensor(float("-inf"), device=logits.device))
    return logits


def _pick(logits: torch.Tensor, decoding: Decoding, gen: torch.Generator | None) -> torch.Tensor:
    if decoding.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / decoding.temperature
    if 0 < decoding.top_k < logits.size(-1):
        kth = torch.topk(logits, decoding.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if decoding.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > decoding.top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(-1)


def _step(model, last: torch.Tensor, state, history: Callable[[], torch.Tensor]):
    """Feed the newest tokens `last`; when a GPT's cache is full, re-encode the last half of
    `history()` (every token so far, built only then) instead."""
    if model.bounded_context and model.state_length(state) >= model.block_size:
        return model.decode(history()[:, -(model.block_size // 2) :], None)
    return model.decode(last[:, None], state)


def keep_end(model, prompt, new_tokens: int = 0):
    """The end of a prompt (a list of ids, or rows of them) that leaves room for `new_tokens` in a
    GPT's context: a prompt too long is cut from the left. A recurrent model's context has no end."""
    room = model.block_size - new_tokens if model.bounded_context else 0
    if room <= 0:
        return prompt
    return prompt[:, -room:] if isinstance(prompt, torch.Tensor) else prompt[-room:]


def _prefill(model, idx: torch.Tensor):
    return model.decode(keep_end(model, idx), None)


@torch.inference_mode()
def stream(model, idx: torch.Tensor, eos_id: int, decoding: Decoding, gen=None) -> Iterator[torch.Tensor]:
    """Sample or pick greedily, one step at a time: yields the next token of every row.

    Rows that reached eos keep yielding eos; the stream ends when all have, or at max_new_tokens.
    """
    logits, state = _prefill(model, idx)
    B = idx.size(0)
    seen = _seen(idx, logits.size(-1), decoding)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    out: list[torch.Tensor] = []
    for _ in range(decoding.max_new_tokens):
        if decoding.no_repeat_ngram and len(out) >= decoding.no_repeat_ngram:
            logits = _ban_repeats(logits, torch.stack(out, dim=1), decoding.no_repeat_ngram)
        nxt = _pick(_adjust(logits, seen, decoding), decoding, gen)
        nxt = nxt.masked_fill(done, eos_id)
        yield nxt
        done |= nxt == eos_id
        if bool(done.all()):
            return
        out.append(nxt)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits, state = _step(model, nxt, state, lambda: torch.cat([idx, torch.stack(out, dim=1)], dim=1))


@torch.inference_mode()
def _beam_search(model, idx: torch.Tensor, eos_id: int, decoding: Decoding) -> list[list[int]]:
    """Beam search for a batch of equal-length prompts.

    A finished beam can only be extended by eos at no cost, so it keeps its score and competes
    with the live beams; at the end each prompt's beams are ranked by length-normalised score.
    """
    B, K = idx.size(0), decoding.beam_size
    logits, state = _prefill(model, idx)
    seen = _seen(idx, logits.size(-1), decoding)
    logp = torch.log_softmax(_adjust(logits, seen, decoding).float(), dim=-1)
    V = logp.size(-1)
    scores, first = logp.topk(min(K, V), dim=-1)
    K = scores.size(1)
    rows = torch.arange(B, device=idx.device).repeat_interleave(K)
    state = model.reorder_state(state, rows)
    idx = idx[rows]
    out, scores = first.reshape(B * K, 1), scores.reshape(B * K)
    if seen is not None:
        seen = seen[rows].scatter_(1, out, True)
    done = out[:, -1] == eos_id
    lengths = torch.ones(B * K, device=idx.device)
    for _ in range(decoding.max_new_tokens - 1):
        if bool(done.all()):
            break
        logits, state = _step(model, out[:, -1], state, lambda: torch.cat([idx, out], dim=1))  # noqa: B023 (called at once)
        logp = torch.log_softmax(_adjust(logits, seen, decoding).float(), dim=-1)
        logp = _ban_repeats(logp, out, decoding.no_repeat_ngram)
        logp[done] = float("-inf")
        logp[done, eos_id] = 0.0
        top, pos = (scores[:, None] + logp).view(B, K * V).topk(K, dim=-1)
        parent = (torch.arange(B, device=idx.device)[:, None] * K + pos // V).view(-1)
        token = (pos % V).view(-1)
        lengths = lengths[parent] + (~done[parent]).float()
        done = done[parent] | (token == eos_id)
        out = torch.cat([out[parent], token[:, None]], dim=1)
        scores = top.view(-1)
        state = model.reorder_state(state, parent)
        if seen is not None:
            seen = seen[parent].scatter_(1, token[:, None], True)
    best = (scores / lengths.pow(decoding.length_penalty)).view(B, K).argmax(dim=-1)
    chosen = out.view(B, K, -1)[torch.arange(B), best].tolist()
    return [r[: r.index(eos_id)] if eos_id in r else r for r in chosen]


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    eos_id: int,
    decoding: Decoding,
    batch_size: int = 16,
    device: str = "cpu",
    progress: str | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) until eos or decoding.max_new_tokens; returns the new ids (eos excluded).

    `progress`: a label for a progress bar over prompts (shown on a terminal only).
    """
    decoding.check()
    gen = (
        torch.Generator(device=device).manual_seed(decoding.seed)
        if decoding.temperature > 0 and decoding.beam_size == 1
        else None
    )
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        if not p:
            raise PipelineError("generate: empty prompt (give at least one token)")
        by_length[len(p)].append(i)
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=None if progress else True)
    for length in sorted(by_length):
        order = by_length[length]
        for b in range(0, len(order), batch_size):
            ids = order[b : b + batch_size]
            idx = torch.tensor([prompts[i] for i in ids], dtype=torch.long, device=device)
            group = decoding
            if decoding.max_ratio > 0:  # prompts of a batch share their length, so they share this cap
                group = replace(
                    decoding,
                    max_new_tokens=max(1, min(decoding.max_new_tokens, math.ceil(decoding.max_ratio * length))),
                )
            if decoding.beam_size > 1:
                rows = _beam_search(model, idx, eos_id, group)
            else:
                steps = list(stream(model, idx, eos_id, group, gen))
                rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in ids]
                rows = [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
            for i, row in zip(ids, rows):
                results[i] = row
            bar.update(len(ids))
    bar.close()
    return results
