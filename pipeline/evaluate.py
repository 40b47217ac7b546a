"""Stage 5, evaluate: how well the model predicts held-out text, and how well it translates.

- Per split (val, test) and per source: mean cross-entropy (nats/token), perplexity, and bits per
  byte = total nats / ln 2 / UTF-8 bytes of the text, which compares models across tokenizers.
  Every token of the split is scored once, in consecutive windows of block_size.
- A unigram baseline (token frequencies of train, add-one smoothed) in bits per byte beside it.
- BLEU and chrF (sacrebleu, corpus level, with signatures) of greedy translations of the test
  pairs' sources against their references.
- Samples from fixed prompts, and a few translations beside their references: metrics/samples.md.

Writes metrics/eval.json and metrics/samples.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline import params as P
from pipeline.common import atomic_write_text, read_json, read_jsonl, run_main, set_torch_threads, write_json
from pipeline.generate import generate, load_checkpoint
from pipeline.tokenize import Tokenizer
from pipeline.train import TOKENS_DIR, load_tokens

CHECKPOINT = Path("data/model/best.pt")
CLEAN_TEST = Path("data/clean/test.jsonl")
METRICS = Path("metrics/eval.json")
SAMPLES = Path("metrics/samples.md")
SHOWN_TRANSLATIONS = 5


@torch.no_grad()
def nats_of_range(model, data: np.ndarray, start: int, end: int, batch_size: int) -> float:
    """Total cross-entropy (nats) of predicting tokens data[start:end], each from the tokens before it.

    Windows of block_size targets; each window's context is the token before it plus its own
    prefix (the first token of a split file is </s>, so start >= 1 always has a predecessor).
    """
    T = model.block_size
    windows = [(s, min(s + T, end)) for s in range(start, end, T)]
    total = 0.0
    for length in sorted({e - s for s, e in windows}):  # full windows batch together; the last may be short
        same = [s for s, e in windows if e - s == length]
        for b in range(0, len(same), batch_size):
            rows = np.stack([data[s - 1:s + length] for s in same[b:b + batch_size]]).astype(np.int64)
            xy = torch.from_numpy(rows).to(next(model.parameters()).device)
            logits, _ = model(xy[:, :-1])
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1), reduction="sum").item()
    return total


def _device_of(model) -> str:
    return next(model.parameters()).device.type


def summarize(nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "cross_entropy": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "bits_per_byte": round(nats / math.log(2) / max(n_bytes, 1), 4),
    }


def unigram_log_probs(train: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def score_split(model, split: str, logp_unigram: np.ndarray, batch_size: int) -> dict:
    data = load_tokens(split)
    meta = read_json(TOKENS_DIR / f"{split}.json")
    result = {"sources": {}}
    all_nats = all_uni = 0.0
    all_tokens = all_bytes = 0
    for name, s in meta["sources"].items():
        nats = nats_of_range(model, data, s["start"], s["end"], batch_size)
        uni = -float(logp_unigram[np.asarray(data[s["start"]:s["end"]], dtype=np.int64)].sum())
        tokens = s["end"] - s["start"]
        result["sources"][name] = summarize(nats, tokens, s["bytes"])
        result["sources"][name]["unigram_bits_per_byte"] = round(uni / math.log(2) / max(s["bytes"], 1), 4)
        all_nats, all_uni, all_tokens, all_bytes = all_nats + nats, all_uni + uni, all_tokens + tokens, all_bytes + s["bytes"]
    result.update(summarize(all_nats, all_tokens, all_bytes))
    result["unigram_bits_per_byte"] = round(all_uni / math.log(2) / max(all_bytes, 1), 4)
    result["bits_per_byte_vs_unigram"] = round(result["bits_per_byte"] / result["unigram_bits_per_byte"], 4)
    return result


def translate_test_pairs(model, tok: Tokenizer, e: P.Evaluate) -> tuple[dict | None, list[dict]]:
    import sacrebleu

    pairs = [r for r in read_jsonl(CLEAN_TEST) if "src" in r]
    if e.max_pairs:
        pairs = pairs[:e.max_pairs]
    if not pairs:
        return None, []
    src_ids = tok.encode([r["src"] for r in pairs])
    prompts = []
    for ids in src_ids:
        # Keep room for the target: a source longer than the context is cut from the left.
        room = model.block_size - e.max_new_tokens if model.bounded_context else len(ids) + 3
        prompts.append(tok.pair_prompt(ids)[-max(room, 4):])
    new_tokens = min(e.max_new_tokens, model.block_size - 4) if model.bounded_context else e.max_new_tokens
    outputs = generate(model, prompts, new_tokens, tok.eos_id, temperature=0.0, batch_size=e.batch_size,
                       device=_device_of(model), progress="translating")
    hyps = [tok.decode(o).strip() for o in outputs]
    refs = [r["tgt"] for r in pairs]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    scores = {
        "pairs": len(pairs),
        "bleu": round(b.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "decoding": "greedy",
    }
    shown = [{"src": r["src"], "ref": r["tgt"], "hyp": h} for r, h in zip(pairs[:SHOWN_TRANSLATIONS], hyps)]
    return scores, shown


def samples_markdown(model, tok: Tokenizer, e: P.Evaluate, translations: list[dict]) -> str:
    prompts = [[tok.eos_id, *ids] for ids in tok.encode(e.prompts)] if e.prompts else []
    room = model.block_size - 1 if model.bounded_context else e.sample_tokens
    continuations = generate(model, [p[-room:] for p in prompts], e.sample_tokens, tok.eos_id,
                             temperature=e.temperature, top_k=e.top_k, batch_size=1, seed=e.seed,
                             device=_device_of(model)) if prompts else []
    lines = ["# Samples", "",
             f"Sampled with temperature {e.temperature}, top-k {e.top_k}, seed {e.seed}, "
             f"up to {e.sample_tokens} new tokens. Each prompt is followed by the model's continuation.", ""]
    for prompt, new in zip(e.prompts, continuations):
        lines += [f"## {prompt}", "", "```", prompt + tok.decode(new), "```", ""]
    if translations:
        lines += ["# Translations (greedy)", "", "| source | reference | model |", "|---|---|---|"]
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
        lines += [f"| {esc(t['src'])} | {esc(t['ref'])} | {esc(t['hyp'])} |" for t in translations]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = P.load()
    e = p.evaluate
    set_torch_threads(0)
    torch.manual_seed(e.seed)
    tok = Tokenizer(TOKENS_DIR / "tokenizer.model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_checkpoint(CHECKPOINT, tok, TOKENS_DIR / "tokenizer.model", device=device)
    logp_unigram = unigram_log_probs(load_tokens("train"), tok.vocab_size)
    metrics: dict = {}
    for split in ("val", "test"):
        metrics[split] = score_split(model, split, logp_unigram, e.batch_size)
        m = metrics[split]
        print(f"evaluate: {split}: {m['cross_entropy']} nats/token, perplexity {m['perplexity']}, "
              f"{m['bits_per_byte']} bits/byte (unigram {m['unigram_bits_per_byte']})", flush=True)
    translation, shown = translate_test_pairs(model, tok, e)
    metrics["translation"] = translation
    if translation:
        print(f"evaluate: test translation of {translation['pairs']} pairs: BLEU {translation['bleu']}, "
              f"chrF {translation['chrf']}", flush=True)
    samples = samples_markdown(model, tok, e, shown)
    write_json(METRICS, metrics)
    atomic_write_text(SAMPLES, samples)
    print(f"evaluate: -> {METRICS}, {SAMPLES}")


if __name__ == "__main__":
    run_main(main)
