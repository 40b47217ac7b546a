"""pipeline.data.shards, in this process: read_shards cuts a JSON lines file at line boundaries
only, prepare_shard's results do not depend on the shard size or the number of workers, the pool
keeps a bounded number of shards in flight, and what prepare_shard and ngram_shard say of each
record (its clean line, counts, keys, hashes).

tests/test_clean_scale.py runs the clean command with several workers and shard sizes; these tests
pin the protocol itself on a few dozen hand-made records in English, Russian and Chinese."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import params as P
from pipeline.core.common import PipelineError
from pipeline.data.dedup import text_key
from pipeline.data.shards import Candidate, Dropped, Pool, Shard, ngram_shard, prepare_shard, read_shards

SETTINGS = dataclasses.replace(
    P.Clean(), near_dup=True, decontaminate_ngram=3, val_fraction=0.3, test_fraction=0.3, minhash_perm=32
)
PLAIN = dataclasses.replace(P.Clean(), near_dup=False, decontaminate_ngram=0)

TEXTS = [
    "Shall I compare thee to a summer's day?",
    "В начале сотворил Бог небо и землю.",
    "资源类型是什么？这是一个中文句子，没有空格。",
    'Quotes "inside", a back\\slash and a second\nline of the same document.',
    "Emoji 🙂 and accents: café, naïve, Ёлка.",
    "ab",  # too short
    "  \u200b  ",  # nothing left once normalised
    "Write to ivan.petrov@example.com or call +7 495 123-45-67 today.",
    "x" * 400,
]
LINES = ["Rough winds do shake the darling buds of May", "И сказал Бог: да будет свет.", "北京是中国的首都。"]
FILLER = [f"{i}: {LINES[i % 3]}" for i in range(40)]


def write_lines(path: Path, records: list, final_newline: bool = True, blank_every: int = 0, crlf_at: int = -1) -> Path:
    """A JSON lines file of `records` (a str record is written as is), with a blank line every
    `blank_every` records and a CRLF line ending at `crlf_at`."""
    lines = []
    for i, r in enumerate(records):
        lines.append((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + ("\r" if i == crlf_at else ""))
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
    path.write_bytes(("\n".join(lines) + ("\n" if final_newline else "")).encode("utf-8"))
    return path


def corpus(path: Path, **kw) -> Path:
    return write_lines(path, [{"text": t} for t in TEXTS + FILLER], blank_every=7, crlf_at=3, **kw)


def pool(settings: P.Clean = SETTINGS, workers: int = 1, shard_bytes: int = 4_000_000, heldout=None) -> Pool:
    return Pool(settings, dataclasses.replace(P.CleanRun(), workers=workers, shard_bytes=shard_bytes), heldout)


def prepared(path: Path, workers: int, shard_bytes: int, settings: P.Clean = SETTINGS) -> list:
    p = pool(settings, workers, shard_bytes)
    try:
        return list(p.map(prepare_shard, read_shards(path, p.shard_bytes), "docs", False))
    finally:
        p.close()


# --- read_shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("shard_bytes", [1, 2, 3, 7, 100, 1000, 10**7])
def test_shards_are_whole_lines_covering_the_file_once_in_order(tmp_path, shard_bytes, final_newline):
    path = corpus(tmp_path / "docs.jsonl", final_newline=final_newline)
    data = path.read_bytes()
    shards = list(read_shards(path, shard_bytes))
    assert b"".join(s.chunk for s in shards) == data
    line = 1
    for k, s in enumerate(shards):
        last = k == len(shards) - 1
        assert s.path == str(path) and s.first_line == line
        assert s.chunk.endswith(b"\n") or (last and not final_newline)
        s.chunk.decode("utf-8")  # cut between lines, so never inside a Russian or Chinese character
        # about shard_bytes: what was read, then the rest of the line it ended in (at most one line)
        assert len(s.chunk) >= shard_bytes or last
        assert b"\n" not in s.chunk[shard_bytes:-1]
        line += s.chunk.count(b"\n")
    if shard_bytes >= len(data):
        assert len(shards) == 1


def test_an_empty_file_has_no_shards_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(read_shards(tmp_path / "empty.jsonl", 10)) == []
    with pytest.raises(PipelineError, match=r"nowhere\.jsonl: missing"):
        list(read_shards(tmp_path / "nowhere.jsonl", 10))


# --- the same results for any shard size and number of workers --------------------------------------


def per_document(results: list) -> dict:
    """What the shards say of the documents, shard by shard joined: independent of the sharding."""
    candidates = [r for res in results for r in res.records if isinstance(r, Candidate)]
    heldout = []  # each candidate's n-gram hashes (none for train's, or when its shard has no val/test)
    for res in results:
        rows = sum(isinstance(r, Candidate) for r in res.records)
        if res.heldout_ends is None:
            heldout += [()] * rows
            continue
        ends = res.heldout_ends.tolist()
        assert len(ends) == rows
        heldout += [tuple(res.heldout_ngrams[a:b].tolist()) for a, b in zip([0, *ends[:-1]], ends)]
    arrays = {
        name: [row.tolist() for res in results if getattr(res, name) is not None for row in getattr(res, name)]
        for name in ("bands", "signatures")
    }
    return {
        "records": [r for res in results for r in res.records],
        "documents_in": sum(r.documents_in for r in results),
        "bytes_in": sum(r.bytes_in for r in results),
        "lengths_in": sum((r.lengths_in for r in results), Counter()),
        "pii": sum((r.pii for r in results), Counter()),
        "heldout": heldout,
        **arrays,
        "rows": len(candidates),
    }


def test_one_worker_or_two_and_any_shard_size_give_the_same_results(tmp_path):
    path = corpus(tmp_path / "docs.jsonl", final_newline=False)
    reference = per_document(prepared(path, 1, 10**7))
    assert reference["rows"] == len(reference["signatures"]) == len(reference["bands"]) == len(reference["heldout"])
    assert any(reference["heldout"]) and not all(reference["heldout"])  # val/test rows have n-grams, train's none
    for workers, shard_bytes in ((1, 64), (2, 64), (2, 1), (2, 10**7)):
        assert per_document(prepared(path, workers, shard_bytes)) == reference, (workers, shard_bytes)


def test_without_near_duplicates_or_decontamination_no_hashes_are_computed(tmp_path):
    path = corpus(tmp_path / "docs.jsonl")
    (shard,) = prepared(path, 1, 10**7, settings=PLAIN)
    assert shard.bands is shard.signatures is shard.heldout_ngrams is shard.heldout_ends is None


def shard_length(shard) -> int:
    return len(shard.chunk)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pool_keeps_at_most_two_shards_per_worker_in_flight(tmp_path, workers):
    """An endless input: results come back in order while only a few shards have been read."""
    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield Shard(b"x" * (i % 5 + 1) + b"\n", i + 1, "endless")

    p = pool(PLAIN, workers)
    try:
        got = list(itertools.islice(p.map(shard_length, endless()), 6))
    finally:
        p.close()
    assert got == [i % 5 + 2 for i in range(6)]
    assert len(read) <= 6 + (0 if workers == 1 else 2 * workers)


def test_a_bad_line_in_a_workers_shard_is_an_error_naming_its_file_and_line(tmp_path):
    records = [{"text": t} for t in FILLER]
    records[30] = '{"text": "cut off'
    path = write_lines(tmp_path / "docs.jsonl", records, blank_every=4)  # line 38 (7 blank lines before it)
    with pytest.raises(PipelineError) as info:
        prepared(path, 2, 50)
    assert str(info.value) == f"{path}:38: not valid JSON"


@pytest.mark.parametrize(
    "pairs, record, expected",
    [(False, {"txt": "a b c"}, "expected a text record"), (True, {"src": "a b c"}, "expected a src/tgt pair record")],
)
def test_a_record_without_its_text_is_an_error_naming_its_line(tmp_path, pairs, record, expected):
    records = [{"text": "filler text"} if not pairs else {"src": "one two", "tgt": "раз два"}] * 5 + [record]
    path = write_lines(tmp_path / "docs.jsonl", records, blank_every=2)
    pool(PLAIN)  # one worker: this process
    shards = list(read_shards(path, 20))
    assert len(shards) > 1
    with pytest.raises(PipelineError) as info:
        for shard in shards:
            prepare_shard(shard, "docs", pairs)
    assert str(info.value) == f"{path}:8: {expected}"


# --- what prepare_shard says of each record -----------------------------------------------------------


def one_shard(tmp_path: Path, records: list, pairs: bool = False, settings: P.Clean = PLAIN, **kw):
    path = write_lines(tmp_path / "in.jsonl", records)
    pool(settings)  # one worker: prepare_shard runs in this process, with these settings
    (shard,) = read_shards(path, 10**7)
    return prepare_shard(shard, kw.pop("name", "docs"), pairs, **kw)


def test_a_clean_line_is_the_record_as_json_dumps_writes_it_with_its_meta_in_every_script(tmp_path):
    texts = [t for t in TEXTS if len(t.strip()) > 3 and "@" not in t]
    records = [
        {"text": t, "meta": {"страница": i, "a": [1, "二"]}, "origin": "book.txt", "id": i} for i, t in enumerate(texts)
    ]
    for keep_origin in (False, True):
        out = one_shard(tmp_path, records, name="книги", keep_origin=keep_origin)
        assert len(out.records) == len(texts) and all(isinstance(r, Candidate) for r in out.records)
        for i, (r, text) in enumerate(zip(out.records, texts)):
            origin = {"origin": "book.txt"} if keep_origin else {}  # "id" and other fields are not kept
            expected = {"source": "книги", "text": text, **origin, "meta": {"a": [1, "二"], "страница": i}}
            assert r.line == (json.dumps(expected, ensure_ascii=False) + "\n").encode("utf-8")
            assert r.text_bytes == len(text.encode("utf-8")) and r.chars == len(text)


def test_a_pairs_line_carries_its_direction_and_task(tmp_path):
    pair = {"src": "Jesus wept.", "tgt": "Иисус прослезился.", "meta": {"verse": "John 11:35"}}
    (c,) = one_shard(tmp_path, [pair], pairs=True, tgt_lang="ru").records
    assert json.loads(c.line) == {
        "source": "docs",
        "src": "Jesus wept.",
        "tgt": "Иисус прослезился.",
        "tgt_lang": "ru",
        "meta": {"verse": "John 11:35"},
    }
    qa = {"src": "Кто прослезился?", "tgt": "Иисус"}  # an answer may be short
    (c,) = one_shard(tmp_path, [qa], pairs=True, task="qa").records
    assert json.loads(c.line) == {"source": "docs", **qa, "task": "qa"}


def test_counts_drops_and_pii_of_a_shard(tmp_path):
    out = one_shard(tmp_path, [{"text": t} for t in TEXTS])
    assert out.documents_in == len(TEXTS)
    assert out.bytes_in == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert out.lengths_in == Counter(len(t) for t in TEXTS)
    dropped = {i: r for i, r in enumerate(out.records) if isinstance(r, Dropped)}
    assert {i: r.reason for i, r in dropped.items()} == {5: "too_short", 6: "empty"}
    assert dropped[5].texts == ["ab"] and dropped[6].texts == ["  \u200b  "]  # nothing normalised: shown as it came
    assert +out.pii == Counter(email=1, phone=1)
    scrubbed = json.loads(out.records[7].line)["text"]
    assert scrubbed == "Write to [EMAIL] or call [PHONE] today."
    assert json.loads(out.records[8].line)["text"] == "x" * 400


def test_a_dropped_records_texts_are_cut_to_300_characters(tmp_path):
    settings = dataclasses.replace(PLAIN, max_chars=350)
    (r,) = one_shard(tmp_path, [{"text": "я" * 400}], settings=settings).records
    assert r == Dropped("too_long", ["я" * 300])


def test_exact_keys_find_repeats_and_keep_directions_apart(tmp_path):
    same = [{"text": "Блаженны кроткие."}, {"text": "Блаженны  кроткие. "}, {"text": "Блаженны плачущие."}]
    a, b, c = one_shard(tmp_path, same).records
    assert a.keys == b.keys != c.keys  # normalised first: the spaces do not make another text
    assert a.keys == (text_key("text", "Блаженны кроткие."),)

    pairs = [{"src": "Jesus wept.", "tgt": "Иисус прослезился."}, {"src": "Jesus wept.", "tgt": "Иисус заплакал."}]
    ru1, ru2 = one_shard(tmp_path, pairs, pairs=True, tgt_lang="ru").records
    assert ru1.keys[0] != ru2.keys[0] and ru1.keys[1] == ru2.keys[1]  # another pair, the same source side
    assert ru1.split == ru2.split  # split by the source side
    (fr,) = one_shard(tmp_path, [{"src": "Jesus wept.", "tgt": "Jésus pleura."}], pairs=True, tgt_lang="fr").records
    assert fr.keys[1] != ru1.keys[1]  # one sentence into two languages: two directions, not a repeat


def test_the_split_depends_on_the_text_alone(tmp_path):
    records = [{"text": t} for t in FILLER]
    first = [r.split for r in one_shard(tmp_path, records, settings=SETTINGS).records]
    assert set(first) == {"train", "val", "test"}
    again = [r.split for r in one_shard(tmp_path, list(reversed(records)), settings=SETTINGS).records]
    assert again == list(reversed(first))


# --- ngram_shard: train documents sharing an n-gram with val/test -------------------------------------


def test_ngram_shard_marks_the_train_documents_that_share_an_n_gram_with_val_or_test(tmp_path):
    held_settings = dataclasses.replace(PLAIN, decontaminate_ngram=3, val_fraction=1.0, test_fraction=0.0)
    held_docs = [{"text": "И сказал Бог: да будет свет."}, {"text": "北京 是 中国 的 首都"}]
    out = one_shard(tmp_path, held_docs, settings=held_settings)
    assert [r.split for r in out.records] == ["val", "val"]
    held = np.unique(out.heldout_ngrams)

    train = [
        {"source": "a", "text": "Nothing in common here at all."},
        {"source": "a", "text": "и СКАЗАЛ бог: Let there be light."},  # words compared lower-cased
        {"source": "b", "src": "Hello there.", "tgt": "Он сказал: да будет свет."},  # either side of a pair
        {"source": "a", "text": "сказал Бог да будет"},  # "Бог" without its colon: another word
        {"source": "c", "text": "上海 是 中国 的 城市"},  # "是 中国 的"
        {"source": "a", "text": "свет."},
    ]
    path = write_lines(tmp_path / "train.jsonl", train, blank_every=2)
    for workers, shard_bytes in ((1, 10**7), (2, 40)):
        p = pool(held_settings, workers, shard_bytes, heldout=held)
        try:
            checked = list(p.map(ngram_shard, read_shards(path, p.shard_bytes)))
        finally:
            p.close()
        flags = [f for c in checked for f in c.contaminated.tolist()]
        lines = [line for c in checked for line in c.lines]
        assert flags == [False, True, True, False, True, False], (workers, shard_bytes)
        assert lines == [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in train]

    p = pool(held_settings, heldout=np.empty(0, np.uint64))  # nothing held out: nothing contaminated
    (checked,) = p.map(ngram_shard, read_shards(path, 10**7))
    assert not checked.contaminated.any() and len(checked.lines) == len(train)
