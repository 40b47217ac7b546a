"""Decoding: greedy, sampled (temperature, top-k, top-p) and beam search, for every use of a model
that writes text (translation, question answering, samples, `python -m pipeline.generate`).

Any prompts decode together: `generate` sorts them by length (so little is padded) and decodes
up to batch_size at a time, a GPT's rows left-padded and masked, each at its own positions, a
recurrent model's packed. A GPT's key/value cache is allocated once per batch (prompt plus new
tokens) and written in place; when a row's context reaches block_size, its last half is
re-encoded and decoding goes on, that row alone. A finished row (eos, or its own limit of new
tokens) stops costing compute: the batch is compacted once a quarter of it is done. Beam search
decodes prompts x beams rows the same way; a beam follows its parent by index into the cache,
copying only the columns written after the prompt. The device is asked whether to stop every
`check_every` steps (1 on a CPU, where asking is free; 8 on CUDA). Batched results equal decoding
each prompt alone, but for the last bits of float sums (a padded row's attention is masked).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.core.common import PipelineError, first_line


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


def _adjust(logits: torch.Tensor, batch: Batch, decoding: Decoding) -> torch.Tensor:
    """Repetition penalty (as in CTRL): shrink the logits of tokens already in the prompt or the
    output (gathered and scattered by id: a row's few tokens, not the whole vocabulary)."""
    if batch.prompt_ids is None:
        return logits
    ids = torch.cat([batch.prompt_ids, batch.out[:, : batch.n]], dim=1)
    seen = logits.gather(1, ids)
    seen = torch.where(seen > 0, seen / decoding.repetition_penalty, seen * decoding.repetition_penalty)
    return logits.scatter(1, ids, seen)


def _prompt_ids(prompts: list[list[int]], decoding: Decoding, device) -> torch.Tensor | None:
    """Each prompt's tokens, for the repetition penalty (None without one), left-padded with its
    own first token (a token it holds: padding changes nothing)."""
    if decoding.repetition_penalty == 1.0:
        return None
    longest = max(map(len, prompts))
    return torch.tensor([[p[0]] * (longest - len(p)) + list(p) for p in prompts], device=device)


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


def keep_end(model, prompt: list[int], new_tokens: int = 0) -> list[int]:
    """The end of a prompt that leaves room for `new_tokens` in a GPT's context: a prompt too long
    is cut from the left. A recurrent model's context has no end."""
    room = model.block_size - new_tokens if model.bounded_context else 0
    return prompt[-room:] if room > 0 else prompt


def _as_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        return prompts.tolist()
    return [list(p) for p in prompts]


COMPACT = 4  # a batch drops its finished rows once 1 / COMPACT of them are


class Batch:
    """Prompts of any lengths being decoded together: the model's state, the tokens written so
    far, each row's limit of new tokens and whether it is done. `rows` maps each row to its
    prompt's index in the batch as given (rows go when the batch is compacted)."""

    def __init__(self, model, prompts: list[list[int]], eos_id: int, decoding: Decoding, limits=None, step=None):
        self.model, self.eos_id = model, eos_id
        self.step = step or model.step  # a CompiledStep: static shapes, and no compaction (a new shape)
        self.compact = step is None
        prompts = [keep_end(model, p) for p in prompts]
        n_new = decoding.max_new_tokens
        longest = max(map(len, prompts))
        width = longest + n_new
        if model.bounded_context and width > 2 * model.block_size:  # a long generation: a window that slides
            width = 2 * model.block_size
        if step is not None:  # one width of two, so that few shapes are compiled
            width = model.block_size if width <= model.block_size else 2 * model.block_size
        self.logits, self.state = model.prefill(prompts, width, static=step is not None)
        device = self.logits.device
        self.prompt_ids = _prompt_ids(prompts, decoding, device)
        self.limit = torch.tensor(limits or [n_new] * len(prompts), device=device)
        # every token so far, column by column as in a GPT's cache: re-encoded when a window slides
        self.history = None
        if model.bounded_context and longest + n_new > model.block_size:
            self.history = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
            for i, p in enumerate(prompts):
                self.history[i, longest - len(p) : longest] = torch.as_tensor(p)
        self.rows = torch.arange(len(prompts))
        self.begin = torch.zeros(len(prompts), dtype=torch.long)  # the column of out where each row's tokens begin
        self.out = torch.empty(len(self.rows), n_new, dtype=torch.long, device=device)
        self.n = 0  # tokens written per row
        self.done = torch.zeros(len(self.rows), dtype=torch.bool, device=device)

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows (in this order): finished rows dropped, or each prompt's beams."""
        cpu = rows.cpu()
        self.state = self.model.select(self.state, rows)
        self.logits, self.rows, self.begin = self.logits.index_select(0, rows), self.rows[cpu], self.begin[cpu]
        self.limit = self.limit.index_select(0, rows)
        for name in ("prompt_ids", "history", "out", "done"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))

    def write(self, tokens: torch.Tensor) -> None:
        """Append each row's next token (eos in a finished row); a row is done at eos or its limit."""
        tokens = tokens.masked_fill(self.done, self.eos_id)
        self.out[:, self.n] = tokens
        self.n += 1
        self.done |= (tokens == self.eos_id) | (self.n >= self.limit)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed the newest tokens to the model: the logits of the next ones. A GPT's row whose
        context is full re-encodes its last half context instead; a cache with no room left drops
        the columns every row has slid past."""
        model, state = self.model, self.state
        full = None
        if self.history is not None:
            if state.length == state.width:
                n = int(state.start.min())
                state.shift(n)
                self.history[:, : state.length] = self.history[:, n : n + state.length].clone()
            self.history[:, state.length] = tokens
            if state.length >= model.block_size:
                full = (model.context_lengths(state) >= model.block_size).nonzero().squeeze(1)
        self.logits, self.state = self.step(tokens, state)
        if full is not None and full.numel():
            half = model.block_size // 2
            window = self.history[full, state.length - half : state.length]
            self.logits[full] = model.slide(state, full, window)

    def ids(self, row: int) -> list[int]:
        """A row's new tokens, up to its eos."""
        ids = self.out[row, int(self.begin[row]) : self.n].tolist()
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids

    def fits(self, prompt: list[int], limit: int) -> bool:
        """Whether join() can take this prompt: a GPT's eager cache with no window to slide and no
        repetition penalty, the prompt no longer than the columns written, room for its tokens."""
        state = self.state
        if not hasattr(state, "keys") or state.static or self.history is not None or self.prompt_ids is not None:
            return False
        return 0 < len(prompt) <= state.length and state.length + limit <= state.width

    def join(self, prompts: list[list[int]], limits: list[int], first_index: int) -> None:
        """Continuous batching: add prompts (each of which fits()) to the batch as it decodes, between
        a step's advance() and the next write() (when every row's logits are of its next token).
        They are encoded on their own, and their keys and values written so that each ends at the
        column the batch writes next, as if it had been left-padded from the start; their limits
        of new tokens count from now. Their rows map to prompts first_index, first_index + 1, ..."""
        model, state, n_new = self.model, self.state, len(prompts)
        logits, sub = model.prefill(prompts, max(map(len, prompts)))
        L, n = state.length, sub.length
        for tensors, theirs in ((state.keys, sub.keys), (state.values, sub.values)):
            for layer, t in enumerate(tensors):
                grown = t.new_zeros((t.size(0) + n_new, *t.shape[1:]))
                grown[: t.size(0), :, :L] = t[:, :, :L]
                grown[t.size(0) :, :, L - n : L] = theirs[layer][:, :, :n]
                tensors[layer] = grown
        state.start = torch.cat([state.start, sub.start + (L - n)])
        state.padded = True
        device = self.out.device
        limits_now = torch.tensor(limits, device=device) + self.n
        width = max(self.out.size(1), int(limits_now.max()))
        out = torch.full((len(self.out) + n_new, width), self.eos_id, dtype=torch.long, device=device)
        out[: len(self.out), : self.out.size(1)] = self.out
        self.out, self.limit = out, torch.cat([self.limit, limits_now])
        self.logits = torch.cat([self.logits, logits])
        self.done = torch.cat([self.done, torch.zeros(n_new, dtype=torch.bool, device=device)])
        self.rows = torch.cat([self.rows, torch.arange(first_index, first_index + n_new)])
        self.begin = torch.cat([self.begin, torch.full((n_new,), self.n, dtype=torch.long)])


class TextStream:
    """Token ids in, text out as it completes (`generate`'s printing, the playground's events):
    push() returns the text a new token adds, holding back a piece that ends inside a character
    (decoded as U+FFFD) until the rest of it comes; rest() gives what is held back, at the end.
    `view` maps the whole text so far to what is shown (an answer: its first line)."""

    def __init__(self, tok, view=None):
        self.tok, self.view = tok, view
        self.ids: list[int] = []
        self.whole = ""  # the decoded text of every id so far
        self.shown = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.whole = self.tok.decode(self.ids)
        text = self.view(self.whole) if self.view else self.whole
        if text.endswith("\ufffd") or len(text) <= len(self.shown):
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new

    def rest(self) -> str:
        text = self.view(self.whole) if self.view else self.whole
        new, self.shown = text[len(self.shown) :], text
        return new


class CompiledStep:
    """A GPT's decode step compiled (torch.compile; on CUDA, mode "reduce-overhead": CUDA graphs),
    over a static cache: every step has the same shapes, and the cache is written at a column the
    device holds. Where compiling fails it says why, once, and steps eagerly."""

    def __init__(self, model, **options):
        self.model = model
        self.options = options or {"mode": "reduce-overhead"}
        self.compiled = torch.compile(model.next_logits, fullgraph=True, dynamic=False, **self.options)
        self.failed: str | None = None

    @classmethod
    def of(cls, model, **options):
        """The model's compiled step (compiled once per model and options); None for a recurrent model."""
        if not hasattr(model, "next_logits"):
            return None
        key = repr(sorted(options.items()))
        steps = model.__dict__.setdefault("_compiled_steps", {})
        if key not in steps:
            steps[key] = cls(model, **options)
        return steps[key]

    def __call__(self, tokens: torch.Tensor, kv):
        logits = None
        if self.failed is None:
            try:
                logits = self.compiled(tokens, kv).clone()  # a CUDA graph's output is overwritten by its next replay
            except Exception as e:  # no compiler, an unsupported operation: decoding goes on, eagerly
                self.failed = first_line(e)
                print(f"decoding: not compiled ({self.failed}); decoding eagerly", file=sys.stderr, flush=True)
        if logits is None:
            logits = self.model.next_logits(tokens, kv)
        kv.advance(1)
        return logits, kv


def compiles(setting, device) -> bool:
    """Whether decoding's step is compiled: evaluate.compile (auto: on CUDA only)."""
    return setting is True or (setting == "auto" and torch.device(device).type == "cuda")


def check_every(device) -> int:
    """Steps between asking the device whether to stop: free on a CPU, a wait on CUDA."""
    return 8 if torch.device(device).type == "cuda" else 1


@torch.inference_mode()
def stream(model, prompts, eos_id: int, decoding: Decoding, gen=None) -> Iterator[torch.Tensor]:
    """Sample or pick greedily, one step at a time: yields the next token of every row (prompts:
    token lists of any lengths, or a tensor of rows). Rows that are done yield eos; the stream ends
    when all are, or at max_new_tokens."""
    batch = Batch(model, _as_lists(prompts), eos_id, decoding)
    every = check_every(batch.logits.device)
    for step in range(decoding.max_new_tokens):
        nxt = next_tokens(batch, decoding, gen)
        batch.write(nxt)
        yield batch.out[:, step]
        if step + 1 == decoding.max_new_tokens or ((step + 1) % every == 0 and bool(batch.done.all())):
            return
        batch.advance(batch.out[:, step])


def next_tokens(batch: Batch, decoding: Decoding, gen) -> torch.Tensor:
    """Each row's next token, from the batch's logits: no-repeat n-grams banned, the repetition
    penalty applied, then picked greedily or sampled."""
    logits = batch.logits
    if decoding.no_repeat_ngram and batch.n >= decoding.no_repeat_ngram:
        logits = _ban_repeats(logits, batch.out[:, : batch.n], decoding.no_repeat_ngram)
    return _pick(_adjust(logits, batch, decoding), decoding, gen)


@torch.inference_mode()
def _decode(
    model, prompts: list[list[int]], eos_id: int, decoding: Decoding, limits: list[int], gen, step=None
) -> list[list[int]]:
    """Greedy or sampled decoding of a batch of prompts; finished rows leave the batch."""
    batch = Batch(model, prompts, eos_id, decoding, limits, step)
    results: list[list[int]] = [[] for _ in prompts]
    every = check_every(batch.logits.device)
    for step in range(decoding.max_new_tokens):
        batch.write(next_tokens(batch, decoding, gen))
        last = step + 1 == decoding.max_new_tokens
        if last or (step + 1) % every == 0:
            done = batch.done.cpu()
            all_done = bool(done.all())
            if last or all_done or (batch.compact and len(done) > 1 and int(done.sum()) * COMPACT >= len(done)):
                for row in done.nonzero().squeeze(1).tolist() if not last else range(len(done)):
                    results[int(batch.rows[row])] = batch.ids(row)
                if last or all_done:
                    break
                batch.select((~done).nonzero().squeeze(1).to(batch.out.device))
        batch.advance(batch.out[:, step])
    return results


@torch.inference_mode()
def _beam_search(
    model, prompts: list[list[int]], eos_id: int, decoding: Decoding, limits=None, step=None, length_penalties=None
) -> list[tuple[list[int], ...]]:
    """Beam search for a batch of prompts of any lengths (prompts x beams rows).

    A finished beam can only be extended by eos at no cost, so it keeps its score and competes
    with the live beams; a prompt ends when all its beams have, or at its limit of new tokens, and
    its beams are ranked by length-normalised score: log-probability / length ** length_penalty,
    for each of `length_penalties` (default: decoding's), as the search itself never reads it.
    Returns each prompt's best beam under each.
    """
    length_penalties = length_penalties or (decoding.length_penalty,)
    K = decoding.beam_size
    batch = Batch(model, prompts, eos_id, decoding, limits, step)
    logp = torch.log_softmax(_adjust(batch.logits, batch, decoding).float(), dim=-1)
    V = logp.size(-1)
    scores, first = logp.topk(min(K, V), dim=-1)
    K = scores.size(1)
    batch = _beams_of(batch, K)
    device = batch.out.device
    batch.write(first.reshape(-1))
    scores, lengths = scores.reshape(-1), torch.ones(len(batch.rows), device=device)
    results: list[tuple | None] = [None] * len(prompts)
    every = check_every(device)
    while True:
        B = len(batch.rows) // K
        # A prompt ends when all its beams are done (at eos, or at its limit): asked every few
        # steps, as its beams stay as they were (extended by eos at no cost) until it is ranked
        if batch.n % every and batch.n < decoding.max_new_tokens:
            ended = torch.zeros(B, dtype=torch.bool)
        else:
            ended = batch.done.view(B, K).all(1).cpu()
        for b in ended.nonzero().squeeze(1).tolist():
            prompt = int(batch.rows[b * K])
            if results[prompt] is None:
                beams = slice(b * K, (b + 1) * K)
                results[prompt] = tuple(
                    batch.ids(b * K + int((scores[beams] / lengths[beams].pow(lp)).argmax())) for lp in length_penalties
                )
        if bool(ended.all()):
            return results
        if batch.compact and int(ended.sum()) * COMPACT >= B:  # compact: the prompts still decoding
            keep = (~ended).nonzero().squeeze(1).to(device)
            rows = (keep[:, None] * K + torch.arange(K, device=device)).reshape(-1)
            batch.select(rows)
            scores, lengths = scores.index_select(0, rows), lengths.index_select(0, rows)
            B = len(keep)
        batch.advance(batch.out[:, batch.n - 1])
        logp = torch.log_softmax(_adjust(batch.logits, batch, decoding).float(), dim=-1)
        logp = _ban_repeats(logp, batch.out[:, : batch.n], decoding.no_repeat_ngram)
        done = batch.done
        logp[done] = float("-inf")
        logp[done, eos_id] = 0.0
        top, pos = (scores[:, None] + logp).view(B, K * V).topk(K, dim=-1)
        parent = (torch.arange(B, device=device)[:, None] * K + pos // V).view(-1)
        token = (pos % V).view(-1)
        lengths = lengths[parent] + (~done[parent]).float()
        scores = top.view(-1)
        _follow(batch, parent)
        batch.done = done[parent]
        batch.write(token)  # a beam at its prompt's limit is done: frozen until the prompt is ranked


def _beams_of(batch: Batch, K: int) -> Batch:
    """Each prompt's row repeated K times (its cache computed once, its prompt columns shared)."""
    batch.select(torch.arange(len(batch.rows), device=batch.out.device).repeat_interleave(K))
    if hasattr(batch.state, "shared"):
        batch.state.shared, batch.state.group = batch.state.length, K
    return batch


def _follow(batch: Batch, parent: torch.Tensor) -> None:
    """Every row becomes a copy of its parent row so far: the model's state, the tokens written."""
    batch.state = batch.model.follow(batch.state, parent)
    batch.out[:, : batch.n] = batch.out[parent, : batch.n]
    if batch.history is not None:  # (a prompt's beams share its prompt_ids: nothing to follow there)
        batch.history = batch.history.index_select(0, parent)


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    eos_id: int,
    decoding: Decoding,
    batch_size: int = 16,
    device: str = "cpu",
    progress: str | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt (token ids) until eos or decoding.max_new_tokens (with max_ratio, at
    most that many new tokens per prompt token too); returns the new ids (eos excluded).

    Prompts are sorted by length and decoded `batch_size` at a time (beam search: that many
    prompts, each with its beams). `progress`: a label for a progress bar over prompts (shown on a
    terminal only). `compile`: a GPT's step compiled (CompiledStep; meant for CUDA), every batch
    padded to batch_size rows so that its shapes never change.
    """
    if decoding.beam_size > 1:
        lp = decoding.length_penalty
        return beam_search(model, prompts, eos_id, decoding, [lp], batch_size, device, progress, compile)[lp]
    decoding.check()
    gen = torch.Generator(device=device).manual_seed(decoding.seed) if decoding.temperature > 0 else None

    def decode(batch, limits, step):
        return _decode(model, batch, eos_id, decoding, limits, gen, step)

    return _in_batches(model, prompts, decoding, batch_size, progress, compile, decode)


@torch.inference_mode()
def beam_search(
    model,
    prompts: list[list[int]],
    eos_id: int,
    decoding: Decoding,
    length_penalties: list[float],
    batch_size: int = 16,
    device: str = "cpu",
    progress: str | None = None,
    compile: bool = False,
) -> dict[float, list[list[int]]]:
    """generate()'s beam search, its beams ranked under each of `length_penalties` at once: the
    search never reads the length penalty (only the final ranking does), so one search serves them
    all, as evaluate's tuning on val asks. Returns {length penalty: the new ids of each prompt}."""
    decoding.check()

    def search(batch, limits, step):
        return _beam_search(model, batch, eos_id, decoding, limits, step, length_penalties)

    ranked = _in_batches(model, prompts, decoding, batch_size, progress, compile, search)
    return {lp: [r[i] for r in ranked] for i, lp in enumerate(length_penalties)}


def _in_batches(model, prompts, decoding: Decoding, batch_size: int, progress, compile: bool, decode) -> list:
    """decode(prompts, limits, step) over batches of prompts sorted by length; its results in the
    prompts' order."""
    for p in prompts:
        if not len(p):
            raise PipelineError("generate: empty prompt (give at least one token)")
    step = CompiledStep.of(model) if compile else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=None if progress else True)
    for b in range(0, len(order), batch_size):
        ids = order[b : b + batch_size]
        batch = [list(prompts[i]) for i in ids]
        limits = [_limit(decoding, len(p)) for p in batch]
        if step is not None:  # the same rows every batch: the last one padded with its last prompt
            batch += batch[-1:] * (batch_size - len(batch))
            limits += limits[-1:] * (batch_size - len(limits))
        try:
            rows = decode(batch, limits, step)
        except torch.cuda.OutOfMemoryError:
            beams = f" x {decoding.beam_size} beams" if decoding.beam_size > 1 else ""
            raise PipelineError(
                f"decoding: out of GPU memory with a batch of {len(batch)} prompts{beams}; lower "
                f"evaluate.decode_batch_size (it is the batch of prompts decoded together)"
            ) from None
        for i, row in zip(ids, rows):
            results[i] = row
        bar.update(len(ids))
    bar.close()
    return results


def _limit(decoding: Decoding, prompt_length: int) -> int:
    """A prompt's limit of new tokens: max_new_tokens, and at most max_ratio per prompt token."""
    if decoding.max_ratio > 0:
        return max(1, min(decoding.max_new_tokens, math.ceil(decoding.max_ratio * prompt_length)))
    return decoding.max_new_tokens
