"""Generation speed: the key/value cache against recomputing the whole context every step.

    python benchmarks/speed/cache_speed.py [--checkpoint data/model/best.safetensors] [--repeats 3]

Greedy decoding of 256 new tokens after a 64-token prompt (batch 1), on the CPU in float32:
1. with the cache (pipeline.decoding.decode.stream: prefill once, then one token per step);
2. without it: the whole sequence so far goes through the model at every step.
Both must produce the same tokens. The model is the default GPT architecture (or the
checkpoint's), with a context of at least 320 tokens so no window has to slide: weights come from
the checkpoint where they fit, the position rows past its context are freshly initialised.
Prints the median time of each and their ratio; record it in docs/LOG.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.core import params as P  # noqa: E402
from pipeline.decoding.decode import Decoding, stream  # noqa: E402
from pipeline.model.model import build_model  # noqa: E402
from pipeline.model.weights import load_weights  # noqa: E402

PROMPT, NEW = 64, 256


def make_model(checkpoint: Path) -> torch.nn.Module:
    if checkpoint.is_file():
        trained, info = load_weights(checkpoint)
        cfg, vocab = trained.cfg, info["vocab_size"]
        state = trained.state_dict()
        print(f"model: {checkpoint} ({cfg.arch}, {cfg.n_layer} layers x {cfg.n_embd}, vocabulary {vocab})")
    else:
        cfg, vocab, state = P.load().model, 4096, None
        print(f"model: params.yaml model group, randomly initialised (no {checkpoint})")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, block_size=max(cfg.block_size, PROMPT + NEW)), vocab)
    if state is not None:
        own = model.state_dict()
        for k, v in state.items():
            own[k][: v.size(0)] = v  # position table: the trained rows, then fresh ones
        model.load_state_dict(own)
    return model.eval()


@torch.inference_mode()
def without_cache(model, idx: torch.Tensor) -> list[int]:
    out = idx
    for _ in range(NEW):
        logits, _ = model(out)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[0, idx.size(1) :].tolist()


@torch.inference_mode()
def with_cache(model, idx: torch.Tensor) -> list[int]:
    # eos_id -1: never stops early, so both generate exactly NEW tokens
    return [int(t) for t in stream(model, idx, -1, Decoding(max_new_tokens=NEW))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="data/model/best.safetensors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(Path(args.checkpoint))
    if Path("data/tokens/val.json").is_file():  # a real prompt: the first tokens of the val split
        from pipeline.data.tokenizer import load_tokens

        idx = torch.from_numpy(load_tokens("val")[:PROMPT].astype("int64"))[None]
    else:
        idx = torch.randint(3, model.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = {"cache": [], "no_cache": []}
    outputs = {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, fn in (("cache", with_cache), ("no_cache", without_cache)):
            t0 = time.perf_counter()
            outputs[name] = fn(model, idx)
            times[name].append(time.perf_counter() - t0)
    same = outputs["cache"] == outputs["no_cache"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{NEW} new tokens after a {PROMPT}-token prompt, batch 1, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}:"
    )
    print(f"  with cache:    {med['cache']:.2f} s ({NEW / med['cache']:.0f} tokens/s)")
    print(f"  without cache: {med['no_cache']:.2f} s ({NEW / med['no_cache']:.0f} tokens/s)")
    print(
        f"  speed-up: {med['no_cache'] / med['cache']:.1f}x; identical greedy output: {same} "
        f"({len(set(outputs['cache']))} distinct tokens)"
    )
    if not same:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
