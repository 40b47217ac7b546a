"""The language models: a GPT (decoder-only Transformer) and recurrent baselines (LSTM, RNN).

All share one interface:
    logits, loss = model(idx, targets)      # training and scoring; loss is mean cross-entropy
    logits, state = model.decode(idx, state) # generation: logits of the last position, new state
where `state` is the key/value cache of a GPT or the hidden state of a recurrent model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.params import Model as ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: tuple | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # Decoding: the new positions see everything cached before them.
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        past = k.size(2) - T
        # Fused attention (flash on CUDA, and on CPU when no mask is passed). A causal mask is
        # only needed among the new positions; with a cache of `past` keys and several new
        # queries, build the offset mask explicitly.
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None):
        a, cache = self.attn(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class GPT(nn.Module):
    bounded_context = True  # learned positions: at most block_size tokens of context

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self.apply(self._init)
        # GPT-2: scale the residual projections by depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def _run(self, idx, caches=None):
        past = caches[0][0].size(2) if caches else 0
        T = idx.size(1)
        if past + T > self.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        new = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, caches[i] if caches else None)
            new.append(c)
        return self.ln_f(x), new

    def forward(self, idx, targets=None):
        x, _ = self._run(idx)
        return _logits_and_loss(self.lm_head, x, targets)

    @torch.inference_mode()
    def decode(self, idx, state=None):
        """Logits for the next token after `idx`, given the key/value cache `state`.

        The cache holds at most block_size positions; the caller re-encodes a shorter context
        when it is full (see pipeline.generate).
        """
        x, caches = self._run(idx, state)
        return self.lm_head(x[:, -1, :]), caches

    @staticmethod
    def state_length(state) -> int:
        return 0 if state is None else state[0][0].size(2)

    @staticmethod
    def reorder_state(state, rows: torch.Tensor):
        """Select (and repeat) batch rows of the cache: beam search follows its parents."""
        return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state]


class RecurrentLM(nn.Module):
    """The classic recurrent language model: embedding, LSTM (or tanh RNN) layers, linear."""

    bounded_context = False  # the state carries any length of context

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.block_size = cfg.block_size
        self.embed = nn.Embedding(vocab_size, cfg.n_embd)
        rnn = nn.LSTM if cfg.arch == "lstm" else nn.RNN
        self.rnn = rnn(cfg.n_embd, cfg.n_hidden, num_layers=cfg.n_layer, batch_first=True,
                       dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.n_hidden, vocab_size)

    def forward(self, idx, targets=None):
        x, _ = self.rnn(self.drop(self.embed(idx)))
        return _logits_and_loss(self.head, self.drop(x), targets)

    @torch.inference_mode()
    def decode(self, idx, state=None):
        x, state = self.rnn(self.embed(idx), state)
        return self.head(x[:, -1, :]), state

    @staticmethod
    def state_length(state) -> int:
        return 0  # a recurrent state has no length limit

    @staticmethod
    def reorder_state(state, rows: torch.Tensor):
        if isinstance(state, tuple):  # LSTM: (h, c), batch in dimension 1
            return tuple(s.index_select(1, rows) for s in state)
        return state.index_select(1, rows)


def _logits_and_loss(head: nn.Module, x: torch.Tensor, targets):
    if targets is None:
        return head(x), None
    logits = head(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    return logits, loss


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    return GPT(cfg, vocab_size) if cfg.arch == "gpt" else RecurrentLM(cfg, vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
