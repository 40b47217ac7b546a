"""Text generation from a trained checkpoint: a library function and a command.

    python -m pipeline.generate "ROMEO:"                      # continue text
    python -m pipeline.generate --translate "In the beginning God created the heaven and the earth."

Decoding is incremental: a GPT keeps a key/value cache, a recurrent model its hidden state.
Prompts of equal length are decoded together in batches, so no padding (and no mask) is needed
and a batched result is identical to decoding each prompt alone.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.common import PipelineError, run_main, sha256_file
from pipeline.model import build_model
from pipeline.params import Model as ModelConfig
from pipeline.tokenize import Tokenizer

DEFAULT_CHECKPOINT = Path("data/model/best.pt")
DEFAULT_TOKENIZER = Path("data/tokens/tokenizer.model")


def load_checkpoint(path: str | Path, tokenizer: Tokenizer | None = None,
                    tokenizer_path: str | Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """Load a model saved by `train`; refuse a tokenizer it was not trained with."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no checkpoint (run the train stage: dvc repro)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = ModelConfig(**ckpt["model_config"])
        model = build_model(cfg, ckpt["vocab_size"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # truncated file, foreign pickle, wrong keys: one line, no traceback
        raise PipelineError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tokenizer is not None and tokenizer.vocab_size != ckpt["vocab_size"]:
        raise PipelineError(f"{path}: trained with a vocabulary of {ckpt['vocab_size']} but the tokenizer "
                            f"has {tokenizer.vocab_size}; pass the tokenizer it was trained with")
    if tokenizer_path is not None and ckpt.get("tokenizer_sha256") not in (None, sha256_file(tokenizer_path)):
        raise PipelineError(f"{path}: was not trained with the tokenizer {tokenizer_path} (sha256 differs)")
    return model.to(device).eval()


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def _generate_batch(model, idx: torch.Tensor, max_new_tokens: int, eos_id: int, temperature: float,
                    top_k: int, gen) -> list[list[int]]:
    block = model.block_size
    bounded = model.bounded_context
    ctx = idx[:, -block:] if bounded else idx
    logits, state = model.decode(ctx, None)
    B = idx.size(0)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    out = []
    for _ in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_k, gen)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        if bounded and model.state_length(state) >= block:
            # The cache is full: re-encode the last half context and go on from there.
            ctx = torch.cat([idx, torch.stack(out, dim=1)], dim=1)[:, -(block // 2):]
            logits, state = model.decode(ctx, None)
        else:
            logits, state = model.decode(nxt[:, None], state)
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, temperature: float = 0.0,
             top_k: int = 0, batch_size: int = 16, seed: int = 0, device: str = "cpu",
             progress: str | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) until eos or max_new_tokens; returns the new ids (eos excluded).

    `progress`: a label for a progress bar over prompts (shown on a terminal only).
    """
    if temperature < 0:
        raise PipelineError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        if not p:
            raise PipelineError("generate: empty prompt (give at least one token)")
        by_length[len(p)].append(i)
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=None if progress else True)
    for length in sorted(by_length):
        order = by_length[length]
        for b in range(0, len(order), batch_size):
            ids = order[b:b + batch_size]
            idx = torch.tensor([prompts[i] for i in ids], dtype=torch.long, device=device)
            for i, row in zip(ids, _generate_batch(model, idx, max_new_tokens, eos_id, temperature, top_k, gen)):
                results[i] = row
            bar.update(len(ids))
    bar.close()
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.generate", description="Generate text with a trained model.")
    ap.add_argument("prompt", help="text to continue (with --translate: the source sentence)")
    ap.add_argument("--translate", action="store_true", help="render the prompt as a pair source and decode its target")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise PipelineError(f"--max-new-tokens: must be > 0, got {args.max_new_tokens}")
    tok = Tokenizer(args.tokenizer)
    model = load_checkpoint(args.checkpoint, tok, args.tokenizer)
    if args.translate:
        prompt = tok.pair_prompt(tok.encode([args.prompt])[0])
        temperature = 0.0
    else:
        if not args.prompt:
            raise PipelineError("prompt: empty; give some text to continue")
        prompt = [tok.eos_id, *tok.encode([args.prompt])[0]]
        temperature = args.temperature
    if model.bounded_context and len(prompt) >= model.block_size:
        print(f"note: prompt of {len(prompt)} tokens is longer than the context ({model.block_size}); "
              f"keeping the last {model.block_size - 1}", file=sys.stderr)
        prompt = prompt[-(model.block_size - 1):]
    (new,) = generate(model, [prompt], args.max_new_tokens, tok.eos_id, temperature, args.top_k, seed=args.seed)
    text = tok.decode(new)
    print(text if args.translate else args.prompt + text)


if __name__ == "__main__":
    run_main(main)
