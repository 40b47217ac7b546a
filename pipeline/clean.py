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

Scale: each source's JSON lines are read in shards of about clean.shard_bytes and prepared by a
pool of clean.workers processes (normalising, scrubbing, filtering, hashing); the main process
takes the shards back in order and alone decides duplicates and writes, so the output is
byte-identical for any number of workers, and memory does not grow with the corpus except for
the indexes:
- exact duplicates: a 64-bit key per kept document (two for pairs), 12 bytes each;
- near-duplicates: one 64-bit key per LSH band (9 bands at the defaults) and a 1-byte-per-
  permutation signature: about 240 bytes per kept document at the defaults;
- decontamination: a 64-bit hash per n-gram of val and test (about 8 bytes per word of them).
Keys wait in a small dict (at most 2**17) before becoming a sorted run; runs merge log-structured.
"""
from __future__ import annotations

import functools
import hashlib
import html
import json
import multiprocessing
import os
import random
import re
import sys
import unicodedata
import zlib
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline import params as P
from pipeline.common import (PipelineError, atomic_dir, atomic_write_text, json_line, read_json, run_main, text_fields,
                             utf8_bytes, write_json)

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
_DIGIT = re.compile(r"\d")

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SPACES = re.compile(r"[^\S\n]+")
_SPACED_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_NOT_LETTERS = re.compile(r"[\W\d_]+")
_NOT_ASCII_LETTERS = bytes(b for b in range(128) if not chr(b).isalpha())


@functools.cache
def _invisible() -> re.Pattern:
    """Cc (control characters: NUL, escapes...) and Cf (invisible format characters: BOM, zero-width),
    except newline and tab. (U+2581 goes too: sentencepiece uses it to stand for a space.)"""
    chars = [chr(i) for i in range(sys.maxunicode + 1)
             if unicodedata.category(chr(i)) in ("Cc", "Cf") and chr(i) not in "\n\t"]
    return re.compile("[" + "".join(re.escape(ch) for ch in chars) + "]+")


def normalize(text: str, form: str = "NFC", single_line: bool = False) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "&" in text:
        text = html.unescape(text)
    if "<" in text:
        text = _TAG.sub("", text)
    # The common case, checked at C speed: no control, format or unusual space characters.
    plain = text.replace("\n", "").replace("\t", " ").isprintable()
    if not plain:  # removed before composing, so "e", ZWSP, U+0301 still becomes one NFC character
        text = _invisible().sub("", text)
    if "\u2581" in text:
        text = text.replace("\u2581", "")
    if not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    if single_line:
        text = text.replace("\n", " ")
    if not plain or "\t" in text or "  " in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _SPACED_NEWLINE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def split_of(key: str, c: P.Clean) -> str:
    """Deterministic split from a hash of the normalised key text."""
    digest = hashlib.blake2b(f"{c.split_salt}\0{key}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < c.test_fraction:
        return "test"
    if u < c.test_fraction + c.val_fraction:
        return "val"
    return "train"


def _key(*parts: str) -> int:
    """A 64-bit digest stands for the text in the duplicate index."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers (9 to 15 digits) with placeholders."""
    if "@" in text:
        text, n = PII["email"].subn("[EMAIL]", text)
        counts["email"] += n
    if text.isascii():  # ten substring searches beat one regex scan
        digits = any(d in text for d in "0123456789")
    else:
        digits = _DIGIT.search(text) is not None
    if digits or text.count(":") >= 7:  # IPv4 has digits, IPv6 seven colons
        text, n = PII["ip"].subn("[IP]", text)
        counts["ip"] += n
    if not digits:
        return text

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
    non_space = sum(map(len, words))
    if text.isascii():
        letters = len(text.encode("ascii").translate(None, _NOT_ASCII_LETTERS))
    else:
        letters = len(_NOT_LETTERS.sub("", text))  # letters (and non-decimal numerals such as "½")
    if letters < c.min_alpha_fraction * non_space:
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


_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mod 2**64 is a bijection


def row_hashes(m: np.ndarray, start: np.ndarray | int = 0) -> np.ndarray:
    """One 64-bit hash per row of a uint64 matrix: a polynomial in _MUL, wrapping mod 2**64."""
    h = np.zeros(m.shape[:-1], np.uint64) + np.asarray(start, np.uint64)
    for j in range(m.shape[-1]):
        h = h * _MUL + m[..., j]
    return h


class Words:
    """The words of many texts (CRC-32 of each lower-cased, whitespace-separated word; clean has
    made every space ' ' or '\n'), concatenated, so that a whole shard is hashed in a few numpy calls."""

    def __init__(self, texts: list[str]):
        words, ends = [], []
        for t in texts:
            words.extend(map(zlib.crc32, t.lower().encode("utf-8").split()))
            ends.append(len(words))
        self.words = np.array(words, np.uint64)
        self.counts = np.diff(np.array([0, *ends], np.int64))
        self.owner = np.repeat(np.arange(len(texts)), self.counts)  # the text each word is in

    def ngrams(self, n: int, short: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of every n-word window within one text, and the text it is in. With `short`, a
        text of fewer than n words has one window: all its words."""
        hashes, owners = np.empty(0, np.uint64), np.empty(0, np.int64)
        if len(self.words) >= n:
            windows = np.lib.stride_tricks.sliding_window_view(self.words, n)
            inside = self.owner[:len(windows)] == self.owner[n - 1:]
            hashes, owners = row_hashes(windows)[inside], self.owner[:len(windows)][inside]
        if short and (self.counts < n).any():
            ends = np.cumsum(self.counts)
            few = [(i, row_hashes(self.words[ends[i] - c:ends[i]][None, :])[0])
                   for i, c in enumerate(self.counts.tolist()) if 0 < c < n]
            hashes = np.concatenate([hashes, np.array([h for _, h in few], np.uint64)])
            owners = np.concatenate([owners, np.array([i for i, _ in few], np.int64)])
        return hashes, owners


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's affine32 scheme applies it."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures of word shingles, many documents at a time, and their LSH band keys.

    The permutations and the "affine32" scheme are datasketch's (a test checks that a signature
    equals datasketch's MinHash of the same shingles); datasketch also picks the (bands, rows)
    split for the threshold. Shingle hashes are the top 32 bits of the 64-bit window hashes.
    """
    ROWS = 1 << 14  # shingles per step: a ROWS x num_perm matrix of uint32

    def __init__(self, c: P.Clean):
        from datasketch import MinHash, MinHashLSH

        self.k = c.shingle_words
        self.a, self.b = MinHash(num_perm=c.minhash_perm, seed=c.minhash_seed, scheme="affine32").permutations
        lsh = MinHashLSH(threshold=c.near_dup_threshold, num_perm=c.minhash_perm)
        self.bands, self.rows = lsh.b, lsh.r

    def signatures(self, words: Words) -> np.ndarray:
        """(texts, num_perm) uint32 signatures."""
        shingles, owner = words.ngrams(self.k, short=True)
        if len(owner) and (owner[1:] < owner[:-1]).any():  # short texts' shingles come last
            order = np.argsort(owner, kind="stable")
            shingles, owner = shingles[order], owner[order]
        shingles = _fmix32((shingles >> np.uint64(32)).astype(np.uint32))
        sig = np.full((len(words.counts), len(self.a)), np.iinfo(np.uint32).max, np.uint32)
        a, b = self.a[:, None], self.b[:, None]
        for s in range(0, len(shingles), self.ROWS):
            ids = owner[s:s + self.ROWS]
            permuted = a * shingles[None, s:s + self.ROWS] + b  # (num_perm, shingles): rows reduce fastest
            firsts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
            sig[ids[firsts]] = np.minimum(sig[ids[firsts]], np.minimum.reduceat(permuted, firsts, axis=1).T)
        return sig

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(texts, bands) 64-bit keys, one per band of rows of each signature."""
        rows = sig[:, :self.bands * self.rows].astype(np.uint64).reshape(len(sig), self.bands, self.rows)
        return row_hashes(rows, start=np.arange(1, self.bands + 1, dtype=np.uint64))


class KeyIndex:
    """64-bit keys, each with the number of the first document that had it: a dict of recent keys,
    turned every FLUSH keys into a sorted run (12 bytes a key). Runs of similar size are merged, as
    in a log-structured merge tree, so there are about log2(keys / FLUSH) of them and each key is
    copied that many times, not once per flush."""

    FLUSH = 1 << 17

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, values), largest first
        self.recent: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs) + len(self.recent)

    def lookup(self, keys) -> np.ndarray:
        """The values of keys in the sorted runs (-1 where absent); check .recent for the rest."""
        keys = np.asarray(keys, np.uint64)
        flat = keys.ravel()
        order = np.argsort(flat)
        needles = flat[order]  # sorted, binary searches walk the run in order: ~4x faster
        found = np.full(len(flat), -1, np.int64)
        for run, values in self.runs:  # a key is in one run at most
            pos = np.minimum(np.searchsorted(run, needles), len(run) - 1)
            hit = run[pos] == needles
            found[order[hit]] = values[pos[hit]]
        return found.reshape(keys.shape)

    def add(self, key: int, value: int) -> None:
        """Add a key that lookup() did not find (a key already in .recent keeps its value)."""
        self.recent.setdefault(key, value)

    def flush(self) -> None:
        if len(self.recent) < self.FLUSH:
            return
        keys = np.fromiter(self.recent.keys(), np.uint64, len(self.recent))
        values = np.fromiter(self.recent.values(), np.uint32, len(self.recent))
        order = np.argsort(keys)
        self.runs.append((keys[order], values[order]))
        self.recent = {}
        while len(self.runs) > 1 and len(self.runs[-1][0]) * 2 > len(self.runs[-2][0]):
            (k1, v1), (k2, v2) = self.runs.pop(), self.runs.pop()
            keys, values = np.concatenate([k2, k1]), np.concatenate([v2, v1])
            order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
            self.runs.append((keys[order], values[order]))


class NearDuplicates:
    """LSH over MinHash band keys; a candidate sharing a band is confirmed by the estimated Jaccard
    similarity of 1-byte signatures (the low byte of each hash value, corrected for chance matches)."""

    CHUNK = 1 << 14

    def __init__(self, c: P.Clean):
        self.threshold = c.near_dup_threshold
        self.perm = c.minhash_perm
        self.bands = KeyIndex()
        self.signatures: list[np.ndarray] = []  # chunks of CHUNK rows of uint8
        self.kept = 0
        self.cluster_of: dict[int, int] = {}  # kept document -> number of near-duplicates dropped for it

    def _signature(self, i: int) -> np.ndarray:
        return self.signatures[i // self.CHUNK][i % self.CHUNK]

    def seen(self, bands: np.ndarray, merged: np.ndarray, signature: np.ndarray) -> bool:
        """Is this document (its band keys, their lookup() in the merged index, its 1-byte signature)
        similar to one kept before? If not, it is kept and indexed."""
        keys, merged, recent = bands.tolist(), merged.tolist(), self.bands.recent
        candidates = [v for v in merged if v >= 0] + [v for b in keys if (v := recent.get(b)) is not None]
        for i in sorted(set(candidates)):
            agree = np.count_nonzero(self._signature(i) == signature) / self.perm
            if (agree - 1 / 256) / (1 - 1 / 256) >= self.threshold:
                self.cluster_of[i] = self.cluster_of.get(i, 0) + 1
                return True
        i = self.kept
        if i % self.CHUNK == 0:
            self.signatures.append(np.zeros((self.CHUNK, self.perm), np.uint8))
        self.signatures[-1][i % self.CHUNK] = signature
        for b, m in zip(keys, merged):  # a band key stays with the first document that had it
            if m < 0:
                recent.setdefault(b, i)
        self.kept += 1
        return False


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


# --- Workers: a shard of JSON lines in, everything the main process needs to decide out. ---

_WORKER: dict = {}
_json_str = json.encoder.encode_basestring  # a str as a JSON string literal, as json.dumps(ensure_ascii=False) writes it


def _init_worker(c: P.Clean, held: np.ndarray | None) -> None:
    _WORKER.update(c=c, minhash=MinHasher(c) if c.near_dup else None, held=held)


def _lines(chunk: bytes, first_line: int, path: str) -> Iterator[tuple[int, bytes, dict]]:
    for i, line in enumerate(chunk.split(b"\n"), first_line):
        if line.strip():
            yield i, line, json_line(line, path, i)


def prepare_shard(chunk: bytes, first_line: int, path: str, name: str, pairs: bool) -> dict:
    """Normalise, scrub, filter and hash one shard of a source's records. Returns counts, the
    records in order (("reason", texts) if dropped, else (None, line, split, keys, bytes, length)),
    and for the records that passed, row by row: LSH band keys and 1-byte signatures, and the
    n-gram hashes of val and test (rows held[held_ends[k - 1]:held_ends[k]])."""
    c, minhash = _WORKER["c"], _WORKER["minhash"]
    out = {"documents_in": 0, "bytes_in": 0, "lengths_in": Counter(), "pii": Counter(), "records": [],
           "bands": None, "signatures": None, "held": None, "held_ends": None}
    passed = []  # (split, texts) of the documents that pass the filters
    for i, _, rec in _lines(chunk, first_line, path):
        try:
            raw_texts = [rec["src"], rec["tgt"]] if pairs else [rec["text"]]
        except (KeyError, TypeError):
            raise PipelineError(f"{path}:{i}: expected a {'src/tgt pair' if pairs else 'text'} record") from None
        out["documents_in"] += 1
        out["bytes_in"] += sum(len(t.encode("utf-8")) for t in raw_texts)
        out["lengths_in"][sum(map(len, raw_texts))] += 1
        texts = [normalize(t, c.normalization, pairs) for t in raw_texts]
        if c.scrub_pii:
            texts = [scrub_pii(t, out["pii"]) for t in texts]
        reason = drop_reason(texts, c)
        if reason is None and c.quality_filters and not pairs:
            reason = quality_reason(texts[0], c)
        if reason:
            out["records"].append((reason, [t[:300] for t in (texts if any(texts) else raw_texts)]))
            continue
        split = split_of(texts[0], c)
        # json.dumps({"source": name, "text": ...}, ensure_ascii=False), without building the dict
        fields = f'"src": {_json_str(texts[0])}, "tgt": {_json_str(texts[1])}' if pairs else f'"text": {_json_str(texts[0])}'
        out["records"].append((
            None, f'{{"source": {_json_str(name)}, {fields}}}\n'.encode("utf-8"), split,
            # exact duplicates: on the pair, and on the source side alone
            (_key("pair", *texts), _key("src", texts[0])) if pairs else (_key("text", texts[0]),),
            sum(len(t.encode("utf-8")) for t in texts), sum(map(len, texts))))
        passed.append((split, texts))
    # Shard-level hashing: near-duplicate signatures (source side), n-grams of val and test (all sides).
    n = c.decontaminate_ngram
    held = [(k, t) for k, (split, texts) in enumerate(passed) if n and split != "train" for t in texts]
    if minhash or held:
        sources = [texts[0] for _, texts in passed] if minhash else []
        words = Words(sources + [t for _, t in held])
        if minhash:
            sig = minhash.signatures(words)[:len(sources)]
            out["bands"], out["signatures"] = minhash.band_keys(sig), (sig & 0xFF).astype(np.uint8)
        if held:
            hashes, owner = words.ngrams(n)  # in text order, so each row's n-grams are contiguous
            mine = owner >= len(sources)
            row_of_text = np.array([k for k, _ in held], np.int64)
            out["held"] = hashes[mine]
            counts = np.bincount(row_of_text[owner[mine] - len(sources)], minlength=len(passed))
            out["held_ends"] = np.cumsum(counts)
    return out


def ngram_shard(chunk: bytes, first_line: int, path: str) -> tuple[np.ndarray, list[bytes]]:
    """Each record of a shard of train (its line), and which of them share an n-gram with val/test."""
    n, held = _WORKER["c"].decontaminate_ngram, _WORKER["held"]
    lines, texts, record_of = [], [], []
    for _, line, rec in _lines(chunk, first_line, path):
        for k in text_fields(rec):
            texts.append(rec[k])
            record_of.append(len(lines))
        lines.append(line + b"\n")
    hashes, owner = Words(texts).ngrams(n)
    bad = np.zeros(len(lines), bool)
    if len(held) and len(hashes):
        pos = np.minimum(np.searchsorted(held, hashes), len(held) - 1)
        bad[np.array(record_of, np.int64)[owner[held[pos] == hashes]]] = True
    return bad, lines


class Pool:
    """Shards to workers and results back in order, at most 2 per worker in flight (bounded memory).
    One worker: everything runs in this process."""

    def __init__(self, c: P.Clean, held: np.ndarray | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = c.workers or cores
        self.pool = None
        if self.workers == 1:
            _init_worker(c, held)
        else:  # on Linux, forked workers share `held` with this process (copy-on-write)
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(c, held))

    def map(self, fn, tasks) -> Iterator:
        if self.pool is None:
            yield from (fn(*t) for t in tasks)
            return
        pending: deque = deque()
        for t in tasks:
            pending.append(self.pool.apply_async(fn, t))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def shards(path: Path, shard_bytes: int, *extra) -> Iterator[tuple]:
    """(chunk of whole lines of about shard_bytes, its first line number, path, *extra)."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the collect stage first: dvc repro)")
    with open(path, "rb") as f:
        line = 1
        while chunk := f.read(shard_bytes):
            chunk += f.readline()
            yield chunk, line, str(path), *extra
            line += chunk.count(b"\n")


# --- The main process: decisions that depend on earlier documents, in input order. ---

class State:
    """What cleaning carries from document to document: indexes, counts, samples."""

    def __init__(self, c: P.Clean):
        self.exact = KeyIndex()
        self.documents = 0  # kept, numbering them for the exact index
        self.near = NearDuplicates(c) if c.near_dup else None
        self.heldout_ngrams: list[np.ndarray] = []  # n-gram hashes of val and test documents
        self.examples = Examples(c.report_examples)
        self.lengths: dict[str, dict[str, Counter]] = defaultdict(lambda: {"in": Counter(), "kept": Counter()})
        self.pii: Counter = Counter()


def clean_source(name: str, pairs: bool, c: P.Clean, state: State, pool: Pool, writers: dict) -> dict:
    """Clean one source's records into the split writers (train: a scratch file); return its counts."""
    kept = Counter()
    kept_bytes = Counter()
    dropped = Counter({r: 0 for r in DROP_REASONS})
    documents_in = bytes_in = 0
    pii = Counter()
    lengths = state.lengths[name]
    for shard in pool.map(prepare_shard, shards(RAW_DIR / f"{name}.jsonl", c.shard_bytes, name, pairs)):
        documents_in += shard["documents_in"]
        bytes_in += shard["bytes_in"]
        lengths["in"].update(shard["lengths_in"])
        pii.update(shard["pii"])
        records = shard["records"]
        passed = [r for r in records if r[0] is None]
        exact = state.exact.lookup([r[3] for r in passed]).tolist() if passed else None
        near = state.near.bands.lookup(shard["bands"]) if passed and state.near else None
        held_ends, held_rows = shard["held_ends"], []
        row = 0
        for r in records:
            if r[0]:  # dropped by a worker: r[1] holds the texts
                dropped[r[0]] += 1
                state.examples.add(r[0], name, r[1])
                continue
            _, line, split, keys, nbytes, length = r
            reason = None
            if any(v >= 0 for v in exact[row]) or any(k in state.exact.recent for k in keys):
                reason = "duplicate"
            elif state.near is not None and state.near.seen(shard["bands"][row], near[row], shard["signatures"][row]):
                reason = "near_duplicate"
            row += 1
            if reason:
                dropped[reason] += 1
                rec = json.loads(line)
                state.examples.add(reason, name, [rec[k] for k in text_fields(rec)])
                continue
            for k in keys:
                state.exact.add(k, state.documents)
            state.documents += 1
            if held_ends is not None and split != "train":
                held_rows.append(row - 1)
            writers[split].write(line)
            kept[split] += 1
            kept_bytes[split] += nbytes
            lengths["kept"][length] += 1
        if held_rows:
            starts = np.concatenate(([0], held_ends[:-1]))
            state.heldout_ngrams.append(np.concatenate([shard["held"][starts[k]:held_ends[k]] for k in held_rows]))
        state.exact.flush()
        if state.near:
            state.near.bands.flush()
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
    held = np.concatenate(state.heldout_ngrams) if state.heldout_ngrams else np.empty(0, np.uint64)
    state.heldout_ngrams = []
    held.sort()
    held = held[np.concatenate(([True], held[1:] != held[:-1]))] if len(held) else held
    removed = 0
    pool = Pool(c, held)
    try:
        with open(out / "train.jsonl", "wb") as train, open(out / "decontaminated.jsonl", "wb") as listed:
            for bad, lines in pool.map(ngram_shard, shards(scratch, c.shard_bytes)):
                for line, contaminated in zip(lines, bad.tolist()):
                    if not contaminated:
                        train.write(line)
                        continue
                    rec = json.loads(line)
                    removed += 1
                    m = per_source[rec["source"]]
                    size = utf8_bytes(rec)
                    m["dropped"]["contaminated"] += 1
                    m["documents_kept"] -= 1
                    m["bytes_kept"] -= size
                    m["splits"]["train"]["documents"] -= 1
                    m["splits"]["train"]["bytes"] -= size
                    state.examples.add("contaminated", rec["source"], [rec[k] for k in text_fields(rec)])
                    listed.write(line)
    finally:
        pool.close()
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
        writers = {"train": open(scratch, "wb"), **{s: open(out / f"{s}.jsonl", "wb") for s in ("val", "test")}}
        pool = Pool(c)
        try:
            for src in manifest["sources"]:
                per_source[src["name"]] = clean_source(src["name"], src["pairs"], c, state, pool, writers)
        finally:
            pool.close()
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
          f"dropped {dict((k, v) for k, v in metrics['dropped'].items() if v)}, splits {totals} -> {OUT_DIR} "
          f"({pool.workers} worker{'s' if pool.workers > 1 else ''})")


def quantiles(counts: Counter, qs: list[float]) -> list[float]:
    """np.quantile (linear) of the values that `counts` counts, without expanding them."""
    values = np.array(sorted(counts))
    ends = np.cumsum([counts[v] for v in values])
    n = int(ends[-1])

    def at(i: int) -> float:
        return float(values[np.searchsorted(ends, i, side="right")])
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(at(lo) + (pos - lo) * (at(hi) - at(lo)))
    return out


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
    qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    qrows = {}
    for name, ls in lengths.items():
        for which in ("in", "kept"):
            if ls[which]:
                qrows[f"{name}, {which}"] = {f"q{int(p * 100)}": int(v) for p, v in zip(qs, quantiles(ls[which], qs))}
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
