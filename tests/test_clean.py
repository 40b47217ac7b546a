"""clean: normalisation, the filters and their counts, de-duplication, and a stable hashed split."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from conftest import (
    PAIRS,
    assert_clean_error,
    call_stage,
    clean_project,
    filler_docs,
    filler_pairs,
    jsonl_source,
    read_clean_metrics,
    read_split,
    run_stage,
    snapshot,
    stage_error,
    tiny_params,
    write_params,
)

from pipeline.data.rules import QUALITY_REASONS, normalize

SPLITS = ("train", "val", "test")


def all_records(folder: Path) -> dict[str, list[dict]]:
    return {s: read_split(folder, s) for s in SPLITS}


# --- normalisation -----------------------------------------------------------------------------


def test_nfc_composes_a_combining_accent():
    assert normalize("Cafe\u0301 cre\u0300me") == "Caf\u00e9 cr\u00e8me"
    assert normalize("\u0415\u0308\u043b\u043a\u0430") == "\u0401\u043b\u043a\u0430"  # Ё


def test_nfkc_folds_compatibility_characters_only_when_asked():
    text = "\ufb01ne \uff21\uff22 x\u00b2 \u2460"
    assert normalize(text, "NFKC") == "fine AB x2 1"
    assert normalize(text, "NFC") == text


def test_control_and_zero_width_characters_are_removed():
    text = "a\x00b\x07c\x1bd\x7fe\u200bf\u200cg\u200dh\u2060i\ufeffj\u00adk"
    assert normalize(text) == "abcdefghijk"
    # newline and tab are kept as whitespace (the tab as a space)
    assert normalize("one\ttwo\nthree") == "one two\nthree"


def test_output_is_normalised_even_when_invisible_characters_split_a_sequence():
    """Removing a control or zero-width character between a letter and its accent must not leave NFD text."""
    for text in ("e\u200b\u0301", "e\x00\u0301", "e\u00ad\u0301"):
        out = normalize(text)
        assert unicodedata.is_normalized("NFC", out), ascii(out)
        assert out == "\u00e9"


def test_html_tags_and_entities_are_removed():
    assert normalize("<p>Fish &amp; chips</p>") == "Fish & chips"
    assert normalize('<a href="x.html">link</a> &eacute;t&#233; &#x263A; &nbsp;end<br/>') == "link été ☺ end"
    assert normalize("2 < 3 and 5 > 4") == "2 < 3 and 5 > 4"  # not tags


def test_line_ends_and_spaces_are_made_uniform():
    text = "  one   two \r\nthree\t\t four  \r\rfive\r\n\r\n\r\n\r\nsix  "
    assert normalize(text) == "one two\nthree four\n\nfive\n\nsix"
    assert normalize("pair\r\nside  one", single_line=True) == "pair side one"


def test_the_stage_writes_normalised_text(tmp_path):
    docs = filler_docs(40) + [{"text": "<b>Cafe\u0301</b>\r\n\r\n\r\nnext\u200b  line &amp; more\x00"}]
    pairs = filler_pairs(40) + [{"src": "Two\nlines  <i>here</i>", "tgt": "Две\r\nстроки"}]
    folder = clean_project(tmp_path, docs, pairs)
    call_stage("clean", folder)
    kept = [r for s in SPLITS for r in read_split(folder, s)]
    assert {"source": "docs", "text": "Caf\u00e9\n\nnext line & more"} in kept
    assert {"source": "pairs", "src": "Two lines here", "tgt": "Две строки"} in kept


# --- filters and their counts -------------------------------------------------------------------


def test_each_drop_reason_is_counted(tmp_path):
    docs = filler_docs(60) + [
        {"text": ""},  # empty
        {"text": "  <br> \u200b "},  # empty after normalisation
        {"text": "ab"},  # too_short (min_chars 3)
        {"text": "x" * 201},  # too_long (max_chars 200)
        {"text": filler_docs(1)[0]["text"]},  # duplicate of the first document
        {"text": "  " + filler_docs(2)[1]["text"].replace(" ", "  ") + "\r\n"},  # duplicate once normalised
    ]
    base = filler_pairs(60)
    pairs = base + [
        {"src": "", "tgt": "Пусто."},  # empty
        {"src": "Hi", "tgt": "Привет"},  # too_short (either side)
        {"src": "Yes.", "tgt": "Да, да, конечно, это так."},  # length_ratio: 25 / 4 > 3
        {"src": base[0]["src"], "tgt": base[0]["tgt"]},  # duplicate pair
        {"src": base[1]["src"], "tgt": "Совсем другой перевод."},  # same source, another target
    ]
    folder = clean_project(tmp_path, docs, pairs, min_chars=3, max_chars=200, max_length_ratio=3.0)
    call_stage("clean", folder)
    metrics = read_clean_metrics(folder)
    for part in (metrics, metrics["sources"]["docs"], metrics["sources"]["pairs"]):  # the optional rules are off: zero
        assert all(part["dropped"].pop(r) == 0 for r in ("near_duplicate", "contaminated", *QUALITY_REASONS))
    assert metrics["sources"]["docs"]["dropped"] == {
        "empty": 2,
        "too_short": 1,
        "too_long": 1,
        "length_ratio": 0,
        "duplicate": 2,
    }
    assert metrics["sources"]["pairs"]["dropped"] == {
        "empty": 1,
        "too_short": 1,
        "too_long": 0,
        "length_ratio": 1,
        "duplicate": 2,
    }
    assert metrics["dropped"] == {"empty": 3, "too_short": 2, "too_long": 1, "length_ratio": 1, "duplicate": 4}
    assert metrics["sources"]["docs"]["documents_in"] == 66 and metrics["sources"]["docs"]["documents_kept"] == 60
    assert metrics["sources"]["pairs"]["documents_in"] == 65 and metrics["sources"]["pairs"]["documents_kept"] == 60
    assert metrics["documents_kept"] == 120
    # the first pair with a source wins; the later target is not kept anywhere
    kept = [r for s in SPLITS for r in read_split(folder, s)]
    assert not [r for r in kept if r.get("tgt") == "Совсем другой перевод."]
    assert sum(r.get("src") == base[1]["src"] for r in kept) == 1


def test_metrics_agree_with_the_split_files(tmp_path):
    folder = clean_project(tmp_path, filler_docs(80), filler_pairs(80))
    call_stage("clean", folder)
    metrics = read_clean_metrics(folder)
    records = all_records(folder)
    assert metrics["splits"] == {s: len(records[s]) for s in SPLITS}
    assert all(metrics["splits"][s] > 0 for s in SPLITS)
    for name in ("docs", "pairs"):
        for s in SPLITS:
            mine = [r for r in records[s] if r["source"] == name]
            got = metrics["sources"][name]["splits"][s]
            assert got["documents"] == len(mine)
            assert got["bytes"] == sum(
                len(r[k].encode("utf-8")) for r in mine for k in ("text", "src", "tgt") if k in r
            )
    assert metrics["bytes_kept"] == sum(metrics["sources"][n]["bytes_kept"] for n in ("docs", "pairs"))


# --- the split ---------------------------------------------------------------------------------


def test_split_is_deterministic(tmp_path):
    a = clean_project(tmp_path / "a", filler_docs(80), filler_pairs(80))
    b = clean_project(tmp_path / "b", filler_docs(80), filler_pairs(80))
    call_stage("clean", a)
    first = snapshot(a, "data/clean", "metrics/clean.json")
    call_stage("clean", a)
    assert snapshot(a, "data/clean", "metrics/clean.json") == first
    call_stage("clean", b)
    assert snapshot(b, "data/clean", "metrics/clean.json") == first


def test_split_is_stable_when_the_corpus_grows(tmp_path):
    small = clean_project(tmp_path / "small", filler_docs(80), filler_pairs(80))
    # more documents, some before the old ones, and the old ones in another order
    grown = clean_project(
        tmp_path / "grown",
        filler_docs(80, start=80) + filler_docs(80)[::-1],
        filler_pairs(40, start=80) + filler_pairs(80)[::-1] + filler_pairs(40, start=120),
    )
    call_stage("clean", small)
    call_stage("clean", grown)

    def where(folder):
        return {(r.get("text"), r.get("src"), r.get("tgt")): s for s in SPLITS for r in read_split(folder, s)}

    before, after = where(small), where(grown)
    assert len(before) == 160 and len(after) == 320
    assert {k: after[k] for k in before} == before
    assert set(before.values()) == set(SPLITS)


def test_split_salt_draws_another_split(tmp_path):
    a = clean_project(tmp_path / "a", filler_docs(80), filler_pairs(80))
    b = clean_project(tmp_path / "b", filler_docs(80), filler_pairs(80), split_salt="another")
    call_stage("clean", a)
    call_stage("clean", b)
    split_a, split_b = all_records(a), all_records(b)
    assert split_a["test"] != split_b["test"]

    def kept(records):
        return sorted(json.dumps(r, sort_keys=True) for s in SPLITS for r in records[s])

    assert kept(split_a) == kept(split_b)  # the same documents, drawn into other splits


def test_no_test_pair_source_appears_in_train(tmp_path):
    # Each source appears three times with different targets (and spellings equal once normalised).
    pairs = []
    for i in range(120):
        src, tgt = PAIRS[i % len(PAIRS)]
        src = f"{src} #{i}"
        pairs += [
            {"src": src, "tgt": f"{tgt} #{i}"},
            {"src": src.replace(" ", "  "), "tgt": f"{tgt} (вариант) #{i}"},
            {"src": f"<i>{src}</i>", "tgt": f"{tgt} (ещё) #{i}"},
        ]
    folder = clean_project(tmp_path, filler_docs(20), pairs)
    call_stage("clean", folder)
    records = all_records(folder)
    sources = {s: [r["src"] for r in records[s] if "src" in r] for s in SPLITS}
    assert len(sources["test"]) > 0 and len(sources["val"]) > 0
    assert not set(sources["test"]) & set(sources["train"])
    assert not set(sources["val"]) & set(sources["train"])
    assert not set(sources["test"]) & set(sources["val"])
    assert sum(len(v) for v in sources.values()) == 120
    assert read_clean_metrics(folder)["sources"]["pairs"]["dropped"]["duplicate"] == 240


# --- user errors -------------------------------------------------------------------------------


def test_nothing_left_after_cleaning_is_a_clean_error_and_keeps_old_outputs(tmp_path):
    folder = clean_project(tmp_path, filler_docs(60), filler_pairs(60))
    call_stage("clean", folder)
    before = snapshot(folder, "data", "metrics")
    params = tiny_params(
        {
            "sources": [jsonl_source("docs", "corpus/docs.jsonl"), jsonl_source("pairs", "corpus/pairs.jsonl")],
            "max_documents": 0,
        },
        clean={"min_chars": 1_000_000, "max_chars": 2_000_000},
        clean_run={"workers": 1},
    )
    write_params(folder, params)
    stage_error("clean", folder, "no training documents", "(in: 120,", "'too_short': 120", "clean.min_chars")
    assert snapshot(folder, "data", "metrics") == before
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["clean", "raw"]  # no temp folder left


def test_a_corpus_too_small_to_split_says_so_not_that_rules_dropped_it(tmp_path):
    """One document, nothing dropped: it went to val or test, and train is empty (the message once
    blamed clean.min_chars/max_chars)."""
    folder = clean_project(tmp_path, filler_docs(1), val_fraction=0.01, test_fraction=0.98)  # it goes to test
    message = stage_error("clean", folder, "no training documents", "dropped: none", "too small to split")
    assert "min_chars" not in message


def test_clean_before_collect_is_a_clean_error(tmp_path):
    """The command line: exit status, one line on stderr, no traceback."""
    write_params(tmp_path, tiny_params({"sources": [jsonl_source("docs", "corpus/docs.jsonl")]}))
    proc = run_stage("clean", tmp_path, check=False)
    assert_clean_error(proc, "data/raw/manifest.json")
    assert not (tmp_path / "data" / "clean").exists()


def test_lengths_are_fair_to_chinese_and_russian(tmp_path):
    """A CJK character counts as 3 (about what it carries in Latin letters, and its UTF-8 bytes), any
    other character as 1, for the length ratio and min_chars: correct English-Chinese pairs are
    kept, Russian is not counted double."""
    good = [
        {"src": "Resource Types", "tgt": "资源类型"},  # 14 characters vs 4: 3.5 by characters
        {"src": "In the beginning God created the heaven and the earth.", "tgt": "起初，神创造天地。"},
        {
            "src": "Blessed are the meek: for they shall inherit the earth.",
            "tgt": "Блаженны кроткие, ибо они наследуют землю.",
        },
        {"src": "Open", "tgt": "打开"},  # 2 characters, but as long as "open": not too short
    ]
    bad = [
        {"src": "Okay", "tgt": "这是一个非常长的中文句子没有对应的英文"},  # 4 vs 19 x 3
        {"src": "Resource", "tgt": "Это очень длинное предложение без соответствующего английского текста."},
    ]
    short = [{"src": "OK", "tgt": "好的"}]  # the English side is too short
    folder = clean_project(tmp_path, filler_docs(40), filler_pairs(40) + good + bad + short, min_chars=3)
    call_stage("clean", folder)
    kept = {r.get("src") for s in SPLITS for r in read_split(folder, s)}
    assert {p["src"] for p in good} <= kept and not {p["src"] for p in bad + short} & kept
    dropped = read_clean_metrics(folder)["sources"]["pairs"]["dropped"]
    assert dropped["length_ratio"] == 2 and dropped["too_short"] == 1
