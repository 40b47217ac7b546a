"""The language models: a GPT (decoder-only Transformer) and recurrent baselines (LSTM, GRU, RNN).

The GPT is built from params.yaml's options: GPT-2's block (learned positions, LayerNorm, GELU
MLP) or the later models' (rotary positions (RoPE), RMSNorm, a SwiGLU MLP; the default since it
won at equal time, docs/RECORDS.md), tied or untied embeddings, ReLU squared, QK-norm. Attention
goes only through `scaled_dot_product_attention` (on CUDA flash or cuDNN's kernel, train.attention;
on CPU the fused flash kernel).

All share one interface:
    logits, loss = model(idx, targets)      # loss: mean cross-entropy (None without targets)
    None, loss = model(idx, targets, return_logits=False)  # the loss only (what training asks for)
    logits, state = model.prefill(prompts, width)  # decoding: prompts of any lengths in one batch
    logits, state = model.step(tokens, state)      # the next token of every row
    state = model.select(state, rows); state = model.follow(state, parents)  # drop rows; beams
where `state` is a GPT's key/value cache (KVCache: preallocated, written in place) or a recurrent
model's hidden state. Weights
on disk: pipeline.model.weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model.config import ModelConfig


def rope_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, head_dim // 2): pair i turns at base^(-2i/d)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels, (B, H, T, D), by the angles of its positions."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qk_norm = cfg.qk_norm
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None, kv: KVCache | None = None, layer: int = 0, mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:  # the angles of these T positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is None:  # training, scoring: the fused causal kernel (flash on CUDA and on CPU)
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0.0
            )
        else:  # decoding: write these positions' keys and values in place, attend to the columns `mask` shows
            if kv.static:  # at a column the device holds: the same graph every step (CUDA graphs)
                columns = kv.cursor + torch.arange(T, device=x.device)
                kv.keys[layer].index_copy_(2, columns, k)
                kv.values[layer].index_copy_(2, columns, v)
                k, v = kv.keys[layer], kv.values[layer]
            else:
                end = kv.length + T
                kv.keys[layer][:, :, kv.length : end] = k
                kv.values[layer][:, :, kv.length : end] = v
                k, v = kv.keys[layer][:, :, :end], kv.values[layer][:, :, :end]
            if kv.sharing(T):
                y = beam_attention(q, k, v, kv.shared, kv.group, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


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


class MLP(nn.Module):
    """GELU: proj(gelu(fc x)), 4x wide. SwiGLU: proj(silu(gate x) * (up x)), 8/3x wide (same
    parameters). ReLU squared: proj(relu(fc x)^2), 4x wide."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        hidden = 4 * cfg.n_embd
        if self.swiglu:  # 2/3 of 4x keeps the parameter count; rounded up to a multiple of 64
            hidden = -(-(8 * cfg.n_embd // 3) // 64) * 64
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-6)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv=None, layer=0, mask=None):
        x = x + self.attn(self.ln1(x), rope, kv, layer, mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    bounded_context = True  # at most block_size tokens of context (learned positions; the RoPE tables)
    PREFILL_ROWS = 16  # prompts encoded together by prefill(): few enough that little is padded
    chunked_loss: bool | None = None  # the loss-only output layer in chunks; None: on CPU only (output_layer)
    fused_loss: str = "none"  # train.fused_loss: liger for Liger-Kernel's fused linear cross-entropy (CUDA)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self.apply(self._init)
        # GPT-2: scale the residual projections by depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if cfg.zero_init_proj:  # each block starts as the identity (modded-nanogpt)
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def _run(self, idx, kv: KVCache | None = None):
        T = idx.size(1)
        x = self.wte(idx)
        if kv is None:
            if T > self.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.block_size}")
            rope = None
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(T, device=idx.device))
            else:
                rope = (self.rope_cos[:T], self.rope_sin[:T])
            mask = None
        else:
            # Each row's positions count from its first column (left padding, a slid window); a
            # row past its context (about to slide) gets garbage, replaced by slide()
            if not kv.padded and not kv.static and kv.length + T <= self.block_size:  # every row at the same positions
                pos = torch.arange(kv.length, kv.length + T, device=idx.device)
            else:
                pos = (kv.columns(T) - kv.start[:, None]).clamp_(0, self.block_size - 1)
            rope = None
            if self.wpe is not None:
                x = x + self.wpe(pos)
            elif pos.dim() == 1:
                rope = (self.rope_cos[kv.length : kv.length + T], self.rope_sin[kv.length : kv.length + T])
            else:
                rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])
            mask = kv.prompt_mask() if kv.sharing(T) else kv.mask(T)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, kv, i, mask)
        return self.ln_f(x)  # the caller counts the columns written: kv.advance(T)

    def forward(self, idx, targets=None, return_logits: bool = True):
        return output_layer(self.lm_head, self._run(idx), targets, return_logits, self.chunked_loss, self.fused_loss)

    # Decoding (pipeline.decoding.decode): prefill, then one step per token; the cache is written in place.

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], width: int, static: bool = False) -> tuple[torch.Tensor, KVCache]:
        """Logits of the next token after each prompt, and the cache of their keys and values with
        room for `width` columns. Prompts of any lengths share the batch, left-padded and masked
        (their last block_size tokens: the caller keeps the end that fits). They are encoded
        PREFILL_ROWS at a time in order of length, each group padded only to its own longest."""
        prompts = [p[-self.block_size :] for p in prompts]
        L, device = max(map(len, prompts)), self.wte.weight.device
        pads = [L - len(p) for p in prompts]
        kv = KVCache.empty(self, len(prompts), max(width, L), torch.tensor(pads, device=device), any(pads), static)
        logits = torch.empty(len(prompts), self.vocab_size, dtype=self.wte.weight.dtype, device=device)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for g in range(0, len(order), self.PREFILL_ROWS):
            rows = order[g : g + self.PREFILL_ROWS]
            n = max(len(prompts[i]) for i in rows)
            idx = torch.zeros(len(rows), n, dtype=torch.long)
            for r, i in enumerate(rows):
                idx[r, n - len(prompts[i]) :] = torch.as_tensor(prompts[i])
            sub_pads = [n - len(prompts[i]) for i in rows]
            sub = KVCache.empty(self, len(rows), n, torch.tensor(sub_pads, device=device), any(sub_pads))
            # rows in a run (generate() sorts prompts by length) are copied into as a slice
            at = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
            logits[at] = self.lm_head(self._run(idx.to(device), sub)[:, -1])
            for layer in range(len(self.blocks)):
                for mine, theirs in ((kv.keys[layer], sub.keys[layer]), (kv.values[layer], sub.values[layer])):
                    mine[at, :, L - n : L] = theirs
                    mine[at, :, : L - n] = 0  # padding: never attended, but never NaN (0 x NaN is NaN)
        kv.advance(L)
        return logits, kv

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, kv: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Logits of the next token after each row's newest token `tokens` (rows,); the cache grows
        by one column, in place."""
        logits = self.next_logits(tokens, kv)
        kv.advance(1)
        return logits, kv

    def next_logits(self, tokens: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """step() but for the column count: what is compiled for CUDA graphs (static shapes)."""
        return self.lm_head(self._run(tokens[:, None], kv)[:, -1])

    @staticmethod
    def select(kv: KVCache, rows: torch.Tensor) -> KVCache:
        return kv.select(rows)

    @staticmethod
    def follow(kv: KVCache, parent: torch.Tensor) -> KVCache:
        kv.follow(parent)
        return kv

    @torch.inference_mode()
    def slide(self, kv: KVCache, rows: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Re-encode `rows` whose context is full: their last tokens `history` (rows x n, the
        newest included) become their whole context, at positions from 0, in the cache's last n
        columns. Returns those rows' logits of the next token."""
        n = history.size(1)
        sub = KVCache.empty(self, len(rows), n, torch.zeros(len(rows), dtype=torch.long, device=history.device), False)
        logits = self.lm_head(self._run(history, sub)[:, -1])
        sub.advance(n)
        for layer in range(len(self.blocks)):
            kv.keys[layer][rows, :, kv.length - n : kv.length] = sub.keys[layer]
            kv.values[layer][rows, :, kv.length - n : kv.length] = sub.values[layer]
        kv.start[rows] = kv.length - n
        kv.padded, kv.shared = True, 0
        return logits

    @staticmethod
    def context_lengths(kv: KVCache) -> torch.Tensor:
        """Tokens in each row's context."""
        return kv.length - kv.start


@dataclass
class KVCache:
    """A GPT's keys and values while decoding: every layer's, preallocated for `width` columns and
    written in place (never grown by concatenation). Row r's context sits in columns
    [start[r], length): the columns before are left padding, or context slid out of the window.
    `static`: attention always spans the whole width (masked), so every step has the same shapes
    (what CUDA graphs need)."""

    keys: list[torch.Tensor]  # per layer: (rows, heads, width, head size)
    values: list[torch.Tensor]
    start: torch.Tensor  # (rows,) the first column of each row's context
    padded: bool  # some row starts after column 0 (known on the host: no wait for the device)
    static: bool = False
    length: int = 0  # columns written
    shared: int = 0  # leading columns equal in every row of a prompt's beams (never reordered)
    cursor: torch.Tensor | None = None  # static: `length` on the device, where the next column goes
    group: int = 1  # rows per prompt (its beams, next to each other), whose first `shared` columns are the same

    @classmethod
    def empty(cls, model: GPT, rows: int, width: int, start: torch.Tensor, padded: bool, static: bool = False):
        cfg, w = model.cfg, model.wte.weight
        shape = (rows, cfg.n_head, width, cfg.n_embd // cfg.n_head)
        # static: zeros, as the columns not yet written are attended to (masked; never NaN)
        new = torch.zeros if static else torch.empty
        keys = [new(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        values = [new(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        kv = cls(keys, values, start, padded, static)
        if static:
            kv.cursor = torch.zeros((), dtype=torch.long, device=w.device)
            kv.mark_static()
        return kv

    def mark_static(self) -> None:
        """Tell torch.compile these tensors keep their address (CUDA graphs replay into them)."""
        for t in (*self.keys, *self.values, self.start, self.cursor):
            torch._dynamo.mark_static_address(t)

    def columns(self, T: int) -> torch.Tensor:
        """The columns the next T positions go to."""
        first = self.cursor if self.static else self.length
        return first + torch.arange(T, device=self.start.device)

    def advance(self, T: int) -> None:
        """Count T columns more as written (static: on the device too, for the next step)."""
        self.length += T
        if self.static:
            self.cursor.fill_(self.length)

    @property
    def width(self) -> int:
        return self.keys[0].size(2)

    def sharing(self, T: int) -> bool:
        """Whether one new position per row attends through beam_attention (a prompt's columns
        read once for all its beams): eager beam search, while the prompt's columns are shared."""
        return not self.static and T == 1 and self.group > 1 and self.shared > 0  # (static first: what compiles reads)

    def prompt_mask(self) -> torch.Tensor:
        """beam_attention's mask: each group's padding among the shared columns, (groups, 1, 1, shared)."""
        start = self.start[:: self.group, None]
        cols = torch.arange(self.shared, device=start.device)
        hidden = torch.zeros(len(start), self.shared, dtype=self.keys[0].dtype, device=start.device)
        return hidden.masked_fill_(cols < start, float("-inf"))[:, None, None]

    def mask(self, T: int) -> torch.Tensor | None:
        """Which columns each of T new positions sees: its row's context up to itself (and itself,
        so a padding position is never left with nothing). None: all columns so far (one new
        position), or causal among them (a first prefill), needing no mask."""
        past = self.length
        if not self.padded and not self.static and (T == 1 or past == 0):
            return None
        device = self.start.device
        cols = torch.arange(self.width if self.static else past + T, device=device)
        new = self.columns(T)[:, None]
        seen = (cols <= new) & ((cols >= self.start[:, None, None]) | (cols == new))
        # additive, built once for every layer: what the fused kernel adds to the scores anyway
        hidden = torch.zeros(seen.shape, dtype=self.keys[0].dtype, device=device).masked_fill_(~seen, float("-inf"))
        return hidden[:, None]  # (rows, 1, T, columns)

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of these rows only: finished rows dropped (the rows kept move to the front of
        the same tensors, their written columns only), or beams repeated (new tensors). The cache
        it was made from is not to be used again."""
        start = self.start.index_select(0, rows)
        n, L = len(rows), self.length
        if self.static or n > len(self.start):
            keys = [k.index_select(0, rows) for k in self.keys]
            values = [v.index_select(0, rows) for v in self.values]
        else:
            keys, values = [], []
            for t, out in (
                (t, keys if i < len(self.keys) else values) for i, t in enumerate((*self.keys, *self.values))
            ):
                t[:n, :, :L] = t[rows, :, :L]  # the rows are gathered first, then written
                out.append(t[:n])
        kv = KVCache(keys, values, start, self.padded, self.static, self.length, self.shared, self.cursor, self.group)
        if self.static:
            kv.mark_static()
        return kv

    def follow(self, parent: torch.Tensor) -> None:
        """Beam search: each row takes its parent row's columns, in place; the leading `shared`
        columns (the prompt, the same in every beam of it) are left as they are, and so are the
        rows whose parent is themselves (asked of the device, except in a static cache)."""
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

    def shift(self, n: int) -> None:
        """Drop the first n columns (slid out of every row's window), making room at the end."""
        for t in (*self.keys, *self.values):
            t[:, :, : self.length - n] = t[:, :, n : self.length].clone()
        self.start -= n
        self.length -= n
        if self.static:
            self.cursor.fill_(self.length)
        self.shared = max(0, self.shared - n)


class RecurrentLM(nn.Module):
    """The classic recurrent language model: embedding, LSTM (or GRU, or tanh RNN) layers, linear."""

    bounded_context = False  # the state carries any length of context
    chunked_loss: bool | None = None  # as GPT's
    fused_loss: str = "none"  # as GPT's

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.embed = nn.Embedding(vocab_size, cfg.n_embd)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.arch]
        self.rnn = rnn(
            cfg.n_embd,
            cfg.n_hidden,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.n_hidden, vocab_size)

    def forward(self, idx, targets=None, return_logits: bool = True):
        x, _ = self.rnn(self.drop(self.embed(idx)))
        return output_layer(self.head, self.drop(x), targets, return_logits, self.chunked_loss, self.fused_loss)

    # Decoding (pipeline.decoding.decode): the same calls as the GPT's.

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], width: int = 0, static: bool = False):
        """Logits of the next token after each prompt, and the state after it: prompts of any
        lengths share the batch, packed, so each row's state is that after its own last token."""
        lengths = [len(p) for p in prompts]
        idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.as_tensor(p)
        x = self.embed(idx.to(self.embed.weight.device))
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        last = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); the top layer's h
        return self.head(last[-1]), state

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state):
        x, state = self.rnn(self.embed(tokens[:, None]), state)
        return self.head(x[:, -1, :]), state

    @staticmethod
    def select(state, rows: torch.Tensor):
        """The state of these rows (batch in dimension 1; an LSTM's is (h, c))."""
        if isinstance(state, tuple):
            return tuple(s.index_select(1, rows) for s in state)
        return state.index_select(1, rows)

    follow = select  # beam search: each row takes its parent's state


def output_layer(
    head: nn.Linear,
    x: torch.Tensor,
    targets,
    return_logits: bool = True,
    chunked: bool | None = None,
    fused: str = "none",
):
    """(logits, mean cross-entropy against `targets`) from the last hidden states `x`.

    With return_logits=False (what training asks for) the logits are None. The loss is then the
    same either way (tests/test_model.py); how it is computed depends on the device:
    - fused="liger" (train.fused_loss, CUDA with the [gpu] extra, checked when training starts):
      Liger-Kernel's fused linear cross-entropy (`liger_cross_entropy`);
    - CPU (chunked=None, or True): `LinearCrossEntropy`, a chunk of rows at a time, which never
      holds the logits of the whole batch and keeps the softmax in cache (faster on a CPU,
      benchmarks/train_throughput.py --loss both, docs/LOG.md);
    - CUDA (or chunked=False): the plain head and cross-entropy, which torch.compile fuses and
      which runs without a Python loop or a host synchronisation (benchmarks/gpu.sh).
    """
    if targets is None:
        return head(x), None
    if not return_logits and fused == "liger":
        return None, liger_cross_entropy(head, x, targets)
    if chunked is None:
        chunked = not x.is_cuda
    if not return_logits and chunked:
        return None, LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), head.weight, head.bias, targets.reshape(-1))
    logits = head(x)
    targets = targets.reshape(-1)
    # the mean over the targets that count, and 0 (not NaN) when none does, as LinearCrossEntropy
    counted = (targets != IGNORE).sum().clamp(min=1)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, ignore_index=IGNORE, reduction="sum")
    return (logits if return_logits else None), loss / counted


IGNORE = -100  # a target that does not count (F.cross_entropy's ignore_index): a pair's source, say


def liger_cross_entropy(head: nn.Linear, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of `head(x)` by Liger-Kernel's LigerFusedLinearCrossEntropyLoss
    (the [gpu] extra; Triton kernels, CUDA only): the logits are made a chunk of rows at a time and
    turned into the loss and its gradients at once, never held whole. Summed, then divided by the
    targets that count, so that none counting gives 0 (not NaN), as the other paths do."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    targets = targets.reshape(-1)
    counted = (targets != IGNORE).sum().clamp(min=1)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    return loss(head.weight, x.reshape(-1, x.size(-1)), targets, head.bias) / counted


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T + bias` against `targets` (those equal to IGNORE left
    out), a chunk of rows at a time.

    Each chunk's logits are made, turned into its loss and at once into the gradients of x,
    weight and bias (softmax minus one-hot), then dropped; backward only scales the stored
    gradients. Same FLOPs as the plain output layer and cross-entropy, but the (tokens x
    vocabulary) logits never exist whole: on a CPU the softmax runs in cache (the step of the
    default GPT is about 10% faster, docs/LOG.md), on a GPU it saves their memory (3 GB in
    float32 for 16k tokens and a 50k vocabulary). Under CUDA autocast the products run in its
    dtype and the softmax in float32.
    """

    CHUNK = 256  # rows per chunk: 256 x 4096 logits in float32 are 4 MB

    @staticmethod
    def forward(ctx, x, weight, bias, targets):
        dtype = x.dtype
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        counted = targets != IGNORE
        n = counted.sum().clamp(min=1)  # the mean is over the targets that count
        any_ignored = not bool(counted.all())  # one check per call; the chunks mask only if needed
        w = weight.to(dtype)
        gx = torch.empty_like(x) if want_x else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, x.size(0), LinearCrossEntropy.CHUNK):
                xc, yc = x[s : s + LinearCrossEntropy.CHUNK].to(dtype), targets[s : s + LinearCrossEntropy.CHUNK]
                if any_ignored:
                    ignored = ~counted[s : s + LinearCrossEntropy.CHUNK]
                    yc = yc.masked_fill(ignored, 0)  # any index; these rows' loss and gradient are zeroed
                logits = (xc @ w.t()).float()
                if bias is not None:
                    logits += bias.float()
                lse = torch.logsumexp(logits, dim=-1)
                row_loss = lse - logits.gather(1, yc[:, None]).squeeze(1)
                total += (row_loss.masked_fill(ignored, 0.0) if any_ignored else row_loss).sum()
                if not (want_x or want_w or want_b):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] -= 1
                if any_ignored:
                    g.masked_fill_(ignored[:, None], 0.0)
                g /= n
                if want_x:
                    gx[s : s + len(yc)] = (g.to(dtype) @ w).to(x.dtype)
                if want_w:
                    gw += (g.t().to(dtype) @ xc).float()
                if want_b:
                    gb += g.sum(0)
        ctx.save_for_backward(gx, gw, gb)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gx, gw, gb = ctx.saved_tensors
        return (
            None if gx is None else gx * grad,
            None if gw is None else (gw * grad).to(ctx.dtypes[0]),
            None if gb is None else (gb * grad).to(ctx.dtypes[1]),
            None,
        )


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    return GPT(cfg, vocab_size) if cfg.arch == "gpt" else RecurrentLM(cfg, vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward), as in the PaLM paper's appendix B.

    6 per parameter that multiplies activations (embedding lookups do not; a tied embedding
    does once, as the output layer), plus, for a GPT, 12 * layers * width * seq_len for the
    attention scores and their weighted sum (counted over the whole square, as is customary).
    """
    n = count_parameters(model)
    if isinstance(model, GPT):
        if not model.cfg.tie_embeddings:
            n -= model.wte.weight.numel()
        if model.wpe is not None:
            n -= model.wpe.weight.numel()
        return 6 * n + 12 * model.cfg.n_layer * model.cfg.n_embd * seq_len
    return 6 * (n - model.embed.weight.numel())
