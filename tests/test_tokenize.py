"""tokenize: a lossless tokenizer, token files with exact byte counts, and the document layout.

Uses the shared `prepared` project read-only; tests that change it work on a copy. The stage runs
in this process, and once as a command, for the error a user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_clean_error,
    call_stage,
    copy_project,
    jsonl_source,
    run_stage,
    snapshot,
    stage_error,
    tiny_params,
    write_jsonl,
    write_params,
)

from pipeline.core.params import read_yaml
from pipeline.data.tokenizer import Tokenizer

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tok(prepared) -> Tokenizer:
    return Tokenizer(prepared / "data" / "tokens" / "tokenizer.model")


def sidecar(folder: Path, split: str) -> dict:
    return json.loads((folder / "data" / "tokens" / f"{split}.json").read_text(encoding="utf-8"))


def tokens(folder: Path, split: str) -> np.ndarray:
    meta = sidecar(folder, split)
    return np.fromfile(folder / "data" / "tokens" / f"{split}.bin", dtype=np.dtype(meta["dtype"]))


def clean_records(folder: Path, split: str) -> list[dict]:
    path = folder / "data" / "clean" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def documents(ids: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token file into its documents: each ends with eos, and the file starts with one."""
    assert ids[0] == eos and ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return [ids[a + 1 : b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]


# --- the tokenizer ------------------------------------------------------------------------------

TEXTS = [
    "Shall I compare thee\nto a summer's day?\n\n",
    "\tTabs\tand  double  spaces   and trailing spaces  ",
    "  leading spaces, then a line\n\n\n  indented\n",
    "И сказал Бог: да будет свет. И стал свет.",
    "Emoji 😀 and 🦜 need byte fallback; so do ǅ and 漢字.",
    "",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_encode_is_identity(tok, text):
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text
    # every token stands for an exact number of bytes
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_byte_fallback_is_used_for_unseen_characters(tok):
    ids = tok.encode(["🦜"])[0]
    assert len(ids) == 4 and all(tok.sp.is_byte(i) for i in ids)
    assert 0 not in ids  # never the unknown token


def test_the_space_symbol_is_reserved_by_clean_and_the_rest_round_trips(tok):
    """U+2581 stands for a space inside sentencepiece: clean removes literal ones, so what reaches
    the tokenizer always round-trips with exact byte counts."""
    from pipeline.data.rules import normalize

    text = normalize("Levels: \u2581\u2582\u2583 and a lone \u2581.")
    assert text == "Levels: \u2582\u2583 and a lone ."
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_control_tokens_stand_for_no_bytes(tok):
    tb = tok.token_bytes()
    assert tb[tok.eos_id] == 0 and tb[tok.src_id] == 0 and tb[tok.tgt_id] == 0
    assert len({tok.eos_id, tok.src_id, tok.tgt_id}) == 3
    assert tok.vocab_size == 512 and len(tb) == 512
    assert int((tb > 0).sum()) == tok.vocab_size - 6  # all but unk, bos, eos, <src>, <tgt>, <2ru> stand for bytes


# --- the token files ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_sidecar_bytes_are_the_exact_sum_of_token_bytes(prepared, tok, split):
    meta = sidecar(prepared, split)
    ids = tokens(prepared, split)
    tb = tok.token_bytes()
    assert meta["tokens"] == len(ids)
    assert meta["bytes"] == int(tb[ids].sum())
    # and the bytes are those of the cleaned documents
    records = clean_records(prepared, split)
    assert meta["bytes"] == sum(len(r[k].encode("utf-8")) for r in records for k in ("text", "src", "tgt") if k in r)
    assert meta["documents"] == len(records)
    for name, s in meta["sources"].items():
        assert s["bytes"] == int(tb[ids[s["start"] : s["end"]]].sum()), name
        assert s["documents"] == sum(r["source"] == name for r in records), name


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_starts_with_eos_and_every_document_ends_with_it(prepared, tok, split):
    ids = tokens(prepared, split)
    meta = sidecar(prepared, split)
    assert ids[0] == tok.eos_id and ids[-1] == tok.eos_id
    assert int((ids == tok.eos_id).sum()) == meta["documents"] + 1
    # token ranges of the sources tile the file after the first eos, each ending on an eos
    ranges = sorted((s["start"], s["end"]) for s in meta["sources"].values())
    assert ranges[0][0] == 1 and ranges[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(ids[end - 1] == tok.eos_id for _, end in ranges)


@pytest.mark.parametrize("split", SPLITS)
def test_documents_and_pairs_are_rendered_in_order(prepared, tok, split):
    ids = tokens(prepared, split)
    meta = sidecar(prepared, split)
    records = clean_records(prepared, split)
    n_pairs = sum("src" in r for r in records)
    assert n_pairs > 0 and n_pairs < len(records)
    assert int((ids == tok.src_id).sum()) == n_pairs
    assert int((ids == tok.tgt_id).sum()) == n_pairs
    for name, s in meta["sources"].items():
        mine = [r for r in records if r["source"] == name]
        docs = documents(ids[s["start"] - 1 : s["end"]], tok.eos_id)
        assert len(docs) == len(mine)
        for doc, r in zip(docs, mine):
            if "src" in r:
                # <src> source <tgt> target </s>
                assert doc[0] == tok.src_id and doc.count(tok.src_id) == 1 and doc.count(tok.tgt_id) == 1
                t = doc.index(tok.tgt_id)
                assert tok.decode(doc[1:t]) == r["src"]
                assert tok.decode(doc[t + 1 :]) == r["tgt"]
            else:
                assert tok.src_id not in doc and tok.tgt_id not in doc
                assert tok.decode(doc) == r["text"]


@pytest.mark.parametrize("split", SPLITS)
def test_tiny_vocabulary_is_stored_as_uint16(prepared, tok, split):
    meta = sidecar(prepared, split)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    path = prepared / "data" / "tokens" / f"{split}.bin"
    assert path.stat().st_size == 2 * meta["tokens"]
    ids = tokens(prepared, split)
    assert int(ids.max()) < tok.vocab_size


def test_metrics_report_tokens_and_bytes_per_token_per_split(prepared):
    m = json.loads((prepared / "metrics" / "tokenize.json").read_text(encoding="utf-8"))
    params = read_yaml(prepared / "params.yaml")["tokenize"]
    assert m["vocab_size"] == params["vocab_size"] and m["model_type"] == params["model_type"]
    assert set(m["splits"]) == set(SPLITS)
    for split in SPLITS:
        meta = sidecar(prepared, split)
        got = m["splits"][split]
        assert got["tokens"] == meta["tokens"] == len(tokens(prepared, split))
        assert got["bytes"] == meta["bytes"]
        assert got["bytes_per_token"] == pytest.approx(meta["bytes"] / meta["tokens"], abs=1e-4)
        assert 1.0 < got["bytes_per_token"] < 8.0


def test_tokenize_is_deterministic(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    call_stage("tokenize", folder)
    assert snapshot(folder, "data/tokens", "metrics/tokenize.json") == snapshot(
        prepared, "data/tokens", "metrics/tokenize.json"
    )


# --- user errors ---------------------------------------------------------------------------------


def test_vocab_size_larger_than_the_text_supports_is_a_clean_error(prepared, tmp_path):
    """As a command: sentencepiece's own failure (and its logging) is one line on stderr."""
    folder = copy_project(prepared, tmp_path / "p")
    before = snapshot(folder, "data", "metrics")
    params = read_yaml(folder / "params.yaml")
    params["tokenize"]["vocab_size"] = 60000
    write_params(folder, params)
    proc = run_stage("tokenize", folder, check=False)
    assert_clean_error(proc, "tokenize.vocab_size", "60000")
    assert snapshot(folder, "data", "metrics") == before
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["clean", "raw", "tokens"]  # no temp folder left


def test_a_vocabulary_too_small_for_chinese_text_says_what_it_needs(tmp_path):
    """Thousands of distinct Chinese characters need a piece each: the error names the key, the
    number of pieces needed and a size to use (512 once was reported as "larger than supported")."""
    import random

    rnd = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(2000)]
    docs = [{"text": "".join(rnd.choices(chars, k=60)) + "。"} for _ in range(400)]
    folder = tmp_path / "p"
    write_jsonl(folder / "corpus" / "zh.jsonl", docs)
    write_params(
        folder,
        tiny_params(
            {"sources": [jsonl_source("zh", "corpus/zh.jsonl")], "max_documents": 0},
            tokenize={"character_coverage": 0.9995},
        ),
    )
    for stage in ("collect", "clean"):
        call_stage(stage, folder)
    message = stage_error("tokenize", folder, "tokenize.vocab_size: 512 is too small", "character_coverage: auto")
    needed = int(message.split(" need ")[1].split()[0])
    assert 2000 < needed < 2400 and f"at least {needed} (e.g. 4096)" in message  # 2,000 characters + bytes


def test_the_tiny_preset_takes_chinese_text(tmp_path, capsys):
    """character_coverage: auto (the tiny preset's) gives the most frequent characters a piece each
    and writes the rarest as bytes; where sentencepiece's least coverage (0.98) does not fit the
    vocabulary, it grows and says so. 3,000 distinct characters in Zipf's proportions (as in Chinese
    prose), then 250: both tokenize, losslessly."""
    import random

    rnd = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(chars))]
    docs = [{"text": "".join(rnd.choices(chars, weights, k=80)) + "。"} for _ in range(1500)]
    folder = tmp_path / "p"
    write_jsonl(folder / "corpus" / "zh.jsonl", docs)
    write_params(folder, tiny_params({"sources": [jsonl_source("zh", "corpus/zh.jsonl")], "max_documents": 0}))
    for stage in ("collect", "clean", "tokenize"):
        call_stage(stage, folder)
    metrics = json.loads((folder / "metrics/tokenize.json").read_text())
    assert metrics["vocab_size"] > 2000 and metrics["vocab_size"] % 64 == 0 and metrics["character_coverage"] == 0.98
    assert "vocab_size 512 cannot hold the characters" in capsys.readouterr().out
    tok = Tokenizer(folder / "data/tokens/tokenizer.model")
    assert (
        tok.vocab_size
        == metrics["vocab_size"]
        == json.loads((folder / "data/tokens/train.json").read_text())["vocab_size"]
    )
    text = docs[0]["text"] + docs[1]["text"]
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text and any(tok.sp.is_byte(i) for i in ids)  # rare characters as bytes

    few = [chr(0x4E00 + i) for i in range(250)]
    docs = [{"text": "".join(rnd.choices(few, weights[:250], k=80)) + "。"} for _ in range(1500)]
    write_jsonl(folder / "corpus" / "zh.jsonl", docs)
    for stage in ("collect", "clean", "tokenize"):
        call_stage(stage, folder)
    metrics = json.loads((folder / "metrics/tokenize.json").read_text())
    assert metrics["vocab_size"] == 512 and 0.98 <= metrics["character_coverage"] < 0.9995


def test_tokenize_before_clean_is_a_clean_error(prepared, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "params.yaml").write_bytes((prepared / "params.yaml").read_bytes())
    stage_error("tokenize", folder, "data/clean/train.jsonl", "run the clean stage")
    assert not (folder / "data" / "tokens").exists()


def test_the_tokenizer_learns_from_a_deterministic_sample_and_encodes_in_batches(prepared, tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        folder = copy_project(prepared, tmp_path / name)
        params = read_yaml(folder / "params.yaml")
        params["tokenize"]["sample_bytes"] = 30_000
        write_params(folder, params)
        call_stage("tokenize", folder)
        runs.append(folder)
    a, b = runs
    assert snapshot(a, "data/tokens") == snapshot(b, "data/tokens")  # same sample, same tokenizer
    m = json.loads((a / "metrics/tokenize.json").read_text())
    assert m["train_bytes"] > 30_000 and 0 < m["sample_rate"] < 1
    assert (a / "data/tokens/tokenizer.model").read_bytes() != (prepared / "data/tokens/tokenizer.model").read_bytes()
    # Still lossless on all of train, including documents the sample left out.
    tok = Tokenizer(a / "data/tokens/tokenizer.model")
    for r in clean_records(a, "train")[:200]:
        for k in ("text", "src", "tgt"):
            if k in r:
                assert tok.decode(tok.encode([r[k]])[0]) == r[k]
    # Batch size does not change the token file.
    import pipeline.tokenize as T

    monkeypatch.setattr(T, "ENCODE_BATCH", 7)
    monkeypatch.chdir(prepared)
    out = tmp_path / "small_batches.bin"
    T.encode_split(T.Tokenizer(prepared / "data/tokens/tokenizer.model"), prepared / "data/clean/val.jsonl", out, 1)
    assert out.read_bytes() == (prepared / "data/tokens/val.bin").read_bytes()
