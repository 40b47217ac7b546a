"""Scores of a language model and of its outputs, each as the field reports it.

- `nats_of_range`: the model's total cross-entropy over a stretch of a token file; with the text's
  UTF-8 bytes it gives bits per byte (`bits_per_byte`), which compares models across tokenizers.
  Bits per byte counts the loss of every token, the special ones (</s>, <src>, <tgt>, which stand
  for no bytes) included: predicting where a document or a source ends is part of the task. The
  loss on special tokens is also returned, for bits per byte of the text tokens alone (as nanochat
  reports it).
- `score_split`: bits per byte of a split's token file, per source, beside the baselines.
- `NgramBaselines`: unigram and bigram models counted on train, the baselines beside the model.
- `corpus_scores`: chrF, BLEU and TER (sacrebleu) with bootstrap confidence intervals;
  `bleu_tokenizer` picks BLEU's tokenizer from the references' script (`zh` for Chinese...).
- `wilson` and `interval_of_mean`: 95% intervals of an accuracy and of a mean.
- `text_statistics`: diversity of generated text (distinct-n, repeated 4-grams, length), in
  `units`: words, or characters in scripts written without spaces (Chinese, Japanese, Thai).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.common import read_json
from pipeline.core.paths import TOKENS_DIR
from pipeline.data.tokenizer import load_tokens


@torch.no_grad()
def nats_of_range(
    model, data: np.ndarray, start: int, end: int, batch_size: int, special_ids=()
) -> tuple[float, float]:
    """Cross-entropy (nats) of predicting tokens data[start:end], each from the tokens before it:
    (the total, the part of it spent on targets in `special_ids`).

    Windows of block_size targets; each window's context is the token before it plus its own
    prefix (the first token of a split file is </s>, so start >= 1 always has a predecessor).
    """
    T = model.block_size
    device = next(model.parameters()).device
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
    windows = [(s, min(s + T, end)) for s in range(start, end, T)]
    total = special_total = 0.0
    for length in sorted({e - s for s, e in windows}):  # full windows batch together; the last may be short
        same = [s for s, e in windows if e - s == length]
        for b in range(0, len(same), batch_size):
            rows = np.stack([data[s - 1 : s + length] for s in same[b : b + batch_size]]).astype(np.int64)
            xy = torch.from_numpy(rows).to(device)
            logits, _ = model(xy[:, :-1])
            logits, targets = logits.float().reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            is_special = torch.isin(targets, special)
            if bool(is_special.any()):
                special_total += F.cross_entropy(logits[is_special], targets[is_special], reduction="sum").item()
    return total, special_total


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

    def most_likely_next(self, prev: int) -> int:
        """The bigram's most likely token after `prev` (its most frequent follower in train; the
        unigram's most frequent token after a token never followed)."""
        if not hasattr(self, "_argmax"):
            best = np.full(self.V, int(np.argmax(self.logp_unigram)), dtype=np.int64)
            prevs = self.codes // self.V
            order = np.lexsort((self.pair_counts, prevs))  # by prev, then count: each group's last is its max
            last_of_group = order[np.r_[prevs[order][1:] != prevs[order][:-1], True]]
            best[prevs[last_of_group]] = self.codes[last_of_group] % self.V
            self._argmax = best
        return int(self._argmax[prev])

    def nats(self, prev: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nats of predicting each of `nxt` after `prev`: (unigram, bigram), one per token."""
        prev, nxt = prev.astype(np.int64), nxt.astype(np.int64)
        p_uni = np.exp(self.logp_unigram[nxt])
        code = prev * self.V + nxt
        at = np.clip(np.searchsorted(self.codes, code), 0, len(self.codes) - 1)
        c_pair = np.where(self.codes[at] == code, self.pair_counts[at], 0.0)
        c_prev, n_types = self.history[prev], self.followers[prev]
        denom = np.maximum(c_prev + n_types, 1.0)
        p_bi = np.where(c_prev > 0, (c_pair + n_types * p_uni) / denom, p_uni)
        return -np.log(p_uni), -np.log(p_bi)


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


# Scripts written without spaces between words: each of their characters is a unit of its own
# (the way sacrebleu's zh tokenizer and chrF see them). Han, kana, Thai, Lao, Myanmar, Khmer.
NO_SPACE_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
UNIT = re.compile(f"[{NO_SPACE_CHARS}]|[^\\s{NO_SPACE_CHARS}]+")
KANA, HAN = re.compile("[\u3040-\u30ff]"), re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
NO_SPACE = re.compile(f"[{NO_SPACE_CHARS}]")


def units(text: str) -> list[str]:
    """Whitespace words, with each character of a script written without spaces a unit of its own."""
    return UNIT.findall(text)


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's tokenizer for references in this script: `zh` for Chinese, `ja-mecab` for
    Japanese (`char` without MeCab), `char` for other scripts without spaces, `13a` otherwise."""
    import importlib.util

    sample = "".join(references[:2000])
    letters = max(sum(ch.isalpha() for ch in sample), 1)
    if len(KANA.findall(sample)) > 0.05 * letters:
        return "ja-mecab" if importlib.util.find_spec("MeCab") and importlib.util.find_spec("ipadic") else "char"
    if len(HAN.findall(sample)) > 0.3 * letters:
        return "zh"
    if len(NO_SPACE.findall(sample)) > 0.3 * letters:
        return "char"
    return "13a"


def corpus_scores(
    hyps: list[str],
    refs: list[str],
    n_bootstrap: int,
    seed: int = 12345,
    tokenize: str = "13a",
    metrics: tuple[str, ...] = ("chrf", "bleu", "ter"),
) -> tuple[dict, dict]:
    """chrF, BLEU (with sacrebleu's tokenizer `tokenize`) and TER (or those of them `metrics`
    names) with 95% bootstrap confidence intervals, and the hypotheses' length over the
    references' (in characters); and the signatures.

    Each metric's per-sentence sufficient statistics are extracted once (TER's are slow): the
    corpus score is computed from their sum, as `corpus_score` does, and the interval resamples
    the test sentences `n_bootstrap` times and recomputes the score from the resampled sum, as
    `corpus_score(n_bootstrap=...)` does; that built-in crashes on sacrebleu 2.6 when resampled
    scores mix float and float32.
    """
    import sacrebleu

    scores, signatures = {}, {}
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(hyps), size=(n_bootstrap, len(hyps))) if n_bootstrap > 1 else None
    known = {
        "chrf": sacrebleu.CHRF,
        "bleu": lambda: sacrebleu.BLEU(tokenize=tokenize),
        "ter": lambda: sacrebleu.TER(asian_support=tokenize != "13a"),
    }
    for name in metrics:
        metric = known[name]()
        sentence_stats = metric._extract_corpus_statistics(hyps, [refs])
        scores[name] = round(float(metric._aggregate_and_compute(sentence_stats).score), 2)
        signatures[name] = str(metric.get_signature())
        if resamples is not None:
            stats = np.asarray(sentence_stats, dtype=np.float64)
            boot = sorted(float(metric._compute_score_from_stats(stats[r].sum(0)).score) for r in resamples)
            low, high = boot[n_bootstrap // 40], boot[n_bootstrap - n_bootstrap // 40 - 1]
            scores[f"{name}_ci95"] = round((high - low) / 2, 2)  # half-width: score ± ci95
    scores["length_ratio"] = round(sum(map(len, hyps)) / max(sum(map(len, refs)), 1), 3)
    return scores, signatures


def text_statistics(texts: list[str]) -> dict:
    """Diversity of text, in `units` (words; a character in scripts without spaces): distinct-1/2
    over all texts, repeated 4-grams within each, mean length."""
    words = [units(t) for t in texts]

    def ngrams(w, n):
        return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]

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


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_of_mean(values: list[float], resamples: int, seed: int = 0) -> list[float]:
    """A 95% percentile bootstrap interval of a mean."""
    if not values or resamples == 0:
        return []
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def score_split(model, split: str, baselines: NgramBaselines, batch_size: int, special_ids) -> dict:
    """Bits per byte of the model and the baselines, per source and in all; and the same over the
    text tokens alone (`text_only`: the predictions of `special_ids` left out)."""
    data = load_tokens(split)
    meta = read_json(TOKENS_DIR / f"{split}.json")
    result: dict = {"sources": {}}
    total = Counter()
    special = np.asarray(sorted(special_ids))
    for name, source in meta["sources"].items():
        start, end, n_bytes = source["start"], source["end"], source["bytes"]
        nats, special_nats = nats_of_range(model, data, start, end, batch_size, special_ids)
        prev, nxt = np.asarray(data[start - 1 : end - 1]), np.asarray(data[start:end])
        uni, bi = baselines.nats(prev, nxt)
        text = ~np.isin(nxt, special)
        counts = {
            "nats": nats,
            "uni": float(uni.sum()),
            "bi": float(bi.sum()),
            "tokens": end - start,
            "bytes": n_bytes,
            "text_nats": nats - special_nats,
            "text_uni": float(uni[text].sum()),
            "text_bi": float(bi[text].sum()),
        }
        result["sources"][name] = split_scores(counts)
        total.update(counts)
    result.update(split_scores(total))
    return result


def split_scores(counts) -> dict:
    """Cross-entropy, perplexity and bits per byte of the model and the baselines, from summed counts."""
    scores = {
        **summarize(counts["nats"], counts["tokens"], counts["bytes"]),
        "unigram_bits_per_byte": bits_per_byte(counts["uni"], counts["bytes"]),
        "bigram_bits_per_byte": bits_per_byte(counts["bi"], counts["bytes"]),
        "text_only": {
            "bits_per_byte": bits_per_byte(counts["text_nats"], counts["bytes"]),
            "unigram_bits_per_byte": bits_per_byte(counts["text_uni"], counts["bytes"]),
            "bigram_bits_per_byte": bits_per_byte(counts["text_bi"], counts["bytes"]),
        },
    }
    scores["bits_per_byte_vs_unigram"] = round(scores["bits_per_byte"] / max(scores["unigram_bits_per_byte"], 1e-9), 4)
    return scores
