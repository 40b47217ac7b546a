"""The device a run uses and how fast it could go: device choice, CUDA autocast, and the peak
FLOP/s that MFU (model FLOPs utilisation) is measured against."""

from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np
import torch

from pipeline.core.common import PipelineError, first_line

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "L4": 121e12,
}


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """train.device: cpu, cuda, or auto (cuda if present); under torchrun, this process's GPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if choice == "cuda" else torch.device("cpu")


GPU_EXTRA = 'pip install -e ".[gpu]"'  # the optional extra that brings the CUDA kernels (Liger-Kernel)


def check_fused_loss(choice: str, device: torch.device) -> None:
    """train.fused_loss: liger runs Liger-Kernel's Triton kernels, so it needs CUDA and the [gpu]
    extra. Either missing is an error at the start of training, never a silent fallback to the
    plain loss (which would change the numbers without saying so)."""
    if choice == "none":
        return
    if device.type != "cuda":
        raise PipelineError(
            f"train.fused_loss: {choice} runs the [gpu] extra's CUDA kernels, but this run is on "
            f"{device.type}; set train.fused_loss: none"
        )
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError as e:
        raise PipelineError(
            f"train.fused_loss: {choice} needs Liger-Kernel, the [gpu] extra, which cannot be imported "
            f"({first_line(e)}); {GPU_EXTRA}, or set train.fused_loss: none"
        ) from None


class CudaAutocast:
    """bf16 autocast, with attention held to a fused kernel (an error, never a silent fallback):
    flash (FlashAttention-2 in PyTorch) or cudnn (cuDNN's fused attention).

    Reusable: `with autocast:` around every forward pass.
    """

    def __init__(self, attention: str = "flash"):
        self.attention = attention

    def __enter__(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[self.attention]
        self._stack = ExitStack()
        self._stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        self._stack.enter_context(sdpa_kernel(backend))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 matrix-product throughput of this CPU (FLOP/s, median of `repeats`).

    2048 is large enough to reach the plateau on a laptop-class CPU (1024 reaches about half).
    Its random matrices come from a generator of their own: measuring leaves torch's global
    random state (dropout, a resumed run's saved state) untouched.
    """
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.median(times))


def peak_flops(device: torch.device) -> float | None:
    """What MFU is measured against: the GPU's bf16 dense peak, or this CPU's float32 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
    return cpu_matmul_flops()


def cpu_bfloat16_slowdown(rows: int = 128, cols: int = 512, repeats: int = 20) -> float:
    """How many times longer a bfloat16 matmul takes than float32 on this CPU, at the shape of
    Muon's Newton-Schulz step for a 128x512 matrix (median of `repeats`). About 0.5 where the CPU
    multiplies bfloat16 natively (AVX512-BF16, AMX); tens where it does not (AVX2 only: most
    laptops). The pipeline runs float32 on every CPU (pipeline.training.optim.orthogonalization_dtype,
    and inference loads weights as float32); benchmarks/speed/train_throughput.py prints this figure and
    warns where bfloat16 would be slow."""
    generator = torch.Generator().manual_seed(0)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, cols, generator=generator).to(dtype)
        gram = x @ x.T
        torch.addmm(x, gram, x, beta=2.0)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.addmm(x, gram, x, beta=2.0)
            samples.append(time.perf_counter() - t0)
        times[dtype] = float(np.median(samples))
    return times[torch.bfloat16] / times[torch.float32]
