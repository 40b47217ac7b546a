"""clean at scale: shards and workers change nothing in the output; the compact indexes are exact."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import (
    assert_clean_error,
    call_stage,
    make_corpus,
    run_stage,
    snapshot,
    stage_error,
    tiny_params,
    write_params,
)

from pipeline.core import params as P
from pipeline.data.dedup import KeyIndex, MinHasher, Words

FULL = {"quality_filters": True, "near_dup": True, "decontaminate_ngram": 8}


def random_corpus(folder, seed: int = 0) -> dict:
    """Distinct documents of random words, plus exact duplicates, near-duplicates (one word changed)
    and documents quoting a 10-word span of another (contamination when they land in different splits);
    and pairs, some repeated."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(800)]
    docs = [" ".join(rng.choices(vocab, k=rng.randint(60, 120))) for _ in range(300)]
    for i in range(20):
        docs.append(docs[i])
        words = docs[20 + i].split()
        words[len(words) // 2] = "changed"
        docs.append(" ".join(words))
        quoted = docs[40 + i].split()[5:15]
        docs.append(" ".join(rng.choices(vocab, k=30) + quoted + rng.choices(vocab, k=30)))
    rng.shuffle(docs)
    pairs = [(" ".join(rng.choices(vocab, k=8)), " ".join(rng.choices(vocab, k=8))) for _ in range(400)]
    pairs += pairs[:30]
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (folder / "pairs.jsonl").write_text(
        "".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in pairs), encoding="utf-8"
    )
    return {
        "max_documents": 0,
        "sources": [
            {"name": name, "kind": "file", "format": "jsonl", "path": str(folder / f"{name}.jsonl")}
            for name in ("docs", "pairs")
        ],
    }


@pytest.mark.slow
def test_output_is_byte_identical_for_any_number_of_workers_and_shard_size(tmp_path):
    """The real command line, with its worker processes."""
    outputs = []
    for workers, shard_bytes in ((1, 4_000_000), (2, 3000), (3, 700)):
        folder = tmp_path / f"w{workers}"
        write_params(
            folder.mkdir() or folder,
            tiny_params(
                random_corpus(folder / "corpus"), clean=FULL, clean_run={"workers": workers, "shard_bytes": shard_bytes}
            ),
        )
        call_stage("collect", folder)
        proc = run_stage("clean", folder)
        assert f"({workers} worker" in proc.stdout
        outputs.append(snapshot(folder, "data/clean", "metrics/clean.json", "metrics/clean_report.md"))
    metrics = json.loads(outputs[0]["metrics/clean.json"])
    assert metrics["dropped"]["duplicate"] >= 20 + 30, metrics["dropped"]
    assert metrics["dropped"]["near_duplicate"] >= 15, metrics["dropped"]
    assert metrics["contaminated_removed_from_train"] > 0
    assert metrics["documents_kept"] > 600
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("setting, value", [("workers", -1), ("shard_bytes", 0)])
def test_bad_workers_or_shard_size_is_a_clean_error(project, setting, value):
    write_params(project, tiny_params(make_corpus(project / "corpus"), clean_run={setting: value}))
    stage_error("clean", project, f"clean_run.{setting}", str(value))
    assert not (project / "data").exists()


def test_a_bad_json_line_in_a_late_shard_names_its_line(project):
    """The command line, with two worker processes: the error raised in a worker is one line on stderr."""
    call_stage("collect", project)
    raw = project / "data/raw/pairs.jsonl"
    lines = raw.read_text(encoding="utf-8").splitlines()
    lines[250] = lines[250][:-5]
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = tiny_params(make_corpus(project / "corpus"), clean_run={"workers": 2, "shard_bytes": 1000})
    write_params(project, data)
    assert_clean_error(run_stage("clean", project, check=False), "pairs.jsonl:251", "not valid JSON")
    assert not (project / "data/clean").exists()


def test_key_index_finds_every_key_across_merges(monkeypatch):
    monkeypatch.setattr(KeyIndex, "FLUSH", 64)
    rng = random.Random(0)
    index, truth = KeyIndex(), {}
    for step in range(20):
        keys = [rng.getrandbits(64) for _ in range(50)] + list(truth)[:5]
        found = index.lookup(np.array(keys, np.uint64))
        for key, merged in zip(keys, found.tolist()):
            value = merged if merged >= 0 else index.recent.get(key, -1)
            assert value == truth.get(key, -1)
            if key not in truth:
                truth[key] = step
                index.add(key, step)
        index.flush()
    assert len(index) == len(truth) and len(index.recent) < 64
    assert 1 < len(index.runs) <= 5  # merged: about log2(keys / FLUSH) runs
    for keys, _ in index.runs:
        assert np.all(keys[1:] > keys[:-1])


def test_signatures_are_datasketch_minhash_of_the_same_shingles():
    from datasketch import MinHash

    settings = P.Clean(near_dup=True)
    texts = [
        "the quick brown fox jumps over the lazy dog and the quick brown cat",
        "two words",
        "In the beginning God created the heaven and the earth.",
    ]
    words = Words(texts)
    signatures = MinHasher(settings).signatures(words)
    shingles, owner = words.ngrams(settings.shingle_words, short=True)
    for i in range(len(texts)):
        expected = MinHash(num_perm=settings.minhash_perm, seed=settings.minhash_seed, hashfunc=int, scheme="affine32")
        expected.update_batch((shingles[owner == i] >> np.uint64(32)).tolist())
        assert np.array_equal(expected.hashvalues, signatures[i])


@pytest.mark.parametrize("n", [1, 3, 13])
def test_ngrams_never_span_two_texts(n):
    texts = ["a b c d e f", "a b", "", "c d e f g h i j k l m n o p"]
    hashes, owner = Words(texts).ngrams(n)
    expected = sum(max(0, len(t.split()) - n + 1) for t in texts)
    assert len(hashes) == len(owner) == expected
    alone = [Words([t]).ngrams(n)[0] for t in texts]
    assert np.array_equal(hashes, np.concatenate(alone))
