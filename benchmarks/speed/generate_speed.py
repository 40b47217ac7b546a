"""Decoding speed side by side, in one run: this project's decoding, the decoding it replaced, and
Hugging Face transformers' `generate()` on the same weights.

    python benchmarks/speed/generate_speed.py [--checkpoint data/model/best.safetensors] [--prompts 64]
        [--new-tokens 64] [--repeats 3] [--threads 2] [--device cpu] [--old-rev a31a7a5] [--compile]

- Prompts: the translation prompts of the first --prompts pairs of the first pair source in
  data/clean/test.jsonl (en->ru by default): mixed lengths, as evaluate decodes them.
- Greedy, up to --new-tokens new tokens; eos ends a row (--no-eos: no row ends before, as with a
  model that never writes its end token, for every implementation). "batch 1": the first 8 prompts one at a
  time; "batch N": all N prompts in one call (one batch).
- This project: pipeline.decoding.decode.generate. The old decoding: the code at --old-rev (by
  default a31a7a5, before issue 24: only prompts of equal length shared a batch, the cache grew by
  torch.cat; 0404d2e: before the cache moved to pipeline.decoding.cache), taken from git and run in
  a process of its own over the same checkpoint and prompts, beside this checkout's code run the
  same way ("own process": the like-for-like ratio). transformers: the checkpoint
  exported by `python -m pipeline.export --format hf`, `generate()` with left padding and an
  attention mask (what its documentation prescribes for batches).
- tokens/s: new tokens written (eos excluded) per second of decoding, the median of --repeats,
  the implementations interleaved so each sees the same machine. Identical outputs are counted
  against this project's batch-1 output (each prompt alone); each difference is explained by the
  margin between the two best logits where the outputs part (a tie, or float order, when tiny).

On a GPU: `--device cuda --compile` also times the step compiled for CUDA graphs (its compile
time printed apart). Record the figures in docs/LOG.md (date, machine, command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.common import read_jsonl  # noqa: E402
from pipeline.core.paths import BEST_WEIGHTS, CLEAN_DIR, TOKENIZER  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.evaluation.translation import pairs_by_source, translation_prompts  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402

SINGLE = 8  # prompts decoded one at a time for "batch 1"

# The old decoding, run by a subprocess with the old code first on its path; it prints JSON. With
# --old-rev, this project's code is run the same way too ("this project, own process"), so that the
# two compare like for like.
OLD = """
import json, sys, time
import torch
try:  # the layout since the restructuring
    from pipeline.model.weights import load_model
    from pipeline.decoding.decode import Decoding, generate
except ImportError:  # before it
    from pipeline.checkpoint import load_model
    from pipeline.generate import Decoding, generate
checkpoint, threads, device, new_tokens, eos = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
prompts = json.load(sys.stdin)
model = load_model(checkpoint, device=device)
d = Decoding(new_tokens)
def run(batch):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [generate(model, [p], eos, d, device=device)[0] for p in prompts[:8]] if batch == 1 else generate(
        model, prompts, eos, d, batch_size=len(prompts), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0
run(1), run(len(prompts))  # warm-up: the same shapes as timed
out1, t1 = run(1)
outn, tn = run(len(prompts))
print(json.dumps({"batch_1": [out1, t1], "batch_n": [outn, tn]}))
"""


def new_tokens(rows: list[list[int]]) -> int:
    return sum(len(r) for r in rows)


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def ours(model, prompts, eos, n, device, compile=False):
    d = Decoding(n)
    one = lambda: [generate(model, [p], eos, d, 1, device, compile=compile)[0] for p in prompts[:SINGLE]]  # noqa: E731
    many = lambda: generate(model, prompts, eos, d, len(prompts), device, compile=compile)  # noqa: E731
    return timed(one, device), timed(many, device)


def hf_model(checkpoint: Path, folder: Path, device: str):
    subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--format", "hf", str(folder), "--weights", str(checkpoint)]
        + ["--tokenizer", str(TOKENIZER.resolve())],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], eos: int, n: int, device: str) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), max(eos, 0), dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as transformers prescribes for decoder-only batches
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    model.generation_config.eos_token_id = eos if eos >= 0 else None  # (-1: no end token, --no-eos)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=n,
        do_sample=False,
        num_beams=1,
        pad_token_id=max(eos, 0),
    )[:, width:].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in out]


def hf(model, prompts, eos, n, device):
    one = lambda: [hf_generate(model, [p], eos, n, device)[0] for p in prompts[:SINGLE]]  # noqa: E731
    many = lambda: hf_generate(model, prompts, eos, n, device)  # noqa: E731
    return timed(one, device), timed(many, device)


def old(rev: str, checkpoint: Path, prompts, eos, n, device, threads, folder: Path):
    """Decode in a process of its own with the code of commit `rev` ('': this checkout's)."""
    if not rev:
        folder = ROOT
    elif not (folder / "pipeline").is_dir():
        archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    proc = subprocess.run(
        [sys.executable, "-c", OLD, str(checkpoint), str(threads), device, str(n), str(eos)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        check=True,
    )
    result = json.loads(proc.stdout)
    return tuple(tuple(result[k]) for k in ("batch_1", "batch_n"))


def explain(model, prompt: list[int], a: list[int], b: list[int], device: str) -> str:
    """Where two outputs part: the margin between the model's two best next tokens there."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    context = torch.tensor([(prompt + a[:k])[-model.block_size :]], device=device)
    with torch.inference_mode():
        top = model(context)[0][0, -1].float().topk(2).values
    return f"token {k}: margin {float(top[0] - top[1]):.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=BEST_WEIGHTS)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--old-rev", default="a31a7a5", help="the commit whose decoding is the old one ('' to skip)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument(
        "--no-eos",
        action="store_true",
        help="as a model that never writes its end token: every row decodes --new-tokens",
    )
    ap.add_argument("--compile", action="store_true", help="also this project with its step compiled (CUDA graphs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer(TOKENIZER)
    model = load_model(args.checkpoint, tok, TOKENIZER, device=args.device)
    pairs = next(iter(pairs_by_source(read_jsonl(CLEAN_DIR / "test.jsonl")).values()))[: args.prompts]
    prompts = translation_prompts(model, tok, pairs, args.new_tokens)
    eos = -1 if args.no_eos else tok.eos_id  # -1: a token no model writes
    print(
        f"{len(prompts)} prompts of {min(map(len, prompts))} to {max(map(len, prompts))} tokens, up to "
        f"{args.new_tokens} new tokens{' (no end token)' if args.no_eos else ''}, greedy, {args.device}, "
        f"{torch.get_num_threads()} threads, "
        f"median of {args.repeats}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"this project": lambda: ours(model, prompts, eos, args.new_tokens, args.device)}
        if args.compile:  # compiled once per shape, in the warm-up below
            runners["compiled"] = lambda: ours(model, prompts, eos, args.new_tokens, args.device, compile=True)
        if args.old_rev:
            for name, rev in (("old decoding", args.old_rev), ("own process", "")):
                runners[name] = lambda rev=rev: old(
                    rev, args.checkpoint.resolve(), prompts, eos, args.new_tokens, args.device, args.threads, Path(tmp)
                )
        if not args.no_hf:
            hf_lm = hf_model(args.checkpoint.resolve(), Path(tmp) / "hf", args.device)
            runners["transformers"] = lambda: hf(hf_lm, prompts, eos, args.new_tokens, args.device)
        ours(model, prompts[:2], eos, 4, args.device)  # warm-up
        if args.compile:  # the shapes timed below: batch 1 and batch N, at this width
            t0 = time.perf_counter()
            ours(model, prompts, eos, args.new_tokens, args.device, compile=True)
            print(f"  compiling the step: {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_hf:
            hf(hf_lm, prompts[:2], eos, 4, args.device)
        runs = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                runs[name].append(run())
    reference = [generate(model, [p], eos, Decoding(args.new_tokens), device=args.device)[0] for p in prompts]
    rates = {}
    for name, results in runs.items():
        for i, label in enumerate(("batch 1", f"batch {len(prompts)}")):
            outs, secs = results[0][i][0], statistics.median(r[i][1] for r in results)
            rate = new_tokens(outs) / secs
            rates[(name, label)] = rate
            ref = reference[: len(outs)]
            same = sum(a == b for a, b in zip(outs, ref))
            print(f"  {name:>13}, {label:>8}: {rate:8,.0f} new tokens/s ({secs:.2f} s), identical {same}/{len(outs)}")
            for j, (a, b) in enumerate(zip(outs, ref)):
                if a != b:
                    print(f"      prompt {j} differs at {explain(model, prompts[j], a, b, args.device)}")
    pairs = [("this project", "transformers"), ("this project", "compiled"), ("own process", "old decoding")]
    for ours_, other in pairs:
        if (other, "batch 1") in rates:
            labels = ("batch 1", f"batch {len(prompts)}")
            ratios = [rates[(ours_, label)] / rates[(other, label)] for label in labels]
            print(f"  {ours_} / {other}: {ratios[0]:.2f}x at batch 1, {ratios[1]:.2f}x at batch {len(prompts)}")


if __name__ == "__main__":
    main()
