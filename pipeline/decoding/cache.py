"""What a model remembers while it decodes: a GPT's key/value cache, a recurrent model's state.

Both answer the decoder (pipeline.decoding.decode) through the same few methods:
    logits, cache = Cache.prefill(model, prompts, new_tokens)   # prompts of any lengths, one batch
    logits = cache.step(model, tokens)                          # one token more in every row
    cache = cache.select(rows); cache.follow(parents); cache.share(beams)  # compaction; beams
    cache.fits(prompt_length, new_tokens); logits = cache.join(model, prompts)  # continuous batching

A GPT's keys and values (KVCache) are preallocated per batch (prompt plus new tokens) and written in
place. Row r's context sits in columns [start[r], length): the columns before are left padding, or
context slid out of the window. The rules of it all live here:
- prompts of any lengths: left-padded and masked, each row at its own positions;
- the sliding window: a row whose context reaches block_size re-encodes its last half and goes on,
  that row alone; a cache with no room left drops the columns every row has slid past;
- compaction (`select`): finished rows leave, the rows kept move to the front of the same tensors;
- beams (`share`, `follow`): a prompt's beams share its columns, which attention reads once for all
  of them (`beam_attention`); a beam follows its parent by copying the columns after the prompt;
- continuous batching (`join`): prompts encoded on their own, then written to end at the batch's
  next column;
- the static path for CUDA graphs: attention always spans the whole width (masked) and the next
  column is held on the device, so that every step has the same shapes.
The model sees a cache only through `Columns`, the view of the columns one forward writes: their
positions, and `attend(layer, q, k, v)`, the one call its attention makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFILL_ROWS = 16  # prompts encoded together by prefill(): few enough that little is padded


def cache_for(model) -> type:
    """The cache a model decodes with: a GPT's keys and values, or a recurrent model's state."""
    return KVCache if model.bounded_context else RecurrentState


def next_logits(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Each row's next-token logits after its newest token: a step but for counting the column
    (what pipeline.decoding.decode.CompiledStep compiles: static shapes)."""
    view = cache.begin(1)
    return model.decode(tokens[:, None], view.positions, view)


@dataclass
class Columns:
    """The cache's view of the T columns one forward writes: the tokens' positions, and attention."""

    cache: KVCache
    positions: torch.Tensor  # (T,) the same in every row, or (rows, T)
    mask: torch.Tensor | None  # additive, built once for every layer; None: causal, or all columns
    sharing: bool  # one new position per row, a prompt's columns read once for all its beams

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Keep these positions' keys and values in the cache; attend to what each row sees."""
        k, v = self.cache.write(layer, k, v)
        if self.sharing:
            return beam_attention(q, k, v, self.cache.shared, self.cache.group, self.mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, is_causal=self.mask is None and q.size(2) > 1
        )


def beam_attention(q, k, v, shared: int, group: int, prompt_mask) -> torch.Tensor:
    """Attention of one new position per row, the rows in groups (a prompt's beams) whose first
    `shared` columns are the same (the prompt): each group's queries read those columns once, for
    all its rows, instead of once per row; each row's own columns (after them) as usual. Equal to
    scaled_dot_product_attention over all the columns (masked by `prompt_mask`, (groups, 1, 1,
    shared), additive), but for float rounding; beam search's decode step reads ~0.45x the cache."""
    R, H, _, D = q.shape
    B, S = R // group, shared
    qg = q.reshape(B, group, H, D).transpose(1, 2)  # (groups, heads, group, D)
    scores = torch.cat(
        [
            qg @ k[::group, :, :S].transpose(-1, -2) + prompt_mask,
            (q @ k[:, :, S:].transpose(-1, -2)).reshape(B, group, H, -1).transpose(1, 2),
        ],
        dim=-1,
    )
    w = torch.softmax(scores.float() * D**-0.5, dim=-1).to(q.dtype)
    own = w[..., S:].transpose(1, 2).reshape(R, H, 1, -1) @ v[:, :, S:]  # (rows, heads, 1, D)
    y = w[..., :S] @ v[::group, :, :S] + own.reshape(B, group, H, D).transpose(1, 2)
    return y.transpose(1, 2).reshape(R, H, 1, D)


class KVCache:
    """A GPT's keys and values while decoding: every layer's, (rows, heads, width, head size)."""

    def __init__(self, keys, values, start, padded: bool, static: bool = False, block_size: int = 0):
        self.keys, self.values = keys, values  # per layer
        self.start = start  # (rows,) the first column of each row's context
        self.padded = padded  # some row starts after column 0 (known on the host: no wait for the device)
        self.static = static  # the whole width attended (masked), the next column on the device
        self.block_size = block_size  # the model's context
        self.length = 0  # columns written
        self.shared = 0  # leading columns equal in every row of a prompt's beams (never reordered)
        self.group = 1  # rows per prompt (its beams, next to each other), sharing those columns
        self.cursor = torch.zeros((), dtype=torch.long, device=start.device) if static else None
        self.history: torch.Tensor | None = None  # every row's tokens, column by column: for the window
        if static:
            self._mark_static()

    @classmethod
    def empty(cls, model, rows: int, width: int, start: torch.Tensor, padded: bool, static: bool = False):
        cfg, w = model.cfg, model.wte.weight
        shape = (rows, cfg.n_head, width, cfg.n_embd // cfg.n_head)
        new = torch.zeros if static else torch.empty  # static: the columns not yet written are attended to
        keys = [new(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        values = [new(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        return cls(keys, values, start, padded, static, model.block_size)

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, prompts: list[list[int]], new_tokens: int, static: bool = False):
        """Each prompt's next-token logits, and the cache of their keys and values with room for
        `new_tokens` more (a long generation: two contexts' width, a window that slides; static:
        one width of two, so that few shapes are compiled)."""
        block, longest = model.block_size, max(map(len, prompts))
        width = min(longest + new_tokens, 2 * block)
        if static:
            width = block if width <= block else 2 * block
        logits, cache = cls._encode(model, prompts, width, static)
        if longest + new_tokens > block:  # the window will slide: every token so far, column by column
            cache.history = torch.zeros(len(prompts), width, dtype=torch.long, device=logits.device)
            for i, p in enumerate(prompts):
                cache.history[i, longest - len(p) : longest] = torch.as_tensor(p)
        return logits, cache

    @classmethod
    def _encode(cls, model, prompts: list[list[int]], width: int, static: bool = False):
        """prefill() but for the window: prompts (their last block_size tokens) encoded PREFILL_ROWS
        at a time in order of length, each group padded only to its own longest."""
        prompts = [p[-model.block_size :] for p in prompts]
        L, device = max(map(len, prompts)), model.wte.weight.device
        pads = [L - len(p) for p in prompts]
        cache = cls.empty(model, len(prompts), max(width, L), torch.tensor(pads, device=device), any(pads), static)
        logits = torch.empty(len(prompts), model.vocab_size, dtype=model.wte.weight.dtype, device=device)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for g in range(0, len(order), PREFILL_ROWS):
            rows = order[g : g + PREFILL_ROWS]
            n = max(len(prompts[i]) for i in rows)
            idx = torch.zeros(len(rows), n, dtype=torch.long)
            for r, i in enumerate(rows):
                idx[r, n - len(prompts[i]) :] = torch.as_tensor(prompts[i])
            sub_pads = [n - len(prompts[i]) for i in rows]
            sub = cls.empty(model, len(rows), n, torch.tensor(sub_pads, device=device), any(sub_pads))
            # rows in a run (generate() sorts prompts by length) are copied into as a slice
            at = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
            view = sub.begin(n)
            logits[at] = model.decode(idx.to(device), view.positions, view)
            for mine, theirs in zip((*cache.keys, *cache.values), (*sub.keys, *sub.values)):
                mine[at, :, L - n : L] = theirs
                mine[at, :, : L - n] = 0  # padding: never attended, but never NaN (0 x NaN is NaN)
        cache.advance(L)
        return logits, cache

    def _mark_static(self) -> None:
        """Tell torch.compile these tensors keep their address (CUDA graphs replay into them)."""
        for t in (*self.keys, *self.values, self.start, self.cursor):
            torch._dynamo.mark_static_address(t)

    @property
    def width(self) -> int:
        return self.keys[0].size(2)

    def begin(self, T: int) -> Columns:
        """The view of the next T columns: their positions (each row's count from its first
        column; a row past its context, about to slide, gets garbage, replaced by the slide) and
        the mask of the columns each sees."""
        if not self.padded and not self.static and self.length + T <= self.block_size:  # every row alike
            positions = torch.arange(self.length, self.length + T, device=self.start.device)
        else:
            positions = (self._columns(T) - self.start[:, None]).clamp_(0, self.block_size - 1)
        sharing = (
            not self.static and T == 1 and self.group > 1 and self.shared > 0
        )  # (static first: what compiles reads)
        return Columns(self, positions, self._prompt_mask() if sharing else self._mask(T), sharing)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' keys and values at the next columns; every column to attend to."""
        T = k.size(2)
        if self.static:  # at a column the device holds: the same graph every step (CUDA graphs)
            columns = self.cursor + torch.arange(T, device=k.device)
            self.keys[layer].index_copy_(2, columns, k)
            self.values[layer].index_copy_(2, columns, v)
            return self.keys[layer], self.values[layer]
        end = self.length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """Count T columns more as written (static: on the device too, for the next step)."""
        self.length += T
        if self.static:
            self.cursor.fill_(self.length)

    def _columns(self, T: int) -> torch.Tensor:
        """The columns the next T positions go to."""
        first = self.cursor if self.static else self.length
        return first + torch.arange(T, device=self.start.device)

    def _prompt_mask(self) -> torch.Tensor:
        """beam_attention's mask: each group's padding among the shared columns, (groups, 1, 1, shared)."""
        start = self.start[:: self.group, None]
        cols = torch.arange(self.shared, device=start.device)
        hidden = torch.zeros(len(start), self.shared, dtype=self.keys[0].dtype, device=start.device)
        return hidden.masked_fill_(cols < start, float("-inf"))[:, None, None]

    def _mask(self, T: int) -> torch.Tensor | None:
        """Which columns each of T new positions sees: its row's context up to itself (and itself,
        so a padding position is never left with nothing). None: all columns so far (one new
        position), or causal among them (a first prefill), needing no mask."""
        if not self.padded and not self.static and (T == 1 or self.length == 0):
            return None
        device = self.start.device
        cols = torch.arange(self.width if self.static else self.length + T, device=device)
        new = self._columns(T)[:, None]
        seen = (cols <= new) & ((cols >= self.start[:, None, None]) | (cols == new))
        # additive: what the fused kernel adds to the scores anyway
        hidden = torch.zeros(seen.shape, dtype=self.keys[0].dtype, device=device).masked_fill_(~seen, float("-inf"))
        return hidden[:, None]  # (rows, 1, T, columns)

    @torch.inference_mode()
    def step(self, model, tokens: torch.Tensor, logits_of=next_logits) -> torch.Tensor:
        """Feed each row's newest token: the logits of the next. A row whose context is full
        re-encodes its last half context instead; a cache with no room left first drops the
        columns every row has slid past. `logits_of`: next_logits, or a compiled step of it."""
        full = None
        if self.history is not None:
            if self.length == self.width:
                self._shift(int(self.start.min()))
            self.history[:, self.length] = tokens
            if self.length >= self.block_size:
                full = (self.length - self.start >= self.block_size).nonzero().squeeze(1)
        logits = logits_of(model, tokens, self)
        self.advance(1)
        if full is not None and full.numel():
            logits[full] = self._slide(model, full)
        return logits

    def _slide(self, model, rows: torch.Tensor) -> torch.Tensor:
        """Re-encode `rows` whose context is full: their last half context becomes their whole
        context, at positions from 0, in the cache's last columns. Those rows' next-token logits."""
        n = self.block_size // 2
        sub = KVCache.empty(model, len(rows), n, torch.zeros(len(rows), dtype=torch.long, device=rows.device), False)
        view = sub.begin(n)
        logits = model.decode(self.history[rows, self.length - n : self.length], view.positions, view)
        for mine, theirs in zip((*self.keys, *self.values), (*sub.keys, *sub.values)):
            mine[rows, :, self.length - n : self.length] = theirs
        self.start[rows] = self.length - n
        self.padded, self.shared = True, 0
        return logits

    def _shift(self, n: int) -> None:
        """Drop the first n columns (slid out of every row's window), making room at the end."""
        for t in (*self.keys, *self.values):
            t[:, :, : self.length - n] = t[:, :, n : self.length].clone()
        self.history[:, : self.length - n] = self.history[:, n : self.length].clone()
        self.start -= n
        self.length -= n
        if self.static:
            self.cursor.fill_(self.length)
        self.shared = max(0, self.shared - n)

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of these rows only: finished rows dropped (the rows kept move to the front of
        the same tensors, their written columns only), or beams repeated (new tensors). The cache
        it was made from is not to be used again."""
        n, L = len(rows), self.length
        if self.static or n > len(self.start):
            self.keys = [k.index_select(0, rows) for k in self.keys]
            self.values = [v.index_select(0, rows) for v in self.values]
        else:
            for t in (*self.keys, *self.values):
                t[:n, :, :L] = t[rows, :, :L]  # the rows are gathered first, then written
            self.keys, self.values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        self.start = self.start.index_select(0, rows)
        if self.history is not None:
            self.history = self.history.index_select(0, rows)
        if self.static:
            self._mark_static()
        return self

    def share(self, group: int) -> None:
        """The rows are `group` beams of each prompt, next to each other, their columns so far its own."""
        self.shared, self.group = self.length, group

    def follow(self, parent: torch.Tensor) -> None:
        """Beam search: each row takes its parent row's columns, in place; the leading `shared`
        columns (the prompt, the same in every beam of it) are left as they are, and so are the
        rows whose parent is themselves (asked of the device, except in a static cache)."""
        if self.history is not None:
            self.history = self.history.index_select(0, parent)
        a, b = self.shared, self.length
        rows = slice(None)
        if not self.static:
            rows = (parent != torch.arange(len(parent), device=parent.device)).nonzero().squeeze(1)
            if not rows.numel():
                return
            parent = parent[rows]
        for t in (*self.keys, *self.values):
            t[rows, :, a:b] = t[parent, :, a:b]  # the parents are gathered first, then written
        self.start[rows] = self.start[parent]

    def fits(self, prompt_length: int, new_tokens: int) -> bool:
        """Whether join() can take a prompt: an eager cache with no window to slide, the prompt no
        longer than the columns written, room for its new tokens."""
        if self.static or self.history is not None:
            return False
        return 0 < prompt_length <= self.length and self.length + new_tokens <= self.width

    @torch.inference_mode()
    def join(self, model, prompts: list[list[int]]) -> torch.Tensor:
        """Continuous batching: rows for prompts (each of which fits()) after the others; their
        next-token logits. They are encoded on their own, and their keys and values written so that
        each ends at the column the batch writes next, as if it had been left-padded from the start."""
        logits, sub = KVCache._encode(model, prompts, max(map(len, prompts)))
        L, n, added = self.length, sub.length, len(prompts)
        for tensors, theirs in ((self.keys, sub.keys), (self.values, sub.values)):
            for layer, t in enumerate(tensors):
                grown = t.new_zeros((t.size(0) + added, *t.shape[1:]))
                grown[: t.size(0), :, :L] = t[:, :, :L]
                grown[t.size(0) :, :, L - n : L] = theirs[layer][:, :, :n]
                tensors[layer] = grown
        self.start = torch.cat([self.start, sub.start + (L - n)])
        self.padded = True
        return logits


class RecurrentState:
    """A recurrent model's hidden state while decoding (batch in dimension 1; an LSTM's is (h, c)):
    prompts of any lengths packed, so that each row's state is that after its own last token."""

    def __init__(self, state):
        self.state = state

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, prompts: list[list[int]], new_tokens: int = 0, static: bool = False):
        lengths = [len(p) for p in prompts]
        idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.as_tensor(p)
        logits, state = model.decode(idx.to(model.embed.weight.device), None, lengths)
        return logits, cls(state)

    @torch.inference_mode()
    def step(self, model, tokens: torch.Tensor, logits_of=None) -> torch.Tensor:
        """Feed each row's newest token: the logits of the next (`logits_of`: a GPT's only)."""
        logits, self.state = model.decode(tokens[:, None], self.state)
        return logits

    def select(self, rows: torch.Tensor) -> RecurrentState:
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, rows) for s in self.state)
        else:
            self.state = self.state.index_select(1, rows)
        return self

    def follow(self, parent: torch.Tensor) -> None:
        """Beam search: each row takes its parent's state."""
        self.select(parent)

    def share(self, group: int) -> None:
        """Beams: nothing to share (each row's state is its own)."""

    def fits(self, prompt_length: int, new_tokens: int) -> bool:
        return False  # (join is for a GPT's cache)
