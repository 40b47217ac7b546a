"""Training speed against the hardware limit (MFU). (Architectures compared at equal time:
benchmarks/speedrun.py, the one entry point for equal-time races.)

    python benchmarks/speed/train_throughput.py                  # MFU of params.yaml's model, eager and compiled
    python benchmarks/speed/train_throughput.py --n-layer 12 --n-embd 768 --n-head 12 --block-size 1024 \\
        --vocab 50304 --batch-size 16 --steps 300          # GPT-2 small (benchmarks/gpu/gpu.sh, on CUDA)

MFU = model FLOPs per token (6 per multiplying parameter plus attention, pipeline.model.model.
flops_per_token) x tokens per second / peak. On CPU the peak is this machine's float32 matrix
product throughput, measured in the same run: rounds alternate a timed matmul and timed training
steps, MFU is computed per round (both sides see the same machine state) and the median is
reported. On CUDA the peak is the GPU's bf16 dense peak (pipeline.training.hardware.GPU_BF16_PEAK), with
bf16 autocast and TF32.

Training steps are the train stage's own (`train_step`: forward, backward, clipping, the
optimizer of params.yaml) on random token windows; throughput does not depend on the tokens. On a
CPU each round also times a plain PyTorch loop of the same model and batch (forward, backward,
torch.optim.AdamW, nothing else) as the reference the stage's steps are compared with, and the
optimizer's share of each step is printed. `--ns-dtype both` times Muon's orthogonalisation in
float32 (what a CPU runs) and in bfloat16 (torch.optim.Muon's), side by side. The run starts by
measuring a bfloat16 matmul against float32 on this CPU and warns where bfloat16 is slow.

--stage SECONDS runs the train stage itself (`python -m pipeline.train`, params.yaml's model and
optimizer, train.time_budget_s SECONDS) in a scratch copy that links data/tokens, between two
measurements of the plain PyTorch loop, and prints the stage's tokens/s (metrics/timing/train.json:
training time, evaluations left out) against the loop's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # scratch_train

from pipeline.core import params as P  # noqa: E402
from pipeline.model.model import build_model, count_parameters, flops_per_token  # noqa: E402
from pipeline.training.hardware import (  # noqa: E402
    CudaAutocast,
    check_fused_loss,
    cpu_bfloat16_slowdown,
    cpu_matmul_flops,
    peak_flops,
)
from pipeline.training.loss import OutputLayer  # noqa: E402
from pipeline.training.optim import make_optimizer, train_step  # noqa: E402

# Equal-time comparison: overlays on params.yaml (the recurrent ones are params/lstm.yaml's).
GPT2_BLOCK = {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": False}  # nanoGPT's


def measure(args) -> None:
    base = P.load(ROOT / "params.yaml")
    overrides = {
        k: v
        for k, v in (
            ("n_layer", args.n_layer),
            ("n_embd", args.n_embd),
            ("n_head", args.n_head),
            ("block_size", args.block_size),
        )
        if v
    }
    m = dataclasses.replace(base.model, **overrides, **(GPT2_BLOCK if args.gpt2_block else {}))
    t = dataclasses.replace(base.train, optimizer=args.optimizer or base.train.optimizer)
    vocab = args.vocab or _vocab(base)
    cuda = torch.cuda.is_available() and not args.cpu
    batch_sizes = args.batch_size or [base.train.batch_size]
    compiles = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    losses = {"auto": [None], "chunked": [True], "plain": [False], "both": [True, False], "liger": ["liger"]}[args.loss]
    variants = [(c, chunked) for c in compiles for chunked in losses]
    print(
        f"device: {torch.cuda.get_device_name() if cuda else f'cpu, {torch.get_num_threads()} threads'}; "
        f"torch {torch.__version__}"
    )
    print(
        f"model: {m.arch} {m.n_layer}x{m.n_embd}, {m.n_head} heads, context {m.block_size}, vocabulary "
        f"{vocab}, {m.positions} positions, {m.norm}, {m.mlp}; optimizer {t.optimizer}"
    )
    reference = build_model(m, vocab)
    fpt, n_params = flops_per_token(reference, m.block_size), count_parameters(reference)
    print(f"parameters: {n_params:,}; model FLOPs per token: {fpt / 1e6:.2f} M (6N + 12*L*d*T)")
    if cuda:
        measure_cuda(args, m, t, vocab, batch_sizes, variants, fpt)
    else:
        for B in batch_sizes:
            measure_cpu(args, m, dataclasses.replace(t, batch_size=B), vocab, variants, fpt)


def variant_name(compiled: bool, chunked: bool | str | None) -> str:
    loss = {None: "", True: " chunked loss", False: " plain loss", "liger": " liger fused loss"}[chunked]
    return ("compiled" if compiled else "eager") + loss


def build_variant(m, t, vocab, device, compiled: bool, chunked: bool | str | None, compile_mode: str | None = None):
    """`chunked`: the loss-only output layer: chunked (True), plain (False), the device's (None), or
    "liger" (train.fused_loss: liger, Liger-Kernel's fused linear cross-entropy, CUDA and the [gpu] extra)."""
    torch.manual_seed(0)
    model = build_model(m, vocab).to(device)
    if chunked == "liger":
        check_fused_loss("liger", device)  # an error without CUDA or Liger-Kernel, never the plain loss instead
        model.loss = OutputLayer("liger")
    else:
        model.loss = OutputLayer("none", chunked)
    opt = make_optimizer(model, t, device)
    fwd = torch.compile(model, dynamic=False, mode=compile_mode) if compiled else model
    return fwd, opt


class TimedOptimizer:
    """An optimizer whose step() is timed: the optimizer's share of a training step."""

    def __init__(self, optimizer):
        self.optimizer, self.seconds = optimizer, 0.0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self) -> None:
        t0 = time.perf_counter()
        self.optimizer.step()
        self.seconds += time.perf_counter() - t0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def plain_loop(m, vocab):
    """The reference: a plain PyTorch loop of the same model, forward, backward, AdamW, nothing else."""
    torch.manual_seed(0)
    model = build_model(m, vocab)
    opt = TimedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(x, y):
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def cpu_variants(args, m, t, vocab, variants) -> dict:
    """name -> (one training step on (x, y), its timed optimizer): the stage's train_step for each
    variant (and each orthogonalisation dtype of --ns-dtype), then the plain loop."""
    device, autocast = torch.device("cpu"), nullcontext()
    dtypes = {"float32": [torch.float32], "bfloat16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}
    runs = {}
    for compiled, chunked in variants:
        for dtype in dtypes[args.ns_dtype] if t.optimizer == "muon" else [None]:
            fwd, opt = build_variant(m, t, vocab, device, compiled, chunked)
            name = variant_name(compiled, chunked)
            if dtype is not None:
                opt.optimizers[1].ns_dtype = dtype
                name += f" muon {str(dtype).removeprefix('torch.')}"
            timed = TimedOptimizer(opt)
            runs[name] = (
                lambda x, y, fwd=fwd, timed=timed: train_step(fwd, timed, [(x, y)], 1e-4, t.grad_clip, autocast)[0],
                timed,
            )
    runs["plain PyTorch loop, AdamW"] = plain_loop(m, vocab)
    return runs


def measure_cpu(args, m, t, vocab, variants, fpt) -> None:
    """Rounds alternate a timed float32 matmul and timed steps of each variant: MFU per round
    (both sides see the same machine state), medians reported."""
    B, T = t.batch_size, m.block_size
    print(f"batch {B}x{T} tokens")
    slowdown = cpu_bfloat16_slowdown()
    print(f"bfloat16 matmul on this CPU: {slowdown:.2f}x the time of float32 (Muon's 128x512 step)")
    if slowdown > 1.5:
        print(
            "warning: bfloat16 is slow on this CPU (no native bfloat16 matmuls); the pipeline runs float32 "
            "on a CPU, and --ns-dtype bfloat16 shows what torch.optim.Muon's bfloat16 iteration costs here"
        )
    runs = cpu_variants(args, m, t, vocab, variants)
    x, y = torch.randint(vocab, (B, T)), torch.randint(vocab, (B, T))
    for name, (step, _) in runs.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # includes compilation
            float(step(x, y))
        print(f"{name}: {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {v: [] for v in runs}
    peaks = []
    steps_per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        peak = cpu_matmul_flops(args.matmul, 5)
        peaks.append(peak)
        for v, (step, timed) in runs.items():
            times, timed.seconds = [], 0.0
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                float(step(x, y))
                times.append(time.perf_counter() - t0)
            tok_s = B * T / statistics.median(times)
            results[v].append((tok_s, fpt * tok_s / peak, timed.seconds / sum(times)))
        line = ", ".join(f"{v} {results[v][-1][0]:,.0f} tok/s MFU {results[v][-1][1]:.1%}" for v in runs)
        print(f"round {r + 1}: matmul {peak / 1e9:,.0f} GFLOP/s; {line}", flush=True)
    print(
        f"float32 matmul ({args.matmul}x{args.matmul}): median {statistics.median(peaks) / 1e9:,.0f} "
        f"GFLOP/s, best {max(peaks) / 1e9:,.0f}"
    )
    plain = results["plain PyTorch loop, AdamW"]
    for v in runs:
        tok = statistics.median(x[0] for x in results[v])
        mfu = statistics.median(x[1] for x in results[v])
        share = statistics.median(x[2] for x in results[v])
        ratios = [b[0] / a[0] for a, b in zip(results[v], plain)]
        print(
            f"RESULT {v} batch {B}: {tok:,.0f} tokens/s, {fpt * tok / 1e9:,.1f} GFLOP/s, MFU {mfu:.1%}, "
            f"optimizer {share:.0%} of the step; the plain loop is {statistics.median(ratios):.2f}x as fast "
            f"(medians of {args.rounds} rounds, ratios per round)"
        )


def bf16_matmul_flops(size: int = 8192, repeats: int = 10) -> float:
    """This GPU's bf16 matrix-product rate on random data (FLOP/s, mean of `repeats` after warm-up)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3)


def measure_cuda(args, m, t, vocab, batch_sizes, variants, fpt) -> None:
    """Each (micro-batch, variant): warm-up steps (compilation included), then `steps` steps
    timed as the train stage runs them: no host synchronisation until the last has finished."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = CudaAutocast(args.attention)
    print(f"attention: {args.attention} (torch.nn.attention.sdpa_kernel; no other kernel allowed)")
    sheet = peak_flops(device)
    if sheet is None:
        print(f"warning: no bf16 peak known for {torch.cuda.get_device_name()}; the data sheet's is an H100's")
        sheet = 989e12
    measured = [bf16_matmul_flops()]
    print(
        f"peak: {sheet / 1e12:.0f} TFLOP/s (bf16 dense, data sheet); measured bf16 matmul {measured[0] / 1e12:.0f} TFLOP/s"
    )
    rows = []
    T = m.block_size
    for B in batch_sizes:
        for compiled, chunked in variants:
            name = variant_name(compiled, chunked)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fwd, opt = build_variant(m, t, vocab, device, compiled, chunked, args.compile_mode)
            x = torch.randint(vocab, (B, T), device=device)
            y = torch.randint(vocab, (B, T), device=device)
            t0 = time.perf_counter()
            try:
                for _ in range(args.warmup):
                    train_step(fwd, opt, [(x, y)], 1e-4, t.grad_clip, autocast)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    loss, _ = train_step(fwd, opt, [(x, y)], 1e-4, t.grad_clip, autocast)
                float(loss)  # the one wait, after the last step
                dt = time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                print(f"RESULT {name} batch {B}: out of memory", flush=True)
                del fwd, opt
                continue
            tok_s = args.steps * B * T / dt
            memory = torch.cuda.max_memory_allocated() / 2**30
            rows.append((name, B, tok_s, memory))
            print(
                f"{name} batch {B}: warm-up {warm:.1f} s; {tok_s:,.0f} tokens/s; peak memory {memory:.1f} GiB",
                flush=True,
            )
            del fwd, opt, x, y
    measured.append(bf16_matmul_flops())
    rate = max(measured)
    print(
        f"measured bf16 matmul (8192^3, random data): {', '.join(f'{r / 1e12:.0f}' for r in measured)} "
        f"TFLOP/s (before, after); MFU below against the higher"
    )
    for name, B, tok_s, memory in rows:
        print(
            f"RESULT {name} batch {B}: {tok_s:,.0f} tokens/s, MFU {fpt * tok_s / sheet:.1%} of the data "
            f"sheet's {sheet / 1e12:.0f} TFLOP/s, {fpt * tok_s / rate:.1%} of the measured {rate / 1e12:.0f}; "
            f"peak memory {memory:.1f} GiB ({args.steps} steps, one synchronisation)"
        )
        # for benchmarks/gpu/gpu.sh's table of every variant against the highest rate measured in its run
        row = {"variant": f"{name}{' cudnn attention' if args.attention == 'cudnn' else ''}", "batch": B}
        row |= {"tokens_per_second": tok_s, "flops_per_token": fpt, "sheet": sheet, "measured": measured}
        print("RESULT_JSON " + json.dumps(row), flush=True)


def _vocab(base: P.Params) -> int:
    sidecar = ROOT / "data" / "tokens" / "train.json"
    return json.loads(sidecar.read_text())["vocab_size"] if sidecar.exists() else base.tokenize.vocab_size


def stage_beside_plain(seconds: float, rounds: int = 10, steps: int = 10) -> None:
    """The train stage's tokens/s for `seconds` of training, beside the plain loop's measured
    just before and just after it (median of the rounds' medians)."""
    from scratch_train import train_in_scratch

    if not (ROOT / "data" / "tokens" / "train.bin").exists():
        sys.exit("error: data/tokens/train.bin missing; run `dvc repro tokenize` first")
    base = P.load(ROOT / "params.yaml")
    m, t, vocab = base.model, base.train, _vocab(base)
    step, _ = plain_loop(m, vocab)
    x, y = torch.randint(vocab, (t.batch_size, m.block_size)), torch.randint(vocab, (t.batch_size, m.block_size))

    def plain() -> list[float]:
        rates = []
        for _ in range(rounds):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                float(step(x, y))
                times.append(time.perf_counter() - t0)
            rates.append(t.batch_size * m.block_size / statistics.median(times))
        return rates

    plain()  # warm-up
    before = plain()
    data = P.merge(
        P.read_yaml(ROOT / "params.yaml"),
        {"train": {"max_steps": 10**9, "time_budget_s": seconds}, "train_run": {"checkpoint_interval": 0}},
    )
    _, metrics, wall = train_in_scratch(data, "stage")
    after = plain()
    loop = statistics.median(before + after)
    stage = metrics["tokens_per_second"]
    print(
        f"RESULT train stage ({t.optimizer}, {seconds:g} s budget, {metrics['steps']} steps, wall {wall:.0f} s): "
        f"{stage:,.0f} tokens/s; plain PyTorch loop, AdamW: {loop:,.0f} tokens/s (median of {2 * rounds} rounds, "
        f"before {statistics.median(before):,.0f}, after {statistics.median(after):,.0f}); "
        f"the loop is {loop / stage:.2f}x as fast"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25, help="timed training steps in all (per variant)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=2048, help="size of the square float32 matmul (CPU peak)")
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument(
        "--loss",
        choices=["auto", "chunked", "plain", "both", "liger"],
        default="auto",
        help="the loss-only output layer: chunked (LinearCrossEntropy), plain, the device's default, or liger "
        "(Liger-Kernel's fused linear cross-entropy, train.fused_loss: liger; CUDA, pip install -e '.[gpu]')",
    )
    ap.add_argument("--attention", choices=["flash", "cudnn"], default="flash", help="CUDA's fused attention kernel")
    ap.add_argument("--gpt2-block", action="store_true", help="GPT-2's block (learned positions, LayerNorm, GELU)")
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default=None, help="override params.yaml")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    ap.add_argument(
        "--ns-dtype",
        choices=["float32", "bfloat16", "both"],
        default="float32",
        help="CPU, optimizer muon: the dtype of Muon's orthogonalisation to time (float32: the pipeline's on a CPU)",
    )
    for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=0, help="override params.yaml")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[], help="micro-batches to measure (params.yaml's)")
    ap.add_argument(
        "--stage",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also run the train stage for SECONDS beside the plain PyTorch loop (tokens/s of each)",
    )
    ap.add_argument("--skip-mfu", action="store_true")
    args = ap.parse_args()
    if not args.skip_mfu:
        measure(args)
    if args.stage:
        stage_beside_plain(args.stage)


if __name__ == "__main__":
    from pipeline.core.common import PipelineError

    try:
        main()
    except PipelineError as e:  # train.fused_loss: liger where it cannot run, say: one line
        sys.exit(f"error: {e}")
