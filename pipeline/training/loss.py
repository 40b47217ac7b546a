"""The training loss's output layer: how the last hidden states become the mean cross-entropy.

The model's own loss (pipeline.model.model.cross_entropy) is the plain one: the head's logits, then
cross-entropy. Training puts `OutputLayer(train.fused_loss)` in its place (`model.loss`), which
computes the same loss, faster or in less memory where it can:
- fused="liger" (train.fused_loss, CUDA with the [gpu] extra, checked when training starts):
  Liger-Kernel's fused linear cross-entropy (`liger_cross_entropy`);
- on a CPU (chunked None, or True): `LinearCrossEntropy`, a chunk of rows at a time, which never
  holds the logits of the whole batch and keeps the softmax in cache (faster on a CPU,
  benchmarks/speed/train_throughput.py --loss both, docs/LOG.md);
- on CUDA (or chunked False): the plain head and cross-entropy, which torch.compile fuses and which
  runs without a Python loop or a host synchronisation (benchmarks/gpu/gpu.sh).
Only a loss without logits (return_logits=False, what a training step asks for) takes the first
two; the loss is the same either way (tests/training/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.model.model import IGNORE, cross_entropy


class OutputLayer:
    """`model.loss` while training: (logits or None, mean cross-entropy) from the last hidden states."""

    chunked: bool | None = None  # the loss-only path in chunks: True, False, None (on a CPU only)

    def __init__(self, fused: str = "none", chunked: bool | None = None):
        self.fused = fused
        if chunked is not None:
            self.chunked = chunked

    def __call__(self, head: nn.Linear, x: torch.Tensor, targets: torch.Tensor, return_logits: bool = True):
        return output_layer(head, x, targets, return_logits, self.chunked, self.fused)


def output_layer(head: nn.Linear, x: torch.Tensor, targets, return_logits=True, chunked=None, fused="none"):
    """(logits, mean cross-entropy against `targets`); with return_logits=False the logits are None
    and the loss goes through Liger (fused="liger") or LinearCrossEntropy (chunked; None: on a CPU)."""
    if not return_logits and fused == "liger":
        return None, liger_cross_entropy(head, x, targets)
    if chunked is None:
        chunked = not x.is_cuda
    if not return_logits and chunked:
        return None, LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), head.weight, head.bias, targets.reshape(-1))
    return cross_entropy(head, x, targets, return_logits)


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
