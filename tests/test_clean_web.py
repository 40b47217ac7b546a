"""clean: language identification (py3langid) and the web's filters (a URL blocklist, lines of
JavaScript and cookie notices, lorem ipsum, lines ending in terminal punctuation), counted in
metrics/clean.json and the report; all off by default, and then the output is as it was.

These projects write data/raw (the records and the manifest) themselves, as collect would: a
document source that names languages, and records with a meta url, are collect's to read."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    REPO,
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
    text_source,
    tiny_params,
    write_jsonl,
    write_params,
)

from pipeline.core.common import PipelineError
from pipeline.data.web_rules import Blocklist, punctuated_share, remove_lines

EN = [
    "The committee met on a grey morning to weigh the harbour plans.",
    "After a long argument about tides and costs it chose the northern site.",
    "Rain fell on the old town all night.",
    "By dawn the river had risen over the lower streets.",
    "London is the capital of England and its largest city.",
    "In summer we often visited our grandmother in the village and swam in the lake.",
    "The scientists argued for a long time about the causes, but never agreed.",
]
RU = [
    "Комитет собрался серым утром, чтобы обсудить планы строительства гавани.",
    "После долгого спора о приливах и расходах он выбрал северный участок.",
    "Всю ночь над старым городом шёл дождь.",
    "К рассвету река вышла из берегов и затопила нижние улицы.",
    "Москва является столицей России и крупнейшим городом страны.",
    "Летом мы часто ездили к бабушке в деревню и купались в озере.",
    "Учёные долго спорили о причинах этого явления, но так и не пришли к согласию.",
]
ZH = "委员会在一个阴沉的早晨开会，讨论港口建设计划。\n经过关于潮汐和费用的长时间争论，他们选择了北边的地点。"
JA = "委員会は曇った朝に集まり、港の建設計画について話し合った。\n潮の流れと費用について長い議論の末、北側の場所を選んだ。"
GOOD_PAIRS = [  # long enough that each side is identified with confidence
    (
        "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
        "Блаженны нищие духом, ибо их есть Царство Небесное.",
    ),
    ("Blessed are they that mourn: for they shall be comforted.", "Блаженны плачущие, ибо они утешатся."),
    ("Blessed are the meek: for they shall inherit the earth.", "Блаженны кроткие, ибо они наследуют землю."),
]
WEB = {  # all on
    "min_punctuated_lines": 0.5,
    "drop_lorem_ipsum": True,
    "drop_javascript_lines": True,
    "drop_cookie_lines": True,
}


def prose(sentences: list[str], label: str) -> list[str]:
    """42 documents of two sentences each (every ordered pair), numbered."""
    return [f"{a} {b} {label} {i}." for i, (a, b) in enumerate(itertools.permutations(sentences, 2))]


def docs(texts: list[str]) -> list[dict]:
    return [{"text": t} for t in texts]


def good_pairs(n: int) -> list[dict]:
    return [
        {
            "src": f"{GOOD_PAIRS[i % 3][0]} {GOOD_PAIRS[(i + 1) % 3][0]} [{i}]",
            "tgt": f"{GOOD_PAIRS[i % 3][1]} {GOOD_PAIRS[(i + 1) % 3][1]} [{i}]",
        }
        for i in range(n)
    ]


def raw_project(
    folder: Path, sources: dict[str, tuple[list[dict], list[str]]], run: dict | None = None, **clean
) -> Path:
    """A project whose data/raw holds these sources, {name: (records, languages)}, as collect writes
    them (a source of pairs when its first record is one); clean overrides `clean` params, `run`
    clean_run's (one worker unless asked: call_stage runs clean in this process, not forked)."""
    entries, params_sources = [], []
    for name, (records, languages) in sources.items():
        pairs = "src" in records[0]
        write_jsonl(folder / "data" / "raw" / f"{name}.jsonl", records)
        lang = {"languages": languages} if languages else {}
        entries.append(
            {"name": name, "kind": "file", "license": "unknown", "pairs": pairs, **lang, "documents": len(records)}
        )
        source = jsonl_source if pairs else text_source
        params_sources.append(source(name, f"corpus/{name}", **lang))
    (folder / "data" / "raw" / "manifest.json").write_text(json.dumps({"sources": entries}), encoding="utf-8")
    collect = {"sources": params_sources, "max_documents": 0}
    write_params(folder, tiny_params(collect, clean=clean, clean_run={"workers": 1, **(run or {})}))
    return folder


def kept(folder: Path) -> list[dict]:
    return [r for split in ("train", "val", "test") for r in read_split(folder, split)]


def by_text(folder: Path) -> dict[str, dict]:
    return {r.get("text", r.get("src")): r for r in kept(folder)}


def report(folder: Path) -> str:
    return (folder / "metrics" / "clean_report.md").read_text(encoding="utf-8")


# --- language identification ------------------------------------------------------------------


def test_language_id_labels_english_russian_chinese_and_japanese(tmp_path):
    ru = " ".join(RU[:3])
    folder = raw_project(tmp_path, {"docs": (docs(prose(EN, "Entry") + [ru, ZH, JA]), [])}, language_id=True)
    call_stage("clean", folder)
    records = by_text(folder)
    assert {text: records[text]["lang"] for text in (ru, ZH, JA)} == {ru: "ru", ZH: "zh", JA: "ja"}
    assert {r["lang"] for text, r in records.items() if " Entry " in text} == {"en"}
    line = records[JA]
    assert list(line) == ["source", "text", "lang", "lang_score"] and "tgt_lang" not in line
    assert 0.9 <= line["lang_score"] <= 1 and line["lang_score"] == round(line["lang_score"], 4)
    metrics = read_clean_metrics(folder)
    assert metrics["dropped"]["language"] == 0  # a source without languages keeps every language
    assert metrics["languages"] == {"docs": {"en": metrics["documents_kept"] - 3, "ja": 1, "ru": 1, "zh": 1}}
    text = report(folder)
    assert "## Languages" in text and "| docs, ru " in text and "| docs, en " in text


def test_a_source_naming_languages_keeps_only_those(tmp_path):
    """[ru] keeps Russian only; [ru, zh] keeps both, and its documents carry no target language."""
    ru_only = docs(prose(RU, "Запись") + [" ".join(EN[:3]), ZH])
    ru_zh = docs([" ".join(RU[2:5]), ZH, JA, " ".join(EN[2:5])])
    folder = raw_project(tmp_path, {"ru": (ru_only, ["ru"]), "ru_zh": (ru_zh, ["ru", "zh"])}, language_id=True)
    call_stage("clean", folder)
    records = kept(folder)
    assert {r["lang"] for r in records if r["source"] == "ru"} == {"ru"}
    assert sorted(r["lang"] for r in records if r["source"] == "ru_zh") == ["ru", "zh"]
    assert not [r for r in records if "tgt_lang" in r]
    metrics = read_clean_metrics(folder)
    assert metrics["sources"]["ru"]["dropped"]["language"] == 2
    assert metrics["sources"]["ru_zh"]["dropped"]["language"] == 2
    assert metrics["languages"] == {"ru": {"ru": 42}, "ru_zh": {"ru": 1, "zh": 1}}
    assert "**language** (ru)" in report(folder)


def test_each_side_of_a_pair_must_be_its_declared_language(tmp_path):
    good = good_pairs(40)
    swapped = {"src": good[0]["tgt"], "tgt": good[0]["src"] + " (swapped)"}
    wrong_target = {"src": " ".join(EN[:2]), "tgt": ZH.replace("\n", " ")}
    english_both = {"src": " ".join(EN[2:4]), "tgt": " ".join(EN[4:6])}
    pairs = good + [swapped, wrong_target, english_both]
    folder = raw_project(tmp_path, {"pairs": (pairs, ["en", "ru"])}, language_id=True)
    call_stage("clean", folder)
    records = kept(folder)
    assert len(records) == 40 and all(r["tgt_lang"] == "ru" and "lang" not in r for r in records)
    metrics = read_clean_metrics(folder)
    assert metrics["dropped"]["language"] == 3
    assert metrics["languages"] == {"pairs": {"en": 40, "ru": 40}}


def test_an_unknown_language_code_is_a_one_line_error(tmp_path):
    folder = raw_project(tmp_path, {"docs": (docs(prose(EN, "Entry")), ["en", "xx"])}, language_id=True)
    stage_error("clean", folder, "source 'docs'", "'xx'", "language_id")
    assert not (folder / "data" / "clean").exists()
    write_params(folder, tiny_params({"sources": [text_source("docs", "corpus/docs", languages=["en", "xx"])]}))
    call_stage("clean", folder)  # without language_id the codes are not checked


@pytest.mark.parametrize("min_score, kept_it", [(0.5, True), (0.7, False)])
def test_min_language_score(tmp_path, min_score, kept_it):
    short = "Москва — столица России."  # Russian, identified with about 0.6
    folder = raw_project(
        tmp_path, {"ru": (docs(prose(RU, "Запись") + [short]), ["ru"])}, language_id=True, min_language_score=min_score
    )
    call_stage("clean", folder)
    records = by_text(folder)
    assert (short in records) == kept_it
    if kept_it:
        assert records[short]["lang"] == "ru" and 0.5 <= records[short]["lang_score"] < 0.7
    assert read_clean_metrics(folder)["dropped"]["language"] == (0 if kept_it else 1)


# --- the web's filters ------------------------------------------------------------------------------


def page(text: str, url: str | None = None) -> dict:
    return {"text": text, **({"meta": {"url": url}} if url else {})}


def test_the_web_filters_drop_remove_and_count(tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# test list\n\nexample.com  # and its subdomains\nonion\n*://*porn*\n", encoding="utf-8")
    chinese = "北京是中国的首都。\n长城很长！\n你去过上海吗？"
    russian = "Москва — столица России.\nОн сказал: «Пора домой.»\nЛетом мы ездили в деревню и купались в озере."
    mixed = "Latest news\nThe harbour plans were approved today.\nThe work starts in May."
    pages = {
        "url_blocked": [
            page("A shop page.", "https://www.Example.com:8080/shop"),
            page("A hidden service.", "http://abcdefgh.onion/"),
            page("An adult page.", "https://PornSite.net/videos"),
        ],
        "lorem_ipsum": [page("Lorem Ipsum dolor sit amet, consectetur adipiscing elit.")],
        "punctuated_lines": [page("Home\nAbout us\nProducts\nContact\nLogin")],
        "empty": [page("Please enable JavaScript to view this page.")],
        "kept": [
            page(chinese, "https://notexample.com/a"),
            page(russian, "https://example.com.evil.org/b"),
            page(mixed),
            page("Please enable JavaScript to see the comments.\nThe river rose over the lower streets."),
            page("This site uses cookies.\nRead our Privacy Policy and Terms of Use.\nThe harbour closed at noon."),
        ],
    }
    records = docs(prose(EN, "Entry")) + [p for group in pages.values() for p in group]
    unpunctuated_pairs = [{"src": f"javascript and cookies {i}", "tgt": f"lorem ipsum {i}"} for i in range(3)]
    folder = raw_project(
        tmp_path,
        {"docs": (records, []), "pairs": (filler_pairs(20) + unpunctuated_pairs, [])},
        url_blocklist=str(blocklist),
        **WEB,
    )
    call_stage("clean", folder)
    texts = by_text(folder)
    assert chinese in texts and russian in texts and mixed in texts
    assert "The river rose over the lower streets." in texts  # the JavaScript line removed
    assert "The harbour closed at noon." in texts  # the cookie and policy lines removed
    assert all(p["src"] in texts for p in unpunctuated_pairs)  # pairs: none of the web's filters
    metrics = read_clean_metrics(folder)
    dropped = metrics["sources"]["docs"]["dropped"]
    assert {reason: dropped[reason] for reason in pages if reason != "kept"} == {
        "url_blocked": 3,
        "lorem_ipsum": 1,
        "punctuated_lines": 1,
        "empty": 1,
    }
    assert metrics["lines_removed"] == {"javascript": 2, "cookie": 2}
    assert "language" not in metrics["dropped"] and "languages" not in metrics
    lines = report(folder).splitlines()
    assert "lines removed: javascript 2, cookie 2;" in lines[2]
    for reason in ("url_blocked", "lorem_ipsum", "punctuated_lines"):
        assert [line for line in lines if line.startswith(f"| {reason} ")], reason
        assert [line for line in lines if line.startswith(f"- **{reason}** (docs)")], reason


def test_blocklist_domains_subdomains_and_globs(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# domains\nexample.com\n.onion\n\n# globs\n*://*porn*\n*/ads/*  # ad servers\n", encoding="utf-8")
    blocklist = Blocklist.read(str(path))
    assert blocklist.domains == {"example.com", "onion"} and blocklist.globs == ["*://*porn*", "*/ads/*"]
    blocked = [
        "http://example.com",
        "https://www.EXAMPLE.com:443/page?q=1",
        "https://a.b.example.com./x",
        "http://3g2upl4pq6kufc4m.onion/",
        "https://PornSite.net/",
        "https://news.example.org/ADS/banner.png",
        "example.com/page",  # no scheme
    ]
    allowed = ["https://notexample.com/", "https://example.com.evil.org/", "https://onion.news/", "http://[::1/x"]
    assert [u for u in blocked if not blocklist.blocks(u)] == []
    assert [u for u in allowed if blocklist.blocks(u)] == []
    example = Blocklist.read(str(REPO / "params" / "url_blocklist.txt"))  # the repository's example
    assert example.domains == {"onion"} and example.blocks("https://www.xxx-videos.example/")
    assert not example.blocks("https://en.wikipedia.org/wiki/Harbour")
    path.write_text("example.com\nhttp://example.org/page\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"list\.txt:2: 'http://example\.org/page' is neither a domain"):
        Blocklist.read(str(path))


def test_a_missing_blocklist_is_a_one_line_error(tmp_path):
    folder = raw_project(tmp_path, {"docs": (docs(prose(EN, "Entry")), [])}, url_blocklist="lists/missing.txt")
    stage_error("clean", folder, "clean.url_blocklist", "lists/missing.txt")
    assert not (folder / "data" / "clean").exists()


def test_terminal_punctuation_in_every_script_and_removed_lines():
    assert punctuated_share("One.\nTwo!\nThree?\nFour…\n«Пять.»\n六。\n七！\n八？\n九｡\n“Ten.”\n(Eleven.)") == 1
    assert punctuated_share("Home\nAbout\n\nContact.") == 1 / 3
    counts = {"javascript": 0, "cookie": 0}
    text = remove_lines("Keep.\n\nJavaScript is off.\n\nWe use cookies here.\n\nAlso keep.", True, True, counts)
    assert text == "Keep.\n\nAlso keep." and counts == {"javascript": 1, "cookie": 1}
    assert remove_lines("Keep.\nWe use cookies.", True, False, counts) == "Keep.\nWe use cookies."


# --- workers, and everything off ------------------------------------------------------------------


def test_output_is_identical_for_one_and_two_workers_with_everything_on(tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("example.com\n*://*porn*\n", encoding="utf-8")
    pages = [
        page(
            text + ("\nPlease enable JavaScript." if i % 3 == 0 else ""),
            f"https://{'www.example.com' if i % 7 == 0 else 'ok.org'}/{i}",
        )
        for i, text in enumerate(prose(EN, "Entry") + prose(RU, "Запись") + [ZH, JA, "Menu\nHome\nLogin"])
    ]
    sources = {
        "docs": (pages, ["en", "ru", "zh"]),
        "any": (docs(prose(RU, "Заметка")), []),
        "pairs": (good_pairs(30), ["en", "ru"]),
    }
    settings = {"language_id": True, "url_blocklist": str(blocklist), "near_dup": True, "decontaminate_ngram": 8, **WEB}
    outputs = []
    for workers in (1, 2):
        folder = raw_project(tmp_path / f"w{workers}", sources, {"workers": workers, "shard_bytes": 2000}, **settings)
        if workers == 1:
            call_stage("clean", folder)
        else:  # the command line, with its worker processes
            assert "(2 workers)" in run_stage("clean", folder).stdout
        outputs.append(snapshot(folder, "data/clean", "metrics/clean.json", "metrics/clean_report.md"))
    assert outputs[0] == outputs[1]
    metrics = json.loads(outputs[0]["metrics/clean.json"])
    assert metrics["dropped"]["language"] == 1 and metrics["dropped"]["url_blocked"] >= 10  # the Japanese page
    assert metrics["lines_removed"]["javascript"] > 10 and set(metrics["languages"]) == {"docs", "any", "pairs"}


def test_with_everything_off_the_output_is_as_it_was(tmp_path):
    folder = clean_project(tmp_path, filler_docs(40) + [{"text": ""}], pairs=filler_pairs(20))
    call_stage("clean", folder)
    metrics = read_clean_metrics(folder)
    assert list(metrics) == [
        "documents_kept",
        "bytes_kept",
        "dropped",
        "pii_replaced",
        "near_duplicate_clusters",
        "contaminated_removed_from_train",
        "splits",
        "sources",
        "default_qa",
    ]
    reasons = ["empty", "too_short", "too_long", "length_ratio"]
    reasons += ["quality_alpha", "quality_word_length", "quality_repeated_lines", "quality_repeated_bigram"]
    reasons += ["quality_symbols", "duplicate", "near_duplicate", "contaminated"]
    assert list(metrics["dropped"]) == reasons
    assert all(list(source["dropped"]) == reasons for source in metrics["sources"].values())
    assert {tuple(r) for r in kept(folder)} == {("source", "text"), ("source", "src", "tgt")}
    text = report(folder)
    assert "Languages" not in text and "lines removed" not in text
    code = "import sys, pipeline.clean; assert 'py3langid' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
