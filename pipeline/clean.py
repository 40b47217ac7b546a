"""Stage 2, clean: normalise, filter, de-duplicate and split the collected documents.

Normalisation: Unicode NFC (or NFKC), HTML entities and tags removed, control and invisible
format characters dropped, line ends and spaces made uniform. Filters: empty, too short, too long
(and, for pairs, a length ratio). Exact duplicates are removed on the normalised text; for pairs a
repeated source is a duplicate too, so one source never has two targets in different splits.

The split is a hash of the normalised text (of the source side, for pairs): a document's split
never changes when the corpus grows, and no test pair's source can appear in train.

Optional, with params: PII scrubbing (e-mail addresses, phone numbers, IP addresses become
[EMAIL], [PHONE], [IP]; on by default), Gopher/C4-style quality rules for documents, near-duplicate
removal with MinHash LSH (datasketch, fixed seed; the source side of pairs), and decontamination:
a train document that shares an n-word sequence with val or test is removed from train and listed.

Writes data/clean/{train,val,test}.jsonl (records carry their "source"), data/clean/
decontaminated.jsonl (train documents removed for overlap), metrics/clean.json and
metrics/clean_report.md (per source: documents and bytes in and out, drops per reason, length
quantiles, random dropped examples per reason).

Memory: streaming, except the indexes. Exact duplicates: a 16-byte digest per kept document
(about 100 bytes in a Python set). Near-duplicates: the LSH index and a 128-value signature per
kept document (about 1.5 KB). Decontamination: one hash per word of val and test (about 70 bytes).
"""
from __future__ import annotations

import hashlib
import html
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline import params as P
from pipeline.common import (PipelineError, atomic_dir, atomic_write_text, read_json, read_jsonl, run_main,
                             text_fields, utf8_bytes, write_json)

RAW_DIR = Path("data/raw")
OUT_DIR = Path("data/clean")
METRICS = Path("metrics/clean.json")
REPORT = Path("metrics/clean_report.md")
SPLITS = ("train", "val", "test")
QUALITY_REASONS = ("quality_alpha", "quality_word_length", "quality_repeated_lines", "quality_repeated_bigram",
                   "quality_symbols")
DROP_REASONS = ("empty", "too_short", "too_long", "length_ratio", *QUALITY_REASONS, "duplicate",
                "near_duplicate", "contaminated")

PII = {  # kind: pattern; replaced by [KIND]
    "email": re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ip": re.compile(r"(?<![\w.:])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.])"
                     r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)"),
}

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SPACES = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_KEEP_CONTROL = {"\n", "\t"}


def normalize(text: str, form: str = "NFC", single_line: bool = False) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "&" in text:
        text = html.unescape(text)
    text = _TAG.sub("", text)
    # Cc: control characters (NUL, escapes...); Cf: invisible format characters (BOM, zero-width).
    # Removed before composing, so "e", ZWSP, U+0301 still becomes one NFC character.
    # U+2581 is reserved: sentencepiece uses it to stand for a space.
    text = "".join(ch for ch in text if ch in _KEEP_CONTROL
                   or (unicodedata.category(ch) not in ("Cc", "Cf") and ch != "\u2581"))
    text = unicodedata.normalize(form, text)
    if single_line:
        text = text.replace("\n", " ")
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def split_of(key: str, c: P.Clean) -> str:
    """Deterministic split from a hash of the normalised key text."""
    digest = hashlib.blake2b(f"{c.split_salt}\0{key}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < c.test_fraction:
        return "test"
    if u < c.test_fraction + c.val_fraction:
        return "val"
    return "train"


def _key(*parts: str) -> bytes:
    """A 16-byte digest stands for the text in the duplicate index (memory per document: ~100 bytes)."""
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=16).digest()


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers (9 to 15 digits) with placeholders."""
    if "@" in text:
        text, n = PII["email"].subn("[EMAIL]", text)
        counts["email"] += n
    if ":" not in text and not any(ch.isdigit() for ch in text):  # the common case: no IP, no phone
        return text
    text, n = PII["ip"].subn("[IP]", text)
    counts["ip"] += n

    def phone(m: re.Match) -> str:
        if not 9 <= sum(ch.isdigit() for ch in m.group()) <= 15:
            return m.group()
        counts["phone"] += 1
        return "[PHONE]"
    return PII["phone"].sub(phone, text)


def quality_reason(text: str, c: P.Clean) -> str | None:
    """The first Gopher/C4 rule a document breaks (documents of at least quality_min_words words)."""
    words = text.split()
    if len(words) < c.quality_min_words:
        return None
    non_space = sum(len(w) for w in words)
    if sum(ch.isalpha() for ch in text) < c.min_alpha_fraction * non_space:
        return "quality_alpha"
    if not c.min_mean_word_length <= non_space / len(words) <= c.max_mean_word_length:
        return "quality_word_length"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and (len(lines) - len(set(lines))) / len(lines) > c.max_duplicate_line_fraction:
        return "quality_repeated_lines"
    (top, count), = Counter(zip(words, words[1:])).most_common(1)
    if count > 1 and count * (len(top[0]) + len(top[1])) > c.max_top_bigram_fraction * non_space:
        return "quality_repeated_bigram"
    if (text.count("#") + text.count("...") + text.count("\u2026")) > c.max_symbol_word_ratio * len(words):
        return "quality_symbols"
    return None


class NearDuplicates:
    """MinHash LSH over word shingles: `seen(text)` says whether a similar text was kept before."""

    def __init__(self, c: P.Clean):
        from datasketch import MinHash, MinHashLSH

        self.c, self.MinHash = c, MinHash
        self.lsh = MinHashLSH(threshold=c.near_dup_threshold, num_perm=c.minhash_perm)
        self.signatures: list[np.ndarray] = []
        self.cluster_of: dict[int, int] = {}  # kept document -> number of near-duplicates dropped for it

    def seen(self, text: str) -> bool:
        words = text.lower().split()
        k = self.c.shingle_words
        shingles = {" ".join(words[i:i + k]).encode("utf-8") for i in range(max(1, len(words) - k + 1))}
        m = self.MinHash(num_perm=self.c.minhash_perm, seed=self.c.minhash_seed)
        m.update_batch(list(shingles))
        for key in sorted(self.lsh.query(m)):  # candidates; confirm with the estimated similarity
            if np.mean(self.signatures[key] == m.hashvalues) >= self.c.near_dup_threshold:
                self.cluster_of[key] = self.cluster_of.get(key, 0) + 1
                return True
        self.lsh.insert(len(self.signatures), m)
        self.signatures.append(m.hashvalues)
        return False


def ngram_hashes(texts: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every n-word sequence (lower-cased) in the texts."""
    out = []
    for t in texts:
        words = t.lower().split()
        out.extend(int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode("utf-8"), digest_size=8).digest(),
                                  "little") for i in range(len(words) - n + 1))
    return np.array(out, dtype=np.uint64)


class Examples:
    """Up to k dropped examples per reason, a deterministic reservoir sample."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.rng = k, random.Random(seed)
        self.seen: Counter = Counter()
        self.kept: dict[str, list] = defaultdict(list)

    def add(self, reason: str, source: str, texts: list[str]) -> None:
        self.seen[reason] += 1
        item = (source, " ||| ".join(t[:300] for t in texts))
        if len(self.kept[reason]) < self.k:
            self.kept[reason].append(item)
        else:
            j = self.rng.randrange(self.seen[reason])
            if j < self.k:
                self.kept[reason][j] = item


def drop_reason(texts: list[str], c: P.Clean) -> str | None:
    if any(not t for t in texts):
        return "empty"
    lengths = [len(t) for t in texts]
    if min(lengths) < c.min_chars:
        return "too_short"
    if max(lengths) > c.max_chars:
        return "too_long"
    if len(texts) == 2 and max(lengths) / min(lengths) > c.max_length_ratio:
        return "length_ratio"
    return None


class State:
    """What cleaning carries from document to document: indexes, counts, samples."""

    def __init__(self, c: P.Clean):
        self.seen: set = set()
        self.near = NearDuplicates(c) if c.near_dup else None
        self.heldout_ngrams: list[np.ndarray] = []  # n-gram hashes of val and test documents
        self.examples = Examples(c.report_examples)
        self.lengths: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"in": [], "kept": []})
        self.pii: Counter = Counter()


def clean_source(name: str, pairs: bool, c: P.Clean, state: State, writers: dict) -> dict:
    """Clean one source's records into the split writers (train: a scratch file); return its counts."""
    kept = Counter()
    kept_bytes = Counter()
    dropped = Counter({r: 0 for r in DROP_REASONS})
    documents_in = bytes_in = 0
    pii = Counter()
    lengths = state.lengths[name]
    for rec in read_jsonl(RAW_DIR / f"{name}.jsonl"):
        documents_in += 1
        raw_texts = [rec["src"], rec["tgt"]] if pairs else [rec["text"]]
        bytes_in += sum(len(t.encode("utf-8")) for t in raw_texts)
        lengths["in"].append(sum(len(t) for t in raw_texts))
        texts = [normalize(t, c.normalization, pairs) for t in raw_texts]
        if c.scrub_pii:
            texts = [scrub_pii(t, pii) for t in texts]
        # Exact duplicates on the pair, and on the source side alone.
        keys = [_key("pair", *texts), _key("src", texts[0])] if pairs else [_key("text", texts[0])]
        reason = drop_reason(texts, c)
        if reason is None and c.quality_filters and not pairs:
            reason = quality_reason(texts[0], c)
        if reason is None and any(k in state.seen for k in keys):
            reason = "duplicate"
        if reason is None and state.near is not None and state.near.seen(texts[0]):
            reason = "near_duplicate"
        if reason:
            dropped[reason] += 1
            state.examples.add(reason, name, texts if any(texts) else raw_texts)
            continue
        state.seen.update(keys)
        split = split_of(texts[0], c)
        if split != "train" and c.decontaminate_ngram:
            state.heldout_ngrams.append(ngram_hashes(texts, c.decontaminate_ngram))
        out = {"source": name, **({"src": texts[0], "tgt": texts[1]} if pairs else {"text": texts[0]})}
        writers[split].write(json.dumps(out, ensure_ascii=False) + "\n")
        kept[split] += 1
        kept_bytes[split] += sum(len(t.encode("utf-8")) for t in texts)
        lengths["kept"].append(sum(len(t) for t in texts))
    state.pii.update(pii)
    return {
        "documents_in": documents_in,
        "bytes_in": bytes_in,
        "documents_kept": sum(kept.values()),
        "bytes_kept": sum(kept_bytes.values()),
        "dropped": dict(dropped),
        "pii_replaced": {k: pii[k] for k in PII},
        "splits": {s: {"documents": kept[s], "bytes": kept_bytes[s]} for s in SPLITS},
    }


def decontaminate(scratch: Path, out: Path, c: P.Clean, state: State, per_source: dict) -> int:
    """Copy train from the scratch file, moving documents that share an n-gram with val/test to
    decontaminated.jsonl (and out of the counts)."""
    held = np.unique(np.concatenate(state.heldout_ngrams)) if state.heldout_ngrams else np.array([], np.uint64)
    removed = 0
    with open(scratch, encoding="utf-8") as lines, open(out / "train.jsonl", "w", encoding="utf-8") as train, \
            open(out / "decontaminated.jsonl", "w", encoding="utf-8") as listed:
        for line in lines:
            rec = json.loads(line)
            texts = [rec[k] for k in text_fields(rec)]
            hashes = ngram_hashes(texts, c.decontaminate_ngram)
            if not (len(hashes) and np.isin(hashes, held).any()):
                train.write(line)
                continue
            removed += 1
            m = per_source[rec["source"]]
            size = utf8_bytes(rec)
            m["dropped"]["contaminated"] += 1
            m["documents_kept"] -= 1
            m["bytes_kept"] -= size
            m["splits"]["train"]["documents"] -= 1
            m["splits"]["train"]["bytes"] -= size
            state.examples.add("contaminated", rec["source"], texts)
            listed.write(line)
    scratch.unlink()
    return removed


def main() -> None:
    c = P.load().clean
    manifest = read_json(RAW_DIR / "manifest.json")
    per_source = {}
    state = State(c)
    with atomic_dir(OUT_DIR) as out:
        # With decontamination, train goes to a scratch file first: which documents to drop is
        # known only once val and test are complete.
        scratch = out / ("train.scratch.jsonl" if c.decontaminate_ngram else "train.jsonl")
        writers = {"train": open(scratch, "w", encoding="utf-8"),
                   **{s: open(out / f"{s}.jsonl", "w", encoding="utf-8") for s in ("val", "test")}}
        try:
            for src in manifest["sources"]:
                per_source[src["name"]] = clean_source(src["name"], src["pairs"], c, state, writers)
        finally:
            for w in writers.values():
                w.close()
        contaminated = 0
        if c.decontaminate_ngram:
            contaminated = decontaminate(scratch, out, c, state, per_source)
        else:
            (out / "decontaminated.jsonl").touch()
        totals = {s: sum(m["splits"][s]["documents"] for m in per_source.values()) for s in SPLITS}
        if totals["train"] == 0:
            raise PipelineError("clean: no training documents left after cleaning "
                                f"(in: {sum(m['documents_in'] for m in per_source.values())}, "
                                f"dropped: {_sum_dropped(per_source)}); check clean.min_chars/max_chars and the sources")
        for s in ("val", "test"):
            if totals[s] == 0:
                raise PipelineError(f"clean: the {s} split is empty; the corpus is too small for "
                                    f"clean.{s}_fraction, raise it or add text")
    near = state.near
    metrics = {
        "documents_kept": sum(m["documents_kept"] for m in per_source.values()),
        "bytes_kept": sum(m["bytes_kept"] for m in per_source.values()),
        "dropped": _sum_dropped(per_source),
        "pii_replaced": {k: state.pii[k] for k in PII},
        "near_duplicate_clusters": len(near.cluster_of) if near else 0,
        "contaminated_removed_from_train": contaminated,
        "splits": totals,
        "sources": per_source,
    }
    write_json(METRICS, metrics)
    atomic_write_text(REPORT, clean_report(metrics, state.lengths, state.examples.kept))
    print(f"clean: kept {metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes), "
          f"dropped {dict((k, v) for k, v in metrics['dropped'].items() if v)}, splits {totals} -> {OUT_DIR}")


def clean_report(metrics: dict, lengths: dict, examples: dict) -> str:
    """metrics/clean_report.md: what went in, what came out and why, for a reviewer."""
    import pandas as pd

    def table(df: pd.DataFrame) -> str:
        return df.to_markdown()  # tabulate, which dvc already needs

    sources = metrics["sources"]
    rows = {name: {"documents in": m["documents_in"], "documents out": m["documents_kept"],
                   "bytes in": m["bytes_in"], "bytes out": m["bytes_kept"],
                   "train/val/test": "/".join(str(m["splits"][s]["documents"]) for s in SPLITS)}
            for name, m in sources.items()}
    drops = pd.DataFrame({name: m["dropped"] for name, m in sources.items()})
    drops = drops[(drops.T != 0).any()] if len(drops) else drops
    quantiles = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    qrows = {}
    for name, ls in lengths.items():
        for which in ("in", "kept"):
            if ls[which]:
                q = np.quantile(np.array(ls[which]), quantiles)
                qrows[f"{name}, {which}"] = {f"q{int(p * 100)}": int(v) for p, v in zip(quantiles, q)}
    lines = ["# Cleaning report", "",
             f"{metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes) kept; "
             f"PII replaced: {', '.join(f'{k} {v}' for k, v in metrics['pii_replaced'].items())}; "
             f"near-duplicate clusters: {metrics['near_duplicate_clusters']}; train documents removed for "
             f"overlap with val/test: {metrics['contaminated_removed_from_train']} (listed in "
             f"data/clean/decontaminated.jsonl).", "",
             "## Per source", "", table(pd.DataFrame(rows).T), "",
             "## Dropped, per reason", "", table(drops) if len(drops) else "Nothing was dropped.", "",
             "## Length in characters (quantiles), before and after", "",
             table(pd.DataFrame(qrows).T) if qrows else "No documents.", ""]
    if examples:
        lines += ["## Dropped examples (random, per reason)", ""]
        for reason in DROP_REASONS:
            for source, text in examples.get(reason, []):
                lines.append(f"- **{reason}** ({source}): `{text[:200].replace('`', chr(39))}`".replace("\n", " "))
        lines.append("")
    return "\n".join(lines)


def _sum_dropped(per_source: dict) -> dict:
    total = Counter({r: 0 for r in DROP_REASONS})
    for m in per_source.values():
        total.update(m["dropped"])
    return dict(total)


if __name__ == "__main__":
    run_main(main)
