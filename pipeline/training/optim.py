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
    muon = torch.optim.Muon(
        [{"params": matrices, "lr_ratio": t.muon_lr / t.lr}],
        lr=t.muon_lr,
        weight_decay=t.weight_decay,
        momentum=t.muon_momentum,
        adjust_lr_fn="original",
    )
    return Optimizers(adamw, muon)


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
