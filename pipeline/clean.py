"""Stage 2, clean: normalise, filter, de-duplicate and split the collected documents.

Normalisation: Unicode NFC (or NFKC), HTML entities and tags removed, control and invisible
format characters dropped, line ends and spaces made uniform. Filters: empty, too short, too long
(and, for pairs, a length ratio). Exact duplicates are removed on the normalised text; for pairs a
repeated source is a duplicate too, so one source never has two targets in different splits.

The split is a hash of the normalised text (of the source side, for pairs): a document's split
never changes when the corpus grows, and no test pair's source can appear in train.

Writes data/clean/{train,val,test}.jsonl (records carry their "source") and metrics/clean.json.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from pipeline import params as P
from pipeline.common import PipelineError, atomic_dir, read_json, read_jsonl, run_main, write_json

RAW_DIR = Path("data/raw")
OUT_DIR = Path("data/clean")
METRICS = Path("metrics/clean.json")
SPLITS = ("train", "val", "test")
DROP_REASONS = ("empty", "too_short", "too_long", "length_ratio", "duplicate")

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


def clean_source(name: str, pairs: bool, c: P.Clean, seen: set, writers: dict) -> dict:
    """Clean one source's records into the split writers; return its counts."""
    kept = Counter()
    kept_bytes = Counter()
    dropped = Counter({r: 0 for r in DROP_REASONS})
    documents_in = 0
    for rec in read_jsonl(RAW_DIR / f"{name}.jsonl"):
        documents_in += 1
        if pairs:
            texts = [normalize(rec["src"], c.normalization, True), normalize(rec["tgt"], c.normalization, True)]
            # Exact duplicates on the pair, and on the source side alone.
            keys = [_key("pair", *texts), _key("src", texts[0])]
        else:
            texts = [normalize(rec["text"], c.normalization)]
            keys = [_key("text", texts[0])]
        reason = drop_reason(texts, c)
        if reason is None and any(k in seen for k in keys):
            reason = "duplicate"
        if reason:
            dropped[reason] += 1
            continue
        seen.update(keys)
        split = split_of(texts[0], c)
        out = {"source": name, **({"src": texts[0], "tgt": texts[1]} if pairs else {"text": texts[0]})}
        writers[split].write(json.dumps(out, ensure_ascii=False) + "\n")
        kept[split] += 1
        kept_bytes[split] += sum(len(t.encode("utf-8")) for t in texts)
    return {
        "documents_in": documents_in,
        "documents_kept": sum(kept.values()),
        "bytes_kept": sum(kept_bytes.values()),
        "dropped": dict(dropped),
        "splits": {s: {"documents": kept[s], "bytes": kept_bytes[s]} for s in SPLITS},
    }


def main() -> None:
    c = P.load().clean
    manifest = read_json(RAW_DIR / "manifest.json")
    per_source = {}
    with atomic_dir(OUT_DIR) as out:
        writers = {s: open(out / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        try:
            seen: set = set()
            for src in manifest["sources"]:
                per_source[src["name"]] = clean_source(src["name"], src["pairs"], c, seen, writers)
        finally:
            for w in writers.values():
                w.close()
        totals = {s: sum(m["splits"][s]["documents"] for m in per_source.values()) for s in SPLITS}
        if totals["train"] == 0:
            raise PipelineError("clean: no training documents left after cleaning "
                                f"(in: {sum(m['documents_in'] for m in per_source.values())}, "
                                f"dropped: {_sum_dropped(per_source)}); check clean.min_chars/max_chars and the sources")
        for s in ("val", "test"):
            if totals[s] == 0:
                raise PipelineError(f"clean: the {s} split is empty; the corpus is too small for "
                                    f"clean.{s}_fraction, raise it or add text")
    metrics = {
        "documents_kept": sum(m["documents_kept"] for m in per_source.values()),
        "bytes_kept": sum(m["bytes_kept"] for m in per_source.values()),
        "dropped": _sum_dropped(per_source),
        "splits": totals,
        "sources": per_source,
    }
    write_json(METRICS, metrics)
    print(f"clean: kept {metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes), "
          f"dropped {metrics['dropped']}, splits {totals} -> {OUT_DIR}")


def _sum_dropped(per_source: dict) -> dict:
    total = Counter({r: 0 for r in DROP_REASONS})
    for m in per_source.values():
        total.update(m["dropped"])
    return dict(total)


if __name__ == "__main__":
    run_main(main)
