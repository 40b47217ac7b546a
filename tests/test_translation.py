"""Translation: the languages of pair sources and their tags, the mixture of sources in training,
and decoding chosen on val."""

import json

import numpy as np
import pytest
from conftest import (
    PAIRS,
    SONNET,
    call_stage,
    collect_project,
    copy_project,
    jsonl_source,
    raw_records,
    set_params,
    snapshot,
    stage_error,
)

from pipeline.core.languages import script_share
from pipeline.data.tokenizer import Tokenizer, load_tokens
from pipeline.training.dataloader import mixture_starts, window_starts

ZH_PAIRS = [("Resource Types", "资源类型"), ("Open the file", "打开文件"), ("Save all notebooks", "保存所有笔记本")]


def write_pairs(path, pairs, n=60):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            src, tgt = pairs[i % len(pairs)]
            f.write(json.dumps({"src": f"{src} {i}", "tgt": f"{tgt} {i}"}, ensure_ascii=False) + "\n")
    return str(path)


def test_script_share_counts_letters_in_bytes():
    assert script_share(["Иисус прослезился."], "Cyrillic") == 1.0
    assert script_share(["Jesus wept."], "Cyrillic") == 0.0
    # 资源 is 6 bytes of Han against 8 of Latin: a fair share for a Chinese string quoting English.
    assert script_share(["打开 Notebook"], "Han") == pytest.approx(6 / 14)


def test_collect_records_languages_and_checks_each_side_script(tmp_path):
    """en->ru and en->zh pairs pass; the manifest names their languages; clean stamps the target's."""
    ru = write_pairs(tmp_path / "ru.jsonl", PAIRS)
    zh = write_pairs(tmp_path / "zh.jsonl", ZH_PAIRS)
    collect_project(
        tmp_path,
        [jsonl_source("en_ru", ru, languages=["en", "ru"]), jsonl_source("en_zh", zh, languages=["en", "zh"])],
    )
    call_stage("collect", tmp_path)
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    assert [s.get("languages") for s in manifest["sources"]] == [["en", "ru"], ["en", "zh"]]
    assert "tgt_lang" not in raw_records(tmp_path, "en_ru")[0]  # raw records are the source's own
    call_stage("clean", tmp_path)
    records = [json.loads(line) for s in ("train", "val", "test") for line in open(tmp_path / f"data/clean/{s}.jsonl")]
    assert {(r["source"], r["tgt_lang"]) for r in records} == {("en_ru", "ru"), ("en_zh", "zh")}


@pytest.mark.parametrize(
    "languages, needles",
    [
        (["ru", "en"], ["'ru' for the source side", "0% of its letters are Cyrillic", "swapped"]),
        (["en", "zh"], ["'zh' for the target side", "Han script"]),
    ],
)
def test_a_language_not_in_the_source_is_one_line_and_keeps_earlier_output(tmp_path, languages, needles):
    collect_project(tmp_path, [jsonl_source("bible", write_pairs(tmp_path / "p.jsonl", PAIRS))])
    call_stage("collect", tmp_path)
    before = snapshot(tmp_path, "data/raw")
    collect_project(tmp_path, [jsonl_source("bible", str(tmp_path / "p.jsonl"), languages=languages)])
    stage_error("collect", tmp_path, "source 'bible': languages", *needles)
    assert snapshot(tmp_path, "data/raw") == before


def test_languages_name_a_pairs_sides_or_the_languages_documents_keep(tmp_path):
    """Documents: any number of codes, the languages clean keeps (clean.language_id); pairs: [source, target]."""
    (tmp_path / "t.jsonl").write_text('{"text": "Shall I compare thee to a summer\'s day?"}\n')
    collect_project(tmp_path, [jsonl_source("t", str(tmp_path / "t.jsonl"), languages=["en"])])
    call_stage("collect", tmp_path)
    assert json.loads((tmp_path / "data/raw/manifest.json").read_text())["sources"][0]["languages"] == ["en"]
    collect_project(tmp_path, [jsonl_source("t", str(tmp_path / "t.jsonl"), languages=["English", "ru"])])
    stage_error("collect", tmp_path, "collect.sources[0] (t).languages[0]", "'English'", "ISO 639")
    (tmp_path / "p.jsonl").write_text('{"src": "Good morning.", "tgt": "Доброе утро."}\n', encoding="utf-8")
    collect_project(tmp_path, [jsonl_source("p", str(tmp_path / "p.jsonl"), languages=["en"])])
    stage_error("collect", tmp_path, "source 'p': languages", "[source, target]")


def test_the_target_tag_is_in_the_vocabulary_and_begins_each_pair(prepared):
    tok = Tokenizer(prepared / "data/tokens/tokenizer.model")
    assert list(tok.languages) == ["ru"] and tok.sp.id_to_piece(tok.languages["ru"]) == "<2ru>"
    data = np.asarray(load_tokens("train", prepared / "data/tokens"))
    starts = np.flatnonzero(data == tok.src_id)
    assert len(starts) > 0 and (data[starts + 1] == tok.languages["ru"]).all()
    assert (data == tok.languages["ru"]).sum() == len(starts)
    assert tok.token_bytes()[tok.languages["ru"]] == 0  # a tag stands for no text: bits per byte stay exact


def test_a_target_language_missing_from_train_is_one_line(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    val = folder / "data/clean/val.jsonl"
    lines = val.read_text(encoding="utf-8").splitlines()
    lines = [line.replace('"tgt_lang": "ru"', '"tgt_lang": "uk"') for line in lines]
    val.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = snapshot(folder, "data/tokens")
    stage_error("tokenize", folder, "val.jsonl", "source 'pairs'", "'uk'", "<2uk>", "no pairs of it in train")
    assert snapshot(folder, "data/tokens") == before


def test_mixture_draws_windows_by_weighted_token_share():
    sources = {"a": {"start": 1, "end": 1001}, "b": {"start": 1001, "end": 4001}}
    starts = mixture_starts(sources, {}, 4001, 16, 20000, 7, 0, 3)
    in_a = (starts < 1001 - 16).mean()
    assert in_a == pytest.approx(0.25, abs=0.02)  # b has 3 times a's tokens
    assert ((starts >= 1) & (starts <= 1001 - 16) | (starts >= 1001) & (starts <= 4001 - 16)).all()
    starts = mixture_starts(sources, {"a": 3}, 4001, 16, 20000, 7, 0, 3)
    assert (starts < 1001).mean() == pytest.approx(0.5, abs=0.02)
    assert (mixture_starts(sources, {"b": 0}, 4001, 16, 500, 7, 0, 3) < 1001 - 16).all()
    # A pure function of its key, as window_starts
    assert (
        mixture_starts(sources, {"a": 3}, 4001, 16, 64, 1, 0, 5)
        == mixture_starts(sources, {"a": 3}, 4001, 16, 64, 1, 0, 5)
    ).all()
    assert len(window_starts(4001, 16, 64, 1, 0, 5)) == 64


def test_source_weights_train_only_on_the_weighted_sources(prepared, tmp_path, capsys):
    """A weight for a source the train split lacks is ignored whatever its value (params.yaml's own
    for the default corpus, or any other), and train says so once, in one line naming the key."""
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"source_weights": {"sonnets": 0, "pairs": 0}})
    stage_error("train", folder, "train.source_weights", "weight 0")
    set_params(folder, train={"source_weights": {"sonnets": -1}})
    stage_error("train", folder, "train.source_weights.sonnets", ">= 0")
    weights = {"sonnets": 0.0, "nope": 3.5, "bible_en_ru": 3.0}  # no nope, no bible_en_ru in this corpus
    set_params(folder, train={"source_weights": weights, "max_steps": 3})
    capsys.readouterr()
    call_stage("train", folder)
    out = capsys.readouterr().out
    for name in ("nope", "bible_en_ru"):
        line = f"train: train.source_weights.{name}: no source of that name in data/tokens/train.json; ignored\n"
        assert out.count(line) == 1, out
    config = json.loads((folder / "data/model/config.json").read_text())
    assert config["train"]["source_weights"] == weights


def test_evaluate_chooses_the_beam_on_val_and_reports_it(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    set_params(
        folder,
        train={"max_steps": 5},
        evaluate={
            "tune_pairs": 6,
            "tune_beam_sizes": [1, 2],
            "tune_length_penalties": [0.5, 1.5],
            "tune_repetition_penalties": [1.0, 1.3],
            "prompts": [],
        },
    )
    call_stage("train", folder)
    call_stage("evaluate", folder)
    direction = json.loads((folder / "metrics/eval.json").read_text())["translation"]["directions"]["pairs"]
    chosen = direction["beam_chosen_on_val"]
    assert chosen["pairs"] == 6 and chosen["by"] == "chrf"
    points = [(g["beam_size"], g["length_penalty"], g["repetition_penalty"]) for g in chosen["grid"]]
    assert points == [(size, lp, rp) for size, lp in [(1, 1.0), (2, 0.5), (2, 1.5)] for rp in (1.0, 1.3)]
    best = max(chosen["grid"], key=lambda g: g["chrf"])
    beam = direction["beam"]
    assert (beam["beam_size"], beam["length_penalty"], beam["repetition_penalty"]) == points[chosen["grid"].index(best)]
    assert all(g["length_ratio"] > 0 for g in chosen["grid"]) and beam["length_ratio"] > 0
    assert direction["target_language"] == "ru"
    report = (folder / "metrics/report.md").read_text()
    assert "chosen by chrF on the first 6 val pairs" in report


def test_generate_translates_into_a_named_language_only(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"max_steps": 2})
    call_stage("train", folder)
    stage_error("generate", folder, "'fr'", "<2fr>", "ru", args=("Jesus wept.", "--translate", "--to", "fr"))


@pytest.mark.parametrize("side", ["src", "tgt"])
def test_a_pair_source_with_an_empty_side_is_one_line(tmp_path, side):
    with open(tmp_path / "p.jsonl", "w", encoding="utf-8") as f:
        for src, tgt in PAIRS:
            pair = {"en": src, "ru": tgt}
            pair["en" if side == "src" else "ru"] = "  "
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    collect_project(tmp_path, [jsonl_source("bible", str(tmp_path / "p.jsonl"), pair_columns=["en", "ru"])])
    name, column = ("source", "en") if side == "src" else ("target", "ru")
    stage_error("collect", tmp_path, f"source 'bible': the {name} side (column '{column}') is empty in all 6 pairs")
    assert not (tmp_path / "data" / "raw").exists()


@pytest.mark.parametrize("near_dup", [False, True])
def test_one_source_text_in_several_directions_is_not_a_duplicate(tmp_path, near_dup):
    """The same English verses into Russian and into French: two directions, each kept whole (nor
    near duplicates of each other), in the same split (the split follows the source side), so no
    test verse is trained on in either."""
    import random

    rng = random.Random(0)
    en_words = SONNET.replace("\n", " ").split()
    ru_words = " ".join(t for _, t in PAIRS).split()
    sentences = [" ".join(rng.sample(en_words, 12)) for _ in range(60)]  # no two alike
    ru = [(en, " ".join(rng.sample(ru_words, 10))) for en in sentences]
    fr = [(en, f"En français : {en.lower()}") for en in sentences]  # Latin script, another target
    ru_path, fr_path = write_pairs(tmp_path / "ru.jsonl", ru, 60), write_pairs(tmp_path / "fr.jsonl", fr, 60)
    collect_project(
        tmp_path,
        [
            jsonl_source("en_ru", ru_path, languages=["en", "ru"]),
            jsonl_source("en_fr", fr_path, languages=["en", "fr"]),
        ],
    )
    set_params(tmp_path, clean={"near_dup": near_dup})
    call_stage("collect", tmp_path)
    call_stage("clean", tmp_path)
    report = json.loads((tmp_path / "metrics/clean.json").read_text())
    assert report["dropped"]["duplicate"] == 0 and report["dropped"]["near_duplicate"] == 0
    assert report["documents_kept"] == 120
    split_of = {}
    for split in ("train", "val", "test"):
        for line in open(tmp_path / f"data/clean/{split}.jsonl", encoding="utf-8"):
            r = json.loads(line)
            split_of.setdefault(r["src"], set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())
