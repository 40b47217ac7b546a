"""Decoding: greedy, sampled (temperature, top-k, top-p) and beam search, for every use of a model
that writes text (translation, question answering, samples, `python -m pipeline.generate`, the
playground).

One step loop (`Decoder`) serves them all. Any prompts decode together: `generate` sorts them by
length (so little is padded) and decodes up to batch_size at a time; the model's cache
(pipeline.decoding.cache) holds each row at its own positions. A finished row (eos, or its own limit
of new tokens) stops costing compute: the batch is compacted once a quarter of it is done. Beam
search decodes prompts x beams rows the same way. The device is asked whether to stop every
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
from pipeline.decoding.cache import cache_for, next_logits


@dataclass
class Decoding:
    """How to pick tokens. temperature 0 is greedy; beam_size > 1 is beam search (deterministic).
    These defaults decode greedily with no filtering; the sampling defaults a user sees are
    evaluate's (pipeline.core.params.Evaluate.sampling()), which generate and the playground take."""

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
    """Prompts of any lengths being decoded together: the model's cache (pipeline.decoding.cache),
    the tokens written so far, each row's limit of new tokens and whether it is done. `rows` maps
    each row to its prompt's index in the batch as given (rows go when the batch is compacted)."""

    def __init__(self, model, prompts: list[list[int]], eos_id: int, decoding: Decoding, limits=None, step=None):
        self.model, self.eos_id = model, eos_id
        self.logits_of = step or next_logits  # a CompiledStep: static shapes, and no compaction (a new shape)
        prompts = [keep_end(model, p) for p in prompts]
        n_new = decoding.max_new_tokens
        self.logits, self.cache = cache_for(model).prefill(model, prompts, n_new, static=step is not None)
        device = self.logits.device
        self.prompt_ids = _prompt_ids(prompts, decoding, device)
        self.limit = torch.tensor(limits or [n_new] * len(prompts), device=device)
        self.rows = torch.arange(len(prompts))
        self.begin = torch.zeros(len(prompts), dtype=torch.long)  # the column of out where each row's tokens begin
        self.out = torch.empty(len(self.rows), n_new, dtype=torch.long, device=device)
        self.n = 0  # tokens written per row
        self.done = torch.zeros(len(self.rows), dtype=torch.bool, device=device)

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows (in this order): finished rows dropped, or each prompt's beams."""
        cpu = rows.cpu()
        self.cache = self.cache.select(rows)
        self.logits, self.rows, self.begin = self.logits.index_select(0, rows), self.rows[cpu], self.begin[cpu]
        self.limit = self.limit.index_select(0, rows)
        for name in ("prompt_ids", "out", "done"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))

    def write(self, tokens: torch.Tensor) -> None:
        """Append each row's next token (eos in a finished row); a row is done at eos or its limit."""
        tokens = tokens.masked_fill(self.done, self.eos_id)
        self.out[:, self.n] = tokens
        self.n += 1
        self.done |= (tokens == self.eos_id) | (self.n >= self.limit)

    def advance(self) -> None:
        """Feed the newest tokens to the model: the logits of the next ones."""
        self.logits = self.cache.step(self.model, self.out[:, self.n - 1], self.logits_of)

    def ids(self, row: int) -> list[int]:
        """A row's new tokens, up to its eos."""
        ids = self.out[row, int(self.begin[row]) : self.n].tolist()
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids

    def fits(self, prompt: list[int], limit: int) -> bool:
        """Whether join() can take this prompt: the cache can (a GPT's, eager, no window to slide),
        and there is no repetition penalty (whose prompt ids have the batch's width)."""
        return self.prompt_ids is None and self.cache.fits(len(prompt), limit)

    def join(self, prompts: list[list[int]], limits: list[int], first_index: int) -> None:
        """Continuous batching: add prompts (each of which fits()) to the batch as it decodes, once
        every row's logits are of its next token (KVCache.join); their limits of new tokens count
        from now. Their rows map to prompts first_index, first_index + 1, ..."""
        n_new, device = len(prompts), self.out.device
        logits = self.cache.join(self.model, prompts)
        limits_now = torch.tensor(limits, device=device) + self.n
        width = max(self.out.size(1), int(limits_now.max()))
        out = torch.full((len(self.out) + n_new, width), self.eos_id, dtype=torch.long, device=device)
        out[: len(self.out), : self.out.size(1)] = self.out
        self.out, self.limit = out, torch.cat([self.limit, limits_now])
        self.logits = torch.cat([self.logits, logits])
        self.done = torch.cat([self.done, torch.zeros(n_new, dtype=torch.bool, device=device)])
        self.rows = torch.cat([self.rows, torch.arange(first_index, first_index + n_new)])
        self.begin = torch.cat([self.begin, torch.full((n_new,), self.n, dtype=torch.long)])


class Decoder:
    """The one step loop: prompts decoded together, greedy, sampled or by beam search, one token
    per row at each step(), for generate() and beam_search(), stream() and the playground's engine.

    A step chooses each row's next token (choose()), then settles (settle()): every `every` steps
    it asks the device which prompts are done (all their beams at eos or their limit), ranks them
    (`results`, by prompt index; `finished`: those of this step) and drops them from the batch once
    a quarter of it is done (`compact`); then it feeds the newest tokens (Batch.advance).

    Beam search keeps prompts x beams rows. A finished beam can only be extended by eos at no cost,
    so it keeps its score and competes with the live beams; a prompt's beams are ranked by
    length-normalised score, log-probability / length ** length_penalty, for each of
    `length_penalties` (default: decoding's), as the search itself never reads it.
    """

    def __init__(
        self,
        model,
        prompts,
        eos_id: int,
        decoding: Decoding,
        limits=None,
        gen=None,
        step=None,
        *,
        length_penalties=None,
        compact: bool = True,
        every: int = 0,
    ):
        """`step`: a CompiledStep; `length_penalties` given: a beam search (even of one beam) ranked
        under each; `compact`: drop finished rows (stream() keeps them); `every`: steps between
        asking the device which rows are done (0: check_every's)."""
        self.batch = Batch(model, prompts, eos_id, decoding, limits, step)
        self.decoding, self.gen, self.eos_id = decoding, gen, eos_id
        self.beams = decoding.beam_size  # rows per prompt
        self.search = decoding.beam_size > 1 or length_penalties is not None  # else greedy or sampled
        self.length_penalties = length_penalties or (decoding.length_penalty,)
        self.compact = compact and step is None
        self.every = every or check_every(self.batch.logits.device)
        self.scores = self.lengths = None  # beam search: each row's log-probability and length
        self.results: dict[int, list[int] | tuple] = {}
        self.finished: list[int] = []

    def step(self) -> bool:
        """One token more in every row; False once every prompt has its result."""
        self.choose()
        return self.settle()

    def choose(self) -> None:
        """Write each row's next token."""
        if not self.search:
            self.batch.write(next_tokens(self.batch, self.decoding, self.gen))
        elif self.batch.n == 0:
            self._first_beams()
        else:
            self._extend_beams()

    def _first_beams(self) -> None:
        """Each prompt's best first tokens start its beams (its cache computed once, its prompt's
        columns shared)."""
        batch = self.batch
        logp = torch.log_softmax(_adjust(batch.logits, batch, self.decoding).float(), dim=-1)
        scores, first = logp.topk(min(self.beams, logp.size(-1)), dim=-1)
        K = self.beams = scores.size(1)
        batch.select(torch.arange(len(batch.rows), device=batch.out.device).repeat_interleave(K))
        batch.cache.share(K)
        batch.write(first.reshape(-1))
        self.scores, self.lengths = scores.reshape(-1), torch.ones(len(batch.rows), device=batch.out.device)

    def _extend_beams(self) -> None:
        """Each prompt's K best continuations of its K beams become its beams (a finished beam:
        eos at no cost); every row becomes a copy of its parent so far, then takes its token."""
        batch, d, K = self.batch, self.decoding, self.beams
        logp = torch.log_softmax(_adjust(batch.logits, batch, d).float(), dim=-1)
        logp = _ban_repeats(logp, batch.out[:, : batch.n], d.no_repeat_ngram)
        done, V, B = batch.done, logp.size(-1), len(batch.rows) // K
        logp[done] = float("-inf")
        logp[done, self.eos_id] = 0.0
        top, pos = (self.scores[:, None] + logp).view(B, K * V).topk(K, dim=-1)
        parent = (torch.arange(B, device=logp.device)[:, None] * K + pos // V).view(-1)
        self.lengths = self.lengths[parent] + (~done[parent]).float()
        self.scores = top.view(-1)
        batch.cache.follow(parent)
        batch.out[:, : batch.n] = batch.out[parent, : batch.n]
        batch.done = done[parent]
        batch.write((pos % V).view(-1))  # a beam at its prompt's limit is done: frozen until the prompt is ranked

    def settle(self) -> bool:
        """Rank the prompts that are done, drop them once enough are, and feed the newest tokens
        (the logits of the next ones: where Batch.join can add prompts); False once all are done."""
        batch, K = self.batch, self.beams
        self.finished = []
        if batch.n % self.every == 0 or batch.n >= self.decoding.max_new_tokens:
            ended = batch.done.view(-1, K).all(1).cpu()
            if not bool(ended.any()):  # (the usual step: one question to the device)
                batch.advance()
                return True
            for b in ended.nonzero().squeeze(1).tolist():
                prompt = int(batch.rows[b * K])
                if prompt not in self.results:
                    self.results[prompt] = self._ranked(b) if self.search else batch.ids(b)
                    self.finished.append(prompt)
            if bool(ended.all()):
                return False
            if self.compact and int(ended.sum()) * COMPACT >= len(ended):  # the prompts still decoding
                keep = (~ended).nonzero().squeeze(1).to(batch.out.device)
                rows = (keep[:, None] * K + torch.arange(K, device=keep.device)).reshape(-1)
                batch.select(rows)
                if self.search:
                    self.scores, self.lengths = self.scores.index_select(0, rows), self.lengths.index_select(0, rows)
        batch.advance()
        return True

    def _ranked(self, b: int) -> tuple[list[int], ...]:
        """Prompt b's best beam under each length penalty."""
        beams = slice(b * self.beams, (b + 1) * self.beams)
        scores, lengths = self.scores[beams], self.lengths[beams]
        return tuple(
            self.batch.ids(b * self.beams + int((scores / lengths.pow(lp)).argmax())) for lp in self.length_penalties
        )

    def stop(self, rows: list[int]) -> None:
        """End these rows now (their prompts asked to stop): done, as if at their limit."""
        self.batch.done[torch.tensor(rows, device=self.batch.done.device)] = True

    def run(self) -> list:
        """Decode to the end: each prompt's result, in the order given."""
        while self.step():
            pass
        return [self.results[i] for i in range(len(self.results))]


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
    """A GPT's decode step (pipeline.decoding.cache.next_logits) compiled (torch.compile; on CUDA,
    mode "reduce-overhead": CUDA graphs), over a static cache: every step has the same shapes, and
    the cache is written at a column the device holds. Where compiling fails it says why, once,
    and steps eagerly."""

    def __init__(self, model, **options):
        self.model = model
        self.options = options or {"mode": "reduce-overhead"}
        self.compiled = torch.compile(
            lambda tokens, cache: next_logits(model, tokens, cache), fullgraph=True, dynamic=False, **self.options
        )
        self.failed: str | None = None

    @classmethod
    def of(cls, model, **options):
        """The model's compiled step (compiled once per model and options); None for a recurrent model."""
        if not model.bounded_context:
            return None
        key = repr(sorted(options.items()))
        steps = model.__dict__.setdefault("_compiled_steps", {})
        if key not in steps:
            steps[key] = cls(model, **options)
        return steps[key]

    def __call__(self, model, tokens: torch.Tensor, cache) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.compiled(tokens, cache).clone()  # a CUDA graph's output is overwritten by its next replay
            except Exception as e:  # no compiler, an unsupported operation: decoding goes on, eagerly
                self.failed = first_line(e)
                print(f"decoding: not compiled ({self.failed}); decoding eagerly", file=sys.stderr, flush=True)
        return next_logits(model, tokens, cache)


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
    decoder = Decoder(model, _as_lists(prompts), eos_id, decoding, gen=gen, compact=False)
    while True:
        running = decoder.step()
        yield decoder.batch.out[:, decoder.batch.n - 1]
        if not running:
            return


def next_tokens(batch: Batch, decoding: Decoding, gen) -> torch.Tensor:
    """Each row's next token, from the batch's logits: no-repeat n-grams banned, the repetition
    penalty applied, then picked greedily or sampled."""
    logits = batch.logits
    if decoding.no_repeat_ngram and batch.n >= decoding.no_repeat_ngram:
        logits = _ban_repeats(logits, batch.out[:, : batch.n], decoding.no_repeat_ngram)
    return _pick(_adjust(logits, batch, decoding), decoding, gen)


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
    return _in_batches(model, prompts, eos_id, decoding, batch_size, progress, compile, gen=gen)


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
    ranked = _in_batches(
        model, prompts, eos_id, decoding, batch_size, progress, compile, length_penalties=length_penalties
    )
    return {lp: [r[i] for r in ranked] for i, lp in enumerate(length_penalties)}


def _in_batches(model, prompts, eos_id: int, decoding: Decoding, batch_size: int, progress, compile: bool, **options):
    """The Decoder's results over batches of prompts sorted by length, in the prompts' order."""
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
            rows = Decoder(model, batch, eos_id, decoding, limits, step=step, **options).run()
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
