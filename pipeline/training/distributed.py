"""Several processes under torchrun: who this process is, agreeing on flags, and DDP or FSDP.

One process (plain `python -m pipeline.train`) is the world of size 1: every helper here is then
a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.core import params as P
from pipeline.core.common import PipelineError, cpu_threads, set_torch_threads
from pipeline.training.hardware import pick_device


@dataclass
class Processes:
    """This process's place among the processes of a run (torchrun's environment variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes outputs, curves and checkpoints."""
        return self.rank == 0


def init_distributed(t: P.Train) -> tuple[Processes, torch.device]:
    """Join the process group (NCCL on CUDA, Gloo on CPU) when there are several processes."""
    procs = Processes(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    device = pick_device(t.device, procs.local_rank)
    if procs.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # The cores of this machine are shared by its processes.
    set_torch_threads(t.threads if t.threads > 0 else max(1, cpu_threads() // procs.local_world))
    return procs, device


def shutdown(procs: Processes) -> None:
    if procs.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def any_rank(procs: Processes, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process (so that all processes stop together)."""
    if procs.world == 1:
        return tuple(bool(f) for f in flags)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    x = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in x.tolist())


def mean_over_ranks(procs: Processes, values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` (a tensor on this process's device) over the processes."""
    if procs.world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / procs.world


def gather_objects(procs: Processes, obj) -> list:
    """`obj` from every process, in rank order."""
    if procs.world == 1:
        return [obj]
    gathered = [None] * procs.world
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_model(model: torch.nn.Module, procs: Processes, t: P.Train, device):
    """DDP or FSDP under torchrun; returns (the module to call, sync(last) context for accumulation)."""
    if procs.world == 1:
        return model, lambda last: nullcontext()
    if t.strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise PipelineError("train.strategy: fsdp needs torch >= 2.6 (fully_shard)") from None
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)

        def sync(last):
            model.set_requires_gradient_sync(last)
            return nullcontext()

        return model, sync
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, lambda last: nullcontext() if last else ddp.no_sync()


def full_state(model, optimizer, procs: Processes, t: P.Train) -> tuple[dict, dict | None]:
    """The unwrapped model's state dict and the optimizer's (if given), whole (gathered under FSDP).

    Under FSDP every process must call this; the others get the same result.
    """
    if procs.world > 1 and t.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), None if optimizer is None else optimizer.state_dict()


def load_full_state(model, optimizer, weights: dict, opt_state: dict, procs: Processes, t: P.Train) -> None:
    if procs.world > 1 and t.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=weights,
            optim_state_dict=opt_state,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    model.load_state_dict(weights)
    optimizer.load_state_dict(opt_state)
