"""Stage 5, evaluate: how well the model predicts held-out text, translates, and writes.

- Per split (val, test) and per source: mean cross-entropy (nats/token), perplexity, and bits per
  byte = total nats / ln 2 / UTF-8 bytes of the text, which compares models across tokenizers.
  Every token of the split is scored once, in consecutive windows of block_size. Unigram and
  bigram baselines (counted on train) in bits per byte beside the model.
- Test pairs: BLEU, chrF and TER (sacrebleu, corpus level, with signatures and 95% bootstrap
  confidence intervals) for greedy and beam decoding of each source, and for copying the source.
- Text sampled from fixed prompts: distinct-1/2, repeated 4-grams, mean length, beside the same
  statistics of real held-out text.

Writes metrics/eval.json, metrics/samples.md, and metrics/report.md with metrics/loss.png.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline import params as P
from pipeline.common import atomic_write_text, read_json, read_jsonl, run_main, set_torch_threads, write_json
from pipeline.generate import Decoding, generate, load_checkpoint
from pipeline.report import first_per_prompt, translation_table, write_report
from pipeline.tokenize import Tokenizer
from pipeline.train import TOKENS_DIR, load_tokens

CHECKPOINT = Path("data/model/best.safetensors")
CLEAN_DIR = Path("data/clean")
METRICS = Path("metrics/eval.json")
SAMPLES = Path("metrics/samples.md")
SHOWN_TRANSLATIONS = 8


@torch.no_grad()
def nats_of_range(model, data: np.ndarray, start: int, end: int, batch_size: int) -> float:
    """Total cross-entropy (nats) of predicting tokens data[start:end], each from the tokens before it.

    Windows of block_size targets; each window's context is the token before it plus its own
    prefix (the first token of a split file is </s>, so start >= 1 always has a predecessor).
    """
    T = model.block_size
    device = next(model.parameters()).device
    windows = [(s, min(s + T, end)) for s in range(start, end, T)]
    total = 0.0
    for length in sorted({e - s for s, e in windows}):  # full windows batch together; the last may be short
        same = [s for s, e in windows if e - s == length]
        for b in range(0, len(same), batch_size):
            rows = np.stack([data[s - 1:s + length] for s in same[b:b + batch_size]]).astype(np.int64)
            xy = torch.from_numpy(rows).to(device)
            logits, _ = model(xy[:, :-1])
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1), reduction="sum").item()
    return total


class NgramBaselines:
    """Unigram (add-one) and bigram (Witten-Bell interpolated with the unigram) models of train."""

    def __init__(self, train: np.ndarray, vocab_size: int):
        train = np.asarray(train, dtype=np.int64)
        self.V = vocab_size
        counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
        self.logp_unigram = np.log((counts + 1) / (counts.sum() + vocab_size))
        codes, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
        self.codes, self.pair_counts = codes, pair_counts.astype(np.float64)
        self.history = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
        self.followers = np.bincount(codes // vocab_size, minlength=vocab_size).astype(np.float64)

    def nats(self, prev: np.ndarray, nxt: np.ndarray) -> tuple[float, float]:
        """Total nats of predicting `nxt` after `prev`: (unigram, bigram)."""
        prev, nxt = prev.astype(np.int64), nxt.astype(np.int64)
        p_uni = np.exp(self.logp_unigram[nxt])
        code = prev * self.V + nxt
        at = np.clip(np.searchsorted(self.codes, code), 0, len(self.codes) - 1)
        c_pair = np.where(self.codes[at] == code, self.pair_counts[at], 0.0)
        c_prev, n_types = self.history[prev], self.followers[prev]
        denom = np.maximum(c_prev + n_types, 1.0)
        p_bi = np.where(c_prev > 0, (c_pair + n_types * p_uni) / denom, p_uni)
        return float(-np.log(p_uni).sum()), float(-np.log(p_bi).sum())


def summarize(nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "cross_entropy": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "bits_per_byte": bits_per_byte(nats, n_bytes),
    }


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return round(nats / math.log(2) / max(n_bytes, 1), 4)


def score_split(model, split: str, baselines: NgramBaselines, batch_size: int) -> dict:
    data = load_tokens(split)
    meta = read_json(TOKENS_DIR / f"{split}.json")
    result: dict = {"sources": {}}
    total = Counter()
    for name, s in meta["sources"].items():
        nats = nats_of_range(model, data, s["start"], s["end"], batch_size)
        uni, bi = baselines.nats(np.asarray(data[s["start"] - 1:s["end"] - 1]), np.asarray(data[s["start"]:s["end"]]))
        tokens = s["end"] - s["start"]
        result["sources"][name] = {**summarize(nats, tokens, s["bytes"]),
                                   "unigram_bits_per_byte": bits_per_byte(uni, s["bytes"]),
                                   "bigram_bits_per_byte": bits_per_byte(bi, s["bytes"])}
        total.update({"nats": nats, "uni": uni, "bi": bi, "tokens": tokens, "bytes": s["bytes"]})
    result.update(summarize(total["nats"], total["tokens"], total["bytes"]))
    result["unigram_bits_per_byte"] = bits_per_byte(total["uni"], total["bytes"])
    result["bigram_bits_per_byte"] = bits_per_byte(total["bi"], total["bytes"])
    result["bits_per_byte_vs_unigram"] = round(result["bits_per_byte"] / result["unigram_bits_per_byte"], 4)
    return result


def corpus_scores(hyps: list[str], refs: list[str], n_bootstrap: int, seed: int = 12345) -> tuple[dict, dict]:
    """BLEU, chrF and TER with 95% bootstrap confidence intervals; and their signatures.

    The interval resamples the test sentences `n_bootstrap` times and recomputes each corpus
    score from sacrebleu's per-sentence sufficient statistics, as `corpus_score(n_bootstrap=...)`
    does; that built-in crashes on sacrebleu 2.6 when resampled scores mix float and float32.
    """
    import sacrebleu

    scores, signatures = {}, {}
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(hyps), size=(n_bootstrap, len(hyps))) if n_bootstrap > 1 else None
    for name, metric in (("bleu", sacrebleu.BLEU()), ("chrf", sacrebleu.CHRF()), ("ter", sacrebleu.TER())):
        scores[name] = round(float(metric.corpus_score(hyps, [refs]).score), 2)
        signatures[name] = str(metric.get_signature())
        if resamples is not None:
            stats = np.asarray(metric._extract_corpus_statistics(hyps, [refs]), dtype=np.float64)
            boot = sorted(float(metric._compute_score_from_stats(stats[r].sum(0)).score) for r in resamples)
            low, high = boot[n_bootstrap // 40], boot[n_bootstrap - n_bootstrap // 40 - 1]
            scores[f"{name}_ci95"] = round((high - low) / 2, 2)  # half-width: score ± ci95
    return scores, signatures


def translate_test_pairs(model, tok: Tokenizer, e: P.Evaluate, device: str) -> tuple[dict | None, list[dict]]:
    pairs = [r for r in read_jsonl(CLEAN_DIR / "test.jsonl") if "src" in r]
    if e.max_pairs:
        pairs = pairs[:e.max_pairs]
    if not pairs:
        return None, []
    new_tokens = min(e.max_new_tokens, model.block_size - 4) if model.bounded_context else e.max_new_tokens
    # Keep room for the target: a source longer than the context is cut from the left.
    room = model.block_size - new_tokens if model.bounded_context else None
    prompts = [tok.pair_prompt(ids)[-room:] if room else tok.pair_prompt(ids) for ids in tok.encode([r["src"] for r in pairs])]
    refs = [r["tgt"] for r in pairs]
    result: dict = {"pairs": len(pairs), "beam_size": e.beam_size, "bootstrap_samples": e.bootstrap,
                    "max_target_ratio": e.max_target_ratio}
    hyps = {}
    decodings = {"greedy": Decoding(new_tokens, e.max_target_ratio)}
    if e.beam_size > 1:
        decodings["beam"] = Decoding(new_tokens, e.max_target_ratio, beam_size=e.beam_size,
                                     length_penalty=e.length_penalty)
    for name, d in decodings.items():
        out = generate(model, prompts, tok.eos_id, d, batch_size=e.batch_size, device=device, progress=f"translate ({name})")
        hyps[name] = [tok.decode(o).strip() for o in out]
        result[name], signatures = corpus_scores(hyps[name], refs, e.bootstrap)
    result["copy_source"], _ = corpus_scores([r["src"] for r in pairs], refs, e.bootstrap)
    result["signatures"] = signatures
    shown = [{"src": r["src"], "ref": r["tgt"], **{k: h[i] for k, h in hyps.items()}}
             for i, r in enumerate(pairs[:SHOWN_TRANSLATIONS])]
    return result, shown


def text_statistics(texts: list[str]) -> dict:
    """Diversity of text, on whitespace words: distinct-1/2 over all texts, repeated 4-grams within each."""
    words = [t.split() for t in texts]

    def ngrams(w, n):
        return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]

    stats = {}
    for n in (1, 2):
        grams = [g for w in words for g in ngrams(w, n)]
        stats[f"distinct_{n}"] = round(len(set(grams)) / max(len(grams), 1), 4)
    repeats = total = 0
    for w in words:
        grams = ngrams(w, 4)
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    stats["repeated_4gram_fraction"] = round(repeats / max(total, 1), 4)
    stats["mean_words"] = round(sum(map(len, words)) / max(len(words), 1), 1)
    stats["texts"] = len(texts)
    return stats


def sample_prompts(model, tok: Tokenizer, e: P.Evaluate, device: str) -> tuple[list[tuple[str, str]], dict]:
    """Sample `samples_per_prompt` continuations of each prompt; their statistics beside real text's."""
    if not e.prompts:
        return [], {}
    prompts, labels = [], []
    for text, ids in zip(e.prompts, tok.encode(e.prompts)):
        p = [tok.eos_id, *ids]
        prompts += [p] * e.samples_per_prompt  # generate() keeps the end of an over-long prompt
        labels += [text] * e.samples_per_prompt
    d = Decoding(e.sample_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                 repetition_penalty=e.repetition_penalty, seed=e.seed)
    out = generate(model, prompts, tok.eos_id, d, batch_size=e.batch_size, device=device)
    samples = [(label, tok.decode(o)) for label, o in zip(labels, out)]
    texts = [s for _, s in samples]
    # Real held-out text of the same lengths: the start of val documents (text ones first).
    val = list(read_jsonl(CLEAN_DIR / "val.jsonl"))
    docs = [r["text"] for r in val if "text" in r] or [r["tgt"] for r in val if "tgt" in r]
    reference = [" ".join(docs[i % len(docs)].split()[:max(len(t.split()), 1)]) for i, t in enumerate(texts)] if docs else []
    return samples, {"model": text_statistics(texts), "held_out_text": text_statistics(reference)}


def samples_markdown(samples: list[tuple[str, str]], e: P.Evaluate, translations: list[dict]) -> str:
    lines = ["# Samples", "",
             f"Sampled with temperature {e.temperature}, top-k {e.top_k}, top-p {e.top_p}, repetition penalty "
             f"{e.repetition_penalty}, seed {e.seed}, up to {e.sample_tokens} new tokens; the first sample of each prompt.",
             ""]
    for prompt, text in first_per_prompt(samples):
        lines += [f"## {prompt}", "", "```", prompt + text, "```", ""]
    if translations:
        lines += translation_table(translations)
    return "\n".join(lines)


def main() -> None:
    p = P.load()
    e = p.evaluate
    set_torch_threads(0)
    torch.manual_seed(e.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer(TOKENS_DIR / "tokenizer.model")
    model = load_checkpoint(CHECKPOINT, tok, TOKENS_DIR / "tokenizer.model", device=device)
    baselines = NgramBaselines(load_tokens("train"), tok.vocab_size)
    metrics: dict = {}
    t0 = time.perf_counter()
    for split in ("val", "test"):
        metrics[split] = m = score_split(model, split, baselines, e.batch_size)
        print(f"evaluate: {split}: {m['cross_entropy']} nats/token, perplexity {m['perplexity']}, "
              f"{m['bits_per_byte']} bits/byte (unigram {m['unigram_bits_per_byte']}, bigram "
              f"{m['bigram_bits_per_byte']})", flush=True)
    t1 = time.perf_counter()
    metrics["translation"], shown = translate_test_pairs(model, tok, e, device)
    t2 = time.perf_counter()
    if metrics["translation"]:
        t = metrics["translation"]
        best = t.get("beam", t["greedy"])
        print(f"evaluate: test translation of {t['pairs']} pairs: BLEU {t['greedy']['bleu']} greedy, "
              f"{best['bleu']} beam; chrF {t['greedy']['chrf']} greedy, {best['chrf']} beam; "
              f"copying the source: BLEU {t['copy_source']['bleu']}", flush=True)
    samples, metrics["generation"] = sample_prompts(model, tok, e, device)
    t3 = time.perf_counter()
    metrics["seconds"] = {"scoring": round(t1 - t0, 1), "translation": round(t2 - t1, 1), "sampling": round(t3 - t2, 1)}
    write_json(METRICS, metrics)
    atomic_write_text(SAMPLES, samples_markdown(samples, e, shown))
    write_report(metrics, samples, shown)
    print(f"evaluate: scoring {t1 - t0:.0f} s, translation {t2 - t1:.0f} s, sampling {t3 - t2:.0f} s "
          f"-> {METRICS}, {SAMPLES}, metrics/report.md")


if __name__ == "__main__":
    run_main(main)
