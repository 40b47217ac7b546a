"""The optimisation of a training step: AdamW with its parameter groups, the learning-rate
schedule, one step over micro-batches, and the loss on fixed batches."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from pipeline.core import params as P


def make_optimizer(model: torch.nn.Module, t: P.Train, device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (and on embeddings only if train.decay_embeddings).

    train.optimizer: muon gives the GPT's hidden matrices (those of its blocks) to Muon at
    train.muon_lr, and the rest (embeddings, output layer, norms, biases) to AdamW at train.lr.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    hidden = set()
    if t.optimizer == "muon":
        hidden = {id(p) for name, p in model.named_parameters() if p.dim() == 2 and ".blocks." in f".{name}"}
    decay, no_decay, matrices = [], [], []
    for p in model.parameters():
        if id(p) in hidden:
            matrices.append(p)
            continue
        skip = p.dim() < 2 or (id(p) in embeddings and not t.decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    adamw = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **extra)
    if not matrices:
        return adamw
    muon = Muon(
        [{"params": matrices, "lr_ratio": t.muon_lr / t.lr}],
        lr=t.muon_lr,
        weight_decay=t.weight_decay,
        momentum=t.muon_momentum,
        adjust_lr_fn="original",
        ns_dtype=orthogonalization_dtype(device),
    )
    return Optimizers(adamw, muon)


def orthogonalization_dtype(device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iteration: bfloat16 on CUDA (as torch.optim.Muon), float32
    on a CPU. A CPU without native bfloat16 matmuls (AVX2 only: most laptops) runs a bfloat16
    matmul tens of times slower than float32, which made the iteration 74% of a training step there
    (docs/LOG.md); float32 on every CPU also keeps a CPU run's weights independent of whether its
    CPU has bfloat16 instructions."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def orthogonalize(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Keller Jordan's coefficients) in
    `dtype`: the same operations in the same order, so in bfloat16 it is torch's bit for bit."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the dtype of its orthogonalisation chosen (`ns_dtype`; torch's is
    always bfloat16). Its state and its checkpoints are torch's: a momentum buffer per matrix."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buf in zip(params, grads, buffers):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scaling by the matrix's shape."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else lr


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices beside AdamW for the rest): the
    interface train_step and the checkpoints use. A param group's `lr_ratio` scales the
    scheduled learning rate for it."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {type(o).__name__: o.state_dict() for o in self.optimizers}

    def load_state_dict(self, state: dict) -> None:
        for o in self.optimizers:
            o.load_state_dict(state[type(o).__name__])


def lr_at(step: int, t: P.Train, time_fraction: float = 0.0) -> float:
    """Linear warmup to lr, then cosine decay (or stable, then linear decay: wsd) to min_lr.

    Progress is the larger of step/max_steps and the fraction of time_budget_s used, so a
    time-limited run still decays fully.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = max((step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps), time_fraction)
    progress = min(progress, 1.0)
    if t.schedule == "wsd":
        stable = 1.0 - t.decay_fraction
        return t.lr if progress < stable else t.lr + (t.min_lr - t.lr) * (progress - stable) / t.decay_fraction
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def train_step(
    model, optimizer, micro_batches, lr: float, grad_clip: float, autocast, sync=lambda last: nullcontext()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over several micro-batches: the gradient of their mean loss.

    `sync(last)` is the context for each backward pass (DDP: no gradient all-reduce until the last).
    Returns the mean loss (this process) and the gradient norm before clipping, as 0-d float32
    tensors on the model's device: nothing here waits for the device (on CUDA the next batch is
    prepared while this step runs); the caller reads them when it logs (pipeline.train).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    total = None
    n = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        with sync(i == n - 1):
            with autocast:
                _, loss = model(x, y, return_logits=False)
            (loss / n).backward()
        loss = loss.detach().float()
        total = loss if total is None else total + loss
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same whole value on every process
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n, None if grad_norm is None else grad_norm.detach().float()


@torch.no_grad()
def estimate_loss(model, batches, autocast) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout); one read of the device at the end."""
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast:
            total = total + model(x, y)[1].float()
    model.train()
    return float(total) / len(batches)
