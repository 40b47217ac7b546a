"""The language models: a GPT (decoder-only Transformer) and recurrent baselines (LSTM, GRU, RNN).

The GPT is built from params.yaml's options: GPT-2's block (learned positions, LayerNorm, GELU
MLP) or the later models' (rotary positions (RoPE), RMSNorm, a SwiGLU MLP; the default since it
won at equal time, docs/RECORDS.md), tied or untied embeddings, ReLU squared, QK-norm. Attention
goes only through `scaled_dot_product_attention` (on CUDA flash or cuDNN's kernel, train.attention;
on CPU the fused flash kernel).

Both kinds share one interface:
    logits, loss = model(idx, targets)      # loss: mean cross-entropy (None without targets)
    None, loss = model(idx, targets, return_logits=False)  # the loss only (what training asks for)
and decode through pipeline.decoding, which owns their decoding state:
    logits = gpt.decode(idx, positions, cache)     # each row's next-token logits; keys and values
                                                   #   go through cache.attend (pipeline.decoding.cache)
    logits, state = rnn.decode(idx, state, lengths)  # the recurrent state, carried by the caller
`model.loss` turns the last hidden states into the loss: the plain cross-entropy here, training's
faster paths in its place while training (pipeline.training.loss). Weights on disk:
pipeline.model.weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.params import ModelConfig

IGNORE = -100  # a target that does not count (F.cross_entropy's ignore_index): a pair's source, say


def cross_entropy(head: nn.Linear, x: torch.Tensor, targets: torch.Tensor, return_logits: bool = True):
    """(logits or None, the mean cross-entropy of head(x) over the targets that count; 0, not NaN,
    when none does)."""
    logits = head(x)
    targets = targets.reshape(-1)
    counted = (targets != IGNORE).sum().clamp(min=1)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, ignore_index=IGNORE, reduction="sum")
    return (logits if return_logits else None), loss / counted


def rope_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, head_dim // 2): pair i turns at base^(-2i/d)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, not even called where it does nothing (p 0, or not training): decoding's steps are
    short, and each call costs as much as a small operation."""
    return F.dropout(x, p, training) if p and training else x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels, (B, H, T, D), by the angles of its positions."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.qk_norm = cfg.qk_norm
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple | None, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:  # the angles of these T positions, queries and keys rotated together
            q, k = apply_rope(torch.cat([q, k], dim=1), *rope).split(self.n_head, dim=1)
        if cache is None:  # training, scoring: the fused causal kernel (flash on CUDA and on CPU)
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        else:  # decoding: the cache keeps these keys and values and attends over each row's context
            y = cache.attend(self.layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return dropout(self.proj(y), self.dropout, self.training)


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
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return dropout(self.proj(h), self.dropout, self.training)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-6)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln1(x), rope, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    bounded_context = True  # at most block_size tokens of context (learned positions; the RoPE tables)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.loss = cross_entropy  # training puts its own output layer here (pipeline.training.loss)
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = cfg.dropout
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
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

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """The last hidden states of `idx` (rows, T). Without positions: a sequence from position 0,
        attended causally. While decoding: each token's position, (T,) for every row or (rows, T),
        and the cache its keys and values go to."""
        T = idx.size(1)
        x = self.wte(idx)
        if positions is None and T > self.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.block_size}")
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) if positions is None else positions)
        elif positions is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        elif positions.dim() == 1:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        else:  # (rows, 1, T, D/2): each row's own angles, broadcast over the heads
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x = dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x, rope, cache)
        return self.ln_f(x)

    def forward(self, idx, targets=None, return_logits: bool = True):
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x), None
        return self.loss(self.lm_head, x, targets, return_logits)

    def decode(self, idx: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Decoding: the logits of each row's next token after `idx` (rows, T), at `positions`,
        its keys and values kept by `cache` (pipeline.decoding.cache)."""
        return self.lm_head(self.hidden(idx, positions, cache)[:, -1])


class RecurrentLM(nn.Module):
    """The classic recurrent language model: embedding, LSTM (or GRU, or tanh RNN) layers, linear."""

    bounded_context = False  # the state carries any length of context

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.loss = cross_entropy  # as GPT's
        self.embed = nn.Embedding(vocab_size, cfg.n_embd)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.arch]
        self.rnn = rnn(
            cfg.n_embd,
            cfg.n_hidden,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        self.dropout = cfg.dropout
        self.head = nn.Linear(cfg.n_hidden, vocab_size)

    def forward(self, idx, targets=None, return_logits: bool = True):
        x, _ = self.rnn(dropout(self.embed(idx), self.dropout, self.training))
        x = dropout(x, self.dropout, self.training)
        if targets is None:
            return self.head(x), None
        return self.loss(self.head, x, targets, return_logits)

    def decode(self, idx: torch.Tensor, state=None, lengths: list[int] | None = None):
        """Decoding: the logits of each row's next token after `idx`, and the state after it.
        `lengths`: rows of these lengths, right-padded (packed, so each row's state is that after
        its own last token)."""
        x = self.embed(idx)
        if lengths is None:
            x, state = self.rnn(x, state)
            return self.head(x[:, -1, :]), state
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed, state)
        last = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); the top layer's h
        return self.head(last[-1]), state


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
