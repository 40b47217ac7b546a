"""The language models: a GPT (decoder-only Transformer) and recurrent baselines (LSTM, GRU, RNN).

The GPT is built from params.yaml's options: GPT-2's block (learned positions, LayerNorm, GELU
MLP) or the later models' (rotary positions (RoPE), RMSNorm, a SwiGLU MLP; the default since it
won at equal time, docs/RECORDS.md), tied or untied embeddings, ReLU squared, QK-norm. Attention
goes only through `scaled_dot_product_attention` (on CUDA flash or cuDNN's kernel, train.attention;
on CPU the fused flash kernel).

All share one interface:
    logits, loss = model(idx, targets)      # loss: mean cross-entropy (None without targets)
    None, loss = model(idx, targets, return_logits=False)  # the loss only (what training asks for)
    logits, state = model.decode(idx, state) # generation: logits of the last position, new state
where `state` is the key/value cache of a GPT or the hidden state of a recurrent model. Weights
on disk: pipeline.model.weights.
"""

from __future__ import annotations

import math

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

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: tuple | None = None, use_cache: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:  # the angles of these T positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # Decoding: the new positions see everything cached before them.
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        past = k.size(2) - T
        # Fused attention (flash on CUDA, and on CPU when no mask is passed). A causal mask is
        # only needed among the new positions; with a cache of `past` keys and several new
        # queries, build the offset mask explicitly.
        if past == 0:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0.0
            )
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v) if use_cache else None


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

    def forward(self, x, rope=None, cache=None, use_cache=False):
        a, cache = self.attn(self.ln1(x), rope, cache, use_cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class GPT(nn.Module):
    bounded_context = True  # at most block_size tokens of context (learned positions; the RoPE tables)
    chunked_loss: bool | None = None  # the loss-only output layer in chunks; None: on CPU only (output_layer)

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

    def _run(self, idx, caches=None, use_cache=False):
        past = caches[0][0].size(2) if caches else 0
        T = idx.size(1)
        if past + T > self.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(past, past + T, device=idx.device))
        else:
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])
        x = self.drop(x)
        new = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, rope, caches[i] if caches else None, use_cache)
            new.append(c)
        return self.ln_f(x), new

    def forward(self, idx, targets=None, return_logits: bool = True):
        x, _ = self._run(idx)
        return output_layer(self.lm_head, x, targets, return_logits, self.chunked_loss)

    @torch.inference_mode()
    def decode(self, idx, state=None):
        """Logits for the next token after `idx`, given the key/value cache `state`.

        The cache holds at most block_size positions; the caller re-encodes a shorter context
        when it is full (see pipeline.decoding.decode).
        """
        x, caches = self._run(idx, state, use_cache=True)
        return self.lm_head(x[:, -1, :]), caches

    @staticmethod
    def state_length(state) -> int:
        return 0 if state is None else state[0][0].size(2)

    @staticmethod
    def reorder_state(state, rows: torch.Tensor):
        """Select (and repeat) batch rows of the cache: beam search follows its parents."""
        return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state]


class RecurrentLM(nn.Module):
    """The classic recurrent language model: embedding, LSTM (or GRU, or tanh RNN) layers, linear."""

    bounded_context = False  # the state carries any length of context
    chunked_loss: bool | None = None  # as GPT's

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
        return output_layer(self.head, self.drop(x), targets, return_logits, self.chunked_loss)

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


def output_layer(head: nn.Linear, x: torch.Tensor, targets, return_logits: bool = True, chunked: bool | None = None):
    """(logits, mean cross-entropy against `targets`) from the last hidden states `x`.

    With return_logits=False (what training asks for) the logits are None. The loss is then the
    same either way (tests/test_model.py); how it is computed depends on the device:
    - CPU (chunked=None, or True): `LinearCrossEntropy`, a chunk of rows at a time, which never
      holds the logits of the whole batch and keeps the softmax in cache (faster on a CPU,
      benchmarks/train_throughput.py --loss both, docs/LOG.md);
    - CUDA (or chunked=False): the plain head and cross-entropy, which torch.compile fuses and
      which runs without a Python loop or a host synchronisation (benchmarks/gpu.sh).
    """
    if targets is None:
        return head(x), None
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
