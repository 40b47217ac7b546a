"""The shard protocol of the clean stage: JSON lines read in shards of whole lines (read_shards), a
pool of worker processes that prepares them and gives the results back in input order (Pool), the
work done on a shard (prepare_shard: normalise, remove lines, scrub, filter, identify the
language, split, hash; ngram_shard: which train documents share an n-gram with val/test), and the
small named types that cross between the processes (Shard, Dropped, Candidate, PreparedShard,
CheckedTrainShard).

Workers decide nothing that depends on another document: the main process does, in input order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core import params as P
from pipeline.core.common import PipelineError, json_line, text_fields
from pipeline.data.dedup import MinHasher, Words, text_key
from pipeline.data.language import identify
from pipeline.data.pool import Lines, read_lines
from pipeline.data.pool import Pool as TaskPool
from pipeline.data.qa import passage_items
from pipeline.data.rules import drop_reason, normalize, quality_reason, scrub_pii, split_of
from pipeline.data.web_rules import Blocklist, has_lorem_ipsum, punctuated_share, remove_lines

Shard = Lines  # whole JSON lines of one file, about clean_run.shard_bytes of them


class Dropped(NamedTuple):
    """A record that a rule dropped."""

    reason: str
    texts: list[str]  # its texts, 300 characters at most (normalised, unless that emptied all), for the report


class Candidate(NamedTuple):
    """A record that passed the rules; the main process decides whether it repeats an earlier one."""

    line: bytes  # its line of data/clean/<split>.jsonl, newline included
    split: str
    keys: tuple[int, ...]  # exact-duplicate keys: of the text; for pairs, of the pair and of the source side
    text_bytes: int  # bytes of its texts in UTF-8
    chars: int  # characters of its texts
    languages: tuple[str, ...]  # with language_id: a document's identified language, a pair's two; else ()


class PreparedShard(NamedTuple):
    """What the main process needs of one shard of a source to decide, in order."""

    documents_in: int
    bytes_in: int
    lengths_in: Counter  # characters of a document's texts: documents
    pii: Counter  # PII kind: replacements
    lines_removed: Counter  # "javascript" / "cookie": lines removed from documents
    records: list[Dropped | Candidate]  # in input order
    # Row k is the k-th Candidate of records (None when not computed):
    bands: np.ndarray | None  # (candidates, bands) LSH band keys of the source side, with near_dup
    signatures: np.ndarray | None  # (candidates, minhash_perm) uint8: the low byte of each MinHash value
    heldout_ngrams: np.ndarray | None  # n-gram hashes of the val and test candidates, row after row
    heldout_ends: np.ndarray | None  # row k's: heldout_ngrams[heldout_ends[k - 1]:heldout_ends[k]]


class CheckedTrainShard(NamedTuple):
    """A shard of train, checked against the n-grams of val and test."""

    contaminated: np.ndarray  # bool, one per line
    lines: list[bytes]  # its records' lines, newline included


def read_shards(path: Path, shard_bytes: int) -> Iterator[Shard]:
    """Shards of whole lines of about shard_bytes."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing (run the collect stage first: dvc repro)")
    yield from read_lines(path, shard_bytes)


class Pool(TaskPool):
    """Shards to workers that know the clean settings (and val/test's n-grams, for decontamination;
    the URL blocklist read from clean.url_blocklist, for prepare_shard), results back in order;
    `run` (clean_run) sizes the shards and the pool, `executor` (data_run) says where it runs."""

    def __init__(
        self,
        settings: P.Clean,
        run: P.CleanRun,
        heldout_ngrams: np.ndarray | None = None,
        blocklist: Blocklist | None = None,
        executor: P.DataRun | None = None,
    ):
        super().__init__(run.workers, _init_worker, (settings, heldout_ngrams, blocklist), executor)
        self.shard_bytes = run.shard_bytes


# --- Workers: a shard of JSON lines in, everything the main process needs to decide out. ---

_WORKER: dict = {}
_json_str = (
    json.encoder.encode_basestring
)  # a str as a JSON string literal, as json.dumps(ensure_ascii=False) writes it


def _init_worker(settings: P.Clean, heldout_ngrams: np.ndarray | None, blocklist: Blocklist | None) -> None:
    _WORKER.update(
        settings=settings,
        minhash=MinHasher(settings) if settings.near_dup else None,
        heldout_ngrams=heldout_ngrams,
        blocklist=blocklist,
    )


def _lines(shard: Shard) -> Iterator[tuple[int, bytes, dict]]:
    for i, line in enumerate(shard.chunk.split(b"\n"), shard.first_line):
        if line.strip():
            yield i, line, json_line(line, shard.path, i)


def prepare_shard(
    shard: Shard,
    name: str,
    pairs: bool,
    tgt_lang: str = "",
    task: str = "",
    keep_origin: bool = False,
    languages: tuple[str, ...] = (),
) -> PreparedShard:
    """Normalise, scrub, filter and hash one shard of a source's records: counts, the records in
    order (Dropped, or Candidate with its line, split and keys), and for the candidates, row by row:
    LSH band keys and 1-byte signatures, and the n-gram hashes of val and test. A record keeps its
    "meta" and, with `keep_origin`, its "origin" file (the default QA set asks about them); a QA
    pair (`task`) keeps the lines of its passage and question. With clean.language_id, the
    source's `languages` are those its documents (any of them) or pairs (source, target) must be in."""
    settings, minhash = _WORKER["settings"], _WORKER["minhash"]
    documents_in = bytes_in = 0
    lengths_in, pii, lines_removed, records = Counter(), Counter(), Counter(), []
    passed = []  # (split, texts) of the documents that pass the filters
    for i, _, rec in _lines(shard):
        raw_texts = _raw_texts(rec, pairs, shard.path, i)
        documents_in += 1
        bytes_in += sum(len(t.encode("utf-8")) for t in raw_texts)
        lengths_in[sum(map(len, raw_texts))] += 1
        texts, reason = _filtered(rec, raw_texts, settings, pairs, task, pii, lines_removed)
        identified = None  # a document's (language, score)
        if reason is None and settings.language_id and not task:
            identified, reason = _language(texts, pairs, languages, settings.min_language_score)
        if reason:
            records.append(Dropped(reason, [t[:300] for t in (texts if any(texts) else raw_texts)]))
            continue
        split = split_of(texts[0], settings)
        records.append(
            Candidate(
                _clean_line(rec, texts, name, pairs, tgt_lang, task, keep_origin, identified),
                split,
                _exact_keys(texts, pairs, tgt_lang, task),
                sum(len(t.encode("utf-8")) for t in texts),
                sum(map(len, texts)),
                (identified[0],) if identified else tuple(languages) if pairs and settings.language_id else (),
            )
        )
        passed.append((split, texts))
    bands, signatures, heldout_ngrams, heldout_ends = _shard_hashes(passed, settings, minhash, tgt_lang)
    return PreparedShard(
        documents_in=documents_in,
        bytes_in=bytes_in,
        lengths_in=lengths_in,
        pii=pii,
        lines_removed=lines_removed,
        records=records,
        bands=bands,
        signatures=signatures,
        heldout_ngrams=heldout_ngrams,
        heldout_ends=heldout_ends,
    )


def _raw_texts(rec: dict, pairs: bool, path: str, i: int) -> list[str]:
    """A record's texts as they came: [src, tgt] of a pair, else [text]."""
    try:
        return [rec["src"], rec["tgt"]] if pairs else [rec["text"]]
    except (KeyError, TypeError):
        raise PipelineError(f"{path}:{i}: expected a {'src/tgt pair' if pairs else 'text'} record") from None


def _filtered(
    rec: dict, raw_texts: list[str], settings: P.Clean, pairs: bool, task: str, pii: Counter, removed: Counter
) -> tuple[list[str], str | None]:
    """A record's texts normalised, stripped of the lines the web's filters remove (a document's;
    counted in `removed`) and scrubbed (counting PII in `pii`), and the rule that drops them, if any:
    the length rules, then for documents the web's (URL, lorem ipsum, punctuation), then quality."""
    texts = [normalize(t, settings.normalization, pairs and not task) for t in raw_texts]
    if not pairs and (settings.drop_javascript_lines or settings.drop_cookie_lines):
        texts = [remove_lines(texts[0], settings.drop_javascript_lines, settings.drop_cookie_lines, removed)]
    if settings.scrub_pii:
        texts = [scrub_pii(t, pii) for t in texts]
    reason = drop_reason(texts, settings, qa=bool(task))
    if reason is None and not pairs:
        reason = _web_reason(rec, texts[0], settings)
    if reason is None and settings.quality_filters and not pairs:
        reason = quality_reason(texts[0], settings)
    return texts, reason


def _web_reason(rec: dict, text: str, settings: P.Clean) -> str | None:
    """The first of the web's rules that drops a document: its meta url is blocked, it holds lorem
    ipsum, too few of its lines end in terminal punctuation."""
    blocklist = _WORKER["blocklist"]
    if blocklist is not None:
        url = rec["meta"].get("url") if isinstance(rec.get("meta"), dict) else None
        if isinstance(url, str) and url and blocklist.blocks(url):
            return "url_blocked"
    if settings.drop_lorem_ipsum and has_lorem_ipsum(text):
        return "lorem_ipsum"
    if settings.min_punctuated_lines and punctuated_share(text) < settings.min_punctuated_lines:
        return "punctuated_lines"
    return None


def _language(
    texts: list[str], pairs: bool, languages: tuple[str, ...], min_score: float
) -> tuple[tuple[str, float] | None, str | None]:
    """Language identification: a document's (language, score), and "language" when a record is not
    in its source's languages with at least `min_score` (a document: any of them; a pair: each side
    its own). Pairs of a source without languages are not identified."""
    if pairs:
        for text, code in zip(texts, languages):
            found, score = identify(text)
            if found != code or score < min_score:
                return None, "language"
        return None, None
    found, score = identify(texts[0])
    if languages and (found not in languages or score < min_score):
        return None, "language"
    return (found, score), None


def _clean_line(
    rec: dict,
    texts: list[str],
    name: str,
    pairs: bool,
    tgt_lang: str,
    task: str,
    keep_origin: bool,
    identified: tuple[str, float] | None = None,
) -> bytes:
    """A passing record's line of data/clean/<split>.jsonl, newline included; a document whose
    language was identified carries it ("lang") and its score ("lang_score")."""
    # json.dumps({"source": name, "text": ...}, ensure_ascii=False), without building the dict
    fields = (
        f'"src": {_json_str(texts[0])}, "tgt": {_json_str(texts[1])}' if pairs else f'"text": {_json_str(texts[0])}'
    )
    if tgt_lang:
        fields += f', "tgt_lang": {_json_str(tgt_lang)}'
    if task:
        fields += f', "task": {_json_str(task)}'
    if identified:
        fields += f', "lang": {_json_str(identified[0])}, "lang_score": {json.dumps(identified[1])}'
    if keep_origin and isinstance(rec.get("origin"), str):
        fields += f', "origin": {_json_str(rec["origin"])}'
    if isinstance(rec.get("meta"), dict):
        fields += f', "meta": {json.dumps(rec["meta"], ensure_ascii=False, sort_keys=True)}'
    return f'{{"source": {_json_str(name)}, {fields}}}\n'.encode()


def _exact_keys(texts: list[str], pairs: bool, tgt_lang: str, task: str) -> tuple[int, ...]:
    """A passing record's exact-duplicate keys: of its text, or of a pair and of its source side."""
    if not pairs:
        return (text_key("text", texts[0]),)
    # the source side alone per target language: one sentence translated into several languages
    # is several directions, not duplicates
    return (
        text_key("pair", *texts),
        text_key("src", tgt_lang or task, texts[0]) if tgt_lang or task else text_key("src", texts[0]),
    )


def _shard_hashes(
    passed: list[tuple[str, list[str]]], settings: P.Clean, minhash: MinHasher | None, tgt_lang: str
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The shard's candidates hashed at once: LSH band keys and 1-byte signatures (of the source
    side, with near_dup), and the n-gram hashes of val and test (all sides) with each row's end."""
    bands = signatures = heldout_ngrams = heldout_ends = None
    ngram = settings.decontaminate_ngram
    heldout_texts = [(k, t) for k, (split, texts) in enumerate(passed) if ngram and split != "train" for t in texts]
    if minhash or heldout_texts:
        sources = [texts[0] for _, texts in passed] if minhash else []
        words = Words(sources + [t for _, t in heldout_texts])
        if minhash:
            sig = minhash.signatures(words)[: len(sources)]
            bands, signatures = minhash.band_keys(sig), (sig & 0xFF).astype(np.uint8)
            if tgt_lang:  # near duplicates within a direction: other directions of the same text are not
                bands ^= np.uint64(text_key("lang", tgt_lang))
        if heldout_texts:
            hashes, owner = words.ngrams(ngram)  # in text order, so each row's n-grams are contiguous
            mine = owner >= len(sources)
            row_of_text = np.array([k for k, _ in heldout_texts], np.int64)
            heldout_ngrams = hashes[mine]
            counts = np.bincount(row_of_text[owner[mine] - len(sources)], minlength=len(passed))
            heldout_ends = np.cumsum(counts)
    return bands, signatures, heldout_ngrams, heldout_ends


def qa_shard(shard: Shard, titles: dict, templates: list[str]) -> list[dict]:
    """The default QA set's candidate items that one shard of a split file offers, in order (the
    records of QA sources offer none)."""
    return [item for _, _, rec in _lines(shard) if "task" not in rec for item in passage_items(rec, titles, templates)]


def ngram_shard(shard: Shard) -> CheckedTrainShard:
    """Each record of a shard of train (its line), and which of them share an n-gram with val/test."""
    ngram, heldout_ngrams = _WORKER["settings"].decontaminate_ngram, _WORKER["heldout_ngrams"]
    lines, texts, record_of = [], [], []
    for _, line, rec in _lines(shard):
        for k in text_fields(rec):
            texts.append(rec[k])
            record_of.append(len(lines))
        lines.append(line + b"\n")
    hashes, owner = Words(texts).ngrams(ngram)
    bad = np.zeros(len(lines), bool)
    if len(heldout_ngrams) and len(hashes):
        pos = np.minimum(np.searchsorted(heldout_ngrams, hashes), len(heldout_ngrams) - 1)
        bad[np.array(record_of, np.int64)[owner[heldout_ngrams[pos] == hashes]]] = True
    return CheckedTrainShard(bad, lines)
