"""Hashing and the indexes that find duplicates: the 64-bit text key of exact duplicates, word
n-gram hashes of many texts at once (Words: MinHash shingles and decontamination n-grams),
MinHash signatures and their LSH band keys (MinHasher), a compact index of 64-bit keys (KeyIndex)
and the near-duplicate index built on it (NearDuplicates).
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from pipeline.core import params as P


def text_key(*parts: str) -> int:
    """A 64-bit digest stands for the text in the duplicate index."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mod 2**64 is a bijection


def row_hashes(matrix: np.ndarray, start: np.ndarray | int = 0) -> np.ndarray:
    """One 64-bit hash per row of a uint64 matrix: a polynomial in _MUL, wrapping mod 2**64."""
    h = np.zeros(matrix.shape[:-1], np.uint64) + np.asarray(start, np.uint64)
    for j in range(matrix.shape[-1]):
        h = h * _MUL + matrix[..., j]
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
            inside = self.owner[: len(windows)] == self.owner[n - 1 :]
            hashes, owners = row_hashes(windows)[inside], self.owner[: len(windows)][inside]
        if short and (self.counts < n).any():
            ends = np.cumsum(self.counts)
            few = [
                (i, row_hashes(self.words[ends[i] - c : ends[i]][None, :])[0])
                for i, c in enumerate(self.counts.tolist())
                if 0 < c < n
            ]
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

    def __init__(self, settings: P.Clean):
        from datasketch import MinHash, MinHashLSH

        self.shingle_words = settings.shingle_words
        self.a, self.b = MinHash(
            num_perm=settings.minhash_perm, seed=settings.minhash_seed, scheme="affine32"
        ).permutations
        lsh = MinHashLSH(threshold=settings.near_dup_threshold, num_perm=settings.minhash_perm)
        self.bands, self.rows = lsh.b, lsh.r

    def signatures(self, words: Words) -> np.ndarray:
        """(texts, num_perm) uint32 signatures."""
        shingles, owner = words.ngrams(self.shingle_words, short=True)
        if len(owner) and (owner[1:] < owner[:-1]).any():  # short texts' shingles come last
            order = np.argsort(owner, kind="stable")
            shingles, owner = shingles[order], owner[order]
        shingles = _fmix32((shingles >> np.uint64(32)).astype(np.uint32))
        sig = np.full((len(words.counts), len(self.a)), np.iinfo(np.uint32).max, np.uint32)
        a, b = self.a[:, None], self.b[:, None]
        for s in range(0, len(shingles), self.ROWS):
            ids = owner[s : s + self.ROWS]
            permuted = a * shingles[None, s : s + self.ROWS] + b  # (num_perm, shingles): rows reduce fastest
            firsts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
            sig[ids[firsts]] = np.minimum(sig[ids[firsts]], np.minimum.reduceat(permuted, firsts, axis=1).T)
        return sig

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(texts, bands) 64-bit keys, one per band of rows of each signature."""
        rows = sig[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sig), self.bands, self.rows)
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

    def __init__(self, settings: P.Clean):
        self.threshold = settings.near_dup_threshold
        self.perm = settings.minhash_perm
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
        for key, found in zip(keys, merged):  # a band key stays with the first document that had it
            if found < 0:
                recent.setdefault(key, i)
        self.kept += 1
        return False
