"""metrics/report.md: one page a reviewer reads in a minute (written by `evaluate`).

The model and its params, the data lineage (each source's version and sha256, token counts,
tokenizer settings), the metrics beside their baselines, the loss curve (metrics/loss.png), and
samples: continuations of the prompts, translations beside their references.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.core.common import read_json
from pipeline.core.paths import (
    CURVES_DIR,
    LOSS_PNG,
    MANIFEST,
    MODEL_CONFIG,
    TOKENIZE_METRICS,
    TRAIN_METRICS,
    TRAIN_TIMING,
)

SCORING_LABELS = {"per_byte": "per byte", "unnormalized": "unnormalised", "context_normalized": "context-normalised"}


def _curve(name: str) -> tuple[list[int], list[float]]:
    path = CURVES_DIR / f"{name}.tsv"
    if not path.is_file():
        return [], []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    key = name.rsplit("/", 1)[-1]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def plot_loss(path: Path = LOSS_PNG) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        label: _curve(name)
        for label, name in (("train (per step)", "train/step_loss"), ("train", "train/loss"), ("val", "val/loss"))
    }
    if not curves["val"][0]:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    steps, values = curves["train (per step)"]
    if steps:
        ax.plot(steps, values, color="#9ecae1", linewidth=0.8, label="train (per step)")
    for label, color in (("train", "#3182bd"), ("val", "#e6550d")):
        s, v = curves[label]
        ax.plot(s, v, marker="o", markersize=3, color=color, label=f"{label} (fixed windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def understanding_section(tasks: dict, qa: dict | None = None, answered: list[dict] = ()) -> list[str]:
    """ "Understanding and QA": a table of the multiple-choice and cloze tasks (model, bigram,
    chance, items, intervals), a table of the QA groups (exact match and F1 of greedy and beam
    answers beside the majority answer), and a few answered questions beside the truth."""
    if not tasks and not qa:
        return []
    lines = ["## Understanding and QA", ""]
    if tasks:
        lines += _tasks_table(tasks)
    if qa:
        lines += _qa_table(qa)
    if answered:
        cols = [k for k in ("greedy", "beam") if k in answered[0]]
        lines += ["Answered test questions:", ""]
        lines += _table(
            ["question", "truth", *cols],
            [[_esc(r["question"]), _esc(r["truth"]), *(_esc(r[c]) for c in cols)] for r in answered],
        )
    return lines


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _qa_table(qa: dict) -> list[str]:
    def cell(scores: dict | None) -> str:
        if not scores:
            return ""
        lo, hi = scores["exact_match_ci95"]
        return f"{scores['exact_match']} [{lo}, {hi}] / {scores['f1']}"

    lines = [
        "Question answering on the test QA pairs (the default set of `clean.qa_templates`, one question per "
        "template shown below the table, and any QA source): exact match [95% Wilson interval] / token F1, "
        "after SQuAD's normalisation; the baseline always gives the most frequent answer of the template's "
        "train items:",
        "",
    ]
    rows = []
    for group, g in qa["groups"].items():
        majority = f"{cell(g.get('majority'))} ({_esc(g['majority_answer'])})" if "majority" in g else ""
        rows.append([group, cell(g["greedy"]), cell(g.get("beam")), majority, g["items"], g["train_items"]])
    lines += _table(["template", "greedy", "beam", "majority answer", "test items", "train items"], rows)
    lines += [f"- {group}: {_esc(g['example_question'])}" for group, g in qa["groups"].items()] + [""]
    return lines


def _tasks_table(tasks: dict) -> list[str]:
    lines = [
        "Tasks built from the test split (data/tasks/) and any of `evaluate.task_files`; cloze by exact match; "
        "multiple choice by the log-likelihood of each choice, scored three ways: per byte, unnormalised, and "
        "context-normalised (after the context minus after an empty one, as GPT-3 scored some tasks). A "
        "default task's first columns use the scoring that did best on its twin built from val "
        "(data/tasks/val/, accuracies in brackets); a task of one's own is scored per byte. "
        "95% Wilson intervals:",
        "",
    ]
    rows = []
    for name, t in tasks.items():
        shown = t.get("headline", t)
        scoring = SCORING_LABELS.get(t.get("scoring"), "")
        if "scoring_val" in t:
            val = ", ".join(f"{SCORING_LABELS[k]} {v}" for k, v in t["scoring_val"]["model"].items())
            scoring += f" (val, {t['scoring_val']['items']} items: {val})"
        variants = [_accuracy_cell(t.get(k)) for k in ("model", "model_unnormalized", "model_context_normalized")]
        rows.append(
            [
                name,
                _accuracy_cell(shown["model"]),
                _accuracy_cell(shown["bigram"]),
                t["chance"],
                t["items"],
                scoring,
                *variants,
            ]
        )
    lines += _table(
        ["task", "model", "bigram", "chance", "items", "scoring", "per byte", "unnormalised", "context-normalised"],
        rows,
    )
    return lines


def _accuracy_cell(scores: dict | None) -> str:
    if not scores:
        return ""
    lo, hi = scores["ci95"]
    return f"{scores['accuracy']} [{lo}, {hi}]"


def _decoding_label(direction: dict, name: str) -> str:
    """greedy, copy_source, or the beam with its size, length penalty and repetition penalty."""
    scores = direction[name]
    return decoding_words(scores) if name == "beam" and "beam_size" in scores else name


def decoding_words(point: dict) -> str:
    """A beam's size, length penalty and (where there is one) repetition penalty, in words."""
    return f"beam {point['beam_size']}, length penalty {point['length_penalty']:g}" + (
        f", repetition penalty {point['repetition_penalty']:g}" if point.get("repetition_penalty", 1.0) != 1.0 else ""
    )


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _ci(scores: dict, name: str) -> str:
    ci = scores.get(f"{name}_ci95")
    return f"{scores[name]} ± {ci}" if ci is not None else str(scores[name])


def translation_table(translations: list[dict]) -> list[str]:
    """Example translations, a table per direction (pair source)."""
    cols = [k for k in ("greedy", "beam") if k in translations[0]]
    lines = ["## Translations", ""]
    for direction in dict.fromkeys(row["direction"] for row in translations):
        lines += [
            f"{direction}:",
            "",
            "| source | reference | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        for row in translations:
            if row["direction"] == direction:
                lines.append(
                    f"| {_esc(row['src'])} | {_esc(row['ref'])} | " + " | ".join(_esc(row[c]) for c in cols) + " |"
                )
        lines.append("")
    return lines


def first_per_prompt(samples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first (prompt, continuation) of each prompt, in order."""
    first: dict[str, str] = {}
    for prompt, text in samples:
        first.setdefault(prompt, text)
    return list(first.items())


def report_markdown(
    metrics: dict, samples: list[tuple[str, str]], translations: list[dict], answered: list[dict] = ()
) -> str:
    """The report's text. It reads the other stages' outputs (config, train metrics, manifest),
    and writes nothing: evaluate builds it before writing any of its outputs, so a missing input
    leaves them all as they were."""
    model_info = read_json(MODEL_CONFIG)
    train = read_json(TRAIN_METRICS) | read_json(TRAIN_TIMING)
    manifest = read_json(MANIFEST)["sources"]
    tok = read_json(TOKENIZE_METRICS)
    val, test = metrics["val"], metrics["test"]
    lines = _headline(model_info, train, val)
    translation = metrics.get("translation")
    directions = translation["directions"] if translation else {}
    lines += _translation_summary(directions)
    lines += _model_section(model_info)
    lines += _data_section(manifest)
    lines += _tokenizer_section(tok)
    lines += _bits_per_byte_section(val, test)
    for source, direction in directions.items():
        lines += _translation_scores(source, direction, translation)
    lines += _generation_section(metrics.get("generation"))
    lines += understanding_section(metrics.get("understanding") or {}, metrics.get("question_answering"), answered)
    lines += _loss_section()
    lines += _samples_section(samples, translations)
    return "\n".join(lines)


def _headline(model_info: dict, train: dict, val: dict) -> list[str]:
    """The title and the one sentence a reviewer reads first: the model, its training and its val bits per byte."""
    model_cfg = model_info["model"]
    mfu = "" if train.get("mfu") is None else f" at {train['mfu']:.0%} MFU"
    return [
        "# Evaluation report",
        "",
        f"A {model_cfg['arch'].upper()} of {model_info['parameters']:,} parameters, trained {train['steps']} steps "
        f"({train['tokens_seen']:,} tokens, {train['train_seconds']} s on {train['device']}{mfu}), scores "
        f"**{val['bits_per_byte']} bits per byte** on val against {val['unigram_bits_per_byte']} for a "
        f"unigram and {val['bigram_bits_per_byte']} for a bigram model of the same tokens.",
        "",
    ]


def _translation_summary(directions: dict) -> list[str]:
    """A sentence per translation direction under the headline: its best decoding beside copying the source."""
    lines = []
    for source, direction in directions.items():
        best = direction.get("beam", direction["greedy"])
        decoding = _decoding_label(direction, "beam" if "beam" in direction else "greedy")
        lines += [
            f"Translating {direction['pairs']:,} held-out pairs of {source}, it reaches chrF {best['chrf']} and BLEU "
            f"{best['bleu']} ({decoding}); copying the source scores chrF {direction['copy_source']['chrf']}, "
            f"BLEU {direction['copy_source']['bleu']}.",
            "",
        ]
    return lines


def _model_section(model_info: dict) -> list[str]:
    """ "Model": the architecture's settings, the parameter count, the train params and the best checkpoint."""
    lines = ["## Model", ""]
    lines += _table(
        ["key", "value"],
        [[k, v] for k, v in model_info["model"].items()]
        + [
            ["parameters", f"{model_info['parameters']:,}"],
            *[[f"train.{k}", v] for k, v in model_info.get("train", {}).items()],
            ["best checkpoint", f"step {model_info['best_step']}"],
        ],
    )
    return lines


def _data_section(manifest: list[dict]) -> list[str]:
    """ "Data": the lineage of each source (version, sha256, licence) with its documents and bytes."""
    lines = ["## Data", ""]
    lines += _table(
        ["source", "version", "sha256", "license", "documents", "bytes"],
        [
            [
                s["name"],
                s.get("package", s.get("path", "")),
                f"`{s['sha256'][:12]}…`" if s.get("sha256") else "",
                s["license"],
                f"{s['documents']:,}",
                f"{s['bytes']:,}",
            ]
            for s in manifest
        ],
    )
    return lines


def _tokenizer_section(tok: dict) -> list[str]:
    """The tokenizer's settings and a table of tokens and bytes per split (the end of "Data")."""
    lines = [
        f"Tokenizer: sentencepiece {tok['model_type']}, vocabulary {tok['vocab_size']:,}, trained on the "
        f"train split only.",
        "",
    ]
    lines += _table(
        ["split", "tokens", "bytes", "bytes/token"],
        [[s, f"{v['tokens']:,}", f"{v['bytes']:,}", v["bytes_per_token"]] for s, v in tok["splits"].items()],
    )
    return lines


def _bits_per_byte_section(val: dict, test: dict) -> list[str]:
    """ "Metrics" opens with bits per byte of val and test, in all and per source, beside the baselines."""
    lines = [
        "## Metrics",
        "",
        "Bits per byte: total nats / ln 2 / UTF-8 bytes of the text (lower is better; "
        "comparable across tokenizers). The nats include predicting </s>, <src> and <tgt>; the text "
        "column leaves those predictions out (nanochat's convention), over the same bytes.",
        "",
    ]
    rows = []
    for split, res in (("val", val), ("test", test)):
        rows.append(
            [
                f"**{split}**",
                f"**{res['bits_per_byte']}**",
                res["text_only"]["bits_per_byte"],
                res["unigram_bits_per_byte"],
                res["bigram_bits_per_byte"],
                res["perplexity"],
            ]
        )
        for name, source in res["sources"].items():
            rows.append(
                [
                    f"{split} / {name}",
                    source["bits_per_byte"],
                    source["text_only"]["bits_per_byte"],
                    source["unigram_bits_per_byte"],
                    source["bigram_bits_per_byte"],
                    source["perplexity"],
                ]
            )
    lines += _table(["split / source", "model bits/byte", "text tokens alone", "unigram", "bigram", "perplexity"], rows)
    return lines


def _translation_scores(source: str, direction: dict, translation: dict) -> list[str]:
    """One translation direction's scores in "Metrics": chrF, BLEU and TER per decoding, and their signatures."""
    rows = [
        [
            _decoding_label(direction, name),
            _ci(direction[name], "chrf"),
            _ci(direction[name], "bleu"),
            _ci(direction[name], "ter"),
            direction[name].get("length_ratio", ""),
        ]
        for name in ("greedy", "beam", "copy_source")
        if name in direction
    ]
    language = f" (into {direction['target_language']})" if "target_language" in direction else ""
    lines = [
        f"Translation, {source}{language}: {direction['pairs']:,} test pairs (95% bootstrap intervals, "
        f"{translation['bootstrap_samples']} samples; BLEU tokenizer `{direction['bleu_tokenize']}`; "
        "TER: lower is better; length: the output's characters over the references'):",
        "",
    ]
    lines += _table(["decoding", "chrF", "BLEU", "TER", "length"], rows)
    lines += ["Signatures: " + "; ".join(f"`{v}`" for v in direction["signatures"].values()), ""]
    tuned = direction.get("beam_chosen_on_val")
    if tuned:
        lines += _beam_choice(tuned)
    return lines


def _beam_choice(tuned: dict) -> list[str]:
    """The grid of beam settings tried on val, each with its scores, that chose the beam's settings."""
    grid = ", ".join(
        f"{g['beam_size']}/{g['length_penalty']:g}/{g.get('repetition_penalty', 1.0):g}: {g['chrf']}"
        + (f" ({g['bleu']}, {g['length_ratio']})" if "length_ratio" in g else "")
        for g in tuned["grid"]
    )
    return [
        f"The beam's size, length penalty and repetition penalty were chosen by chrF on the first "
        f"{tuned['pairs']} val pairs (size/length penalty/repetition penalty: chrF (BLEU, length)): {grid}.",
        "",
    ]


def _generation_section(generation: dict | None) -> list[str]:
    """The end of "Metrics": sampled text beside held-out text (diversity, repetition, length); none without it."""
    if not generation:
        return []
    keys = ["distinct_1", "distinct_2", "repeated_4gram_fraction", "mean_words", "texts"]
    lines = [
        "Sampled text beside real held-out text of the same lengths (in words; a character counts as one in scripts written without spaces):",
        "",
    ]
    lines += _table(
        ["text"] + keys, [[name] + [generation[name][k] for k in keys] for name in ("model", "held_out_text")]
    )
    return lines


def _loss_section() -> list[str]:
    """ "Loss": the loss curve, where there is a val curve for plot_loss() to draw."""
    if _curve("val/loss")[0]:  # plot_loss() draws it
        return ["## Loss", "", f"![loss curve]({LOSS_PNG.name})", ""]
    return []


def _samples_section(samples: list[tuple[str, str]], translations: list[dict]) -> list[str]:
    """ "Samples": the first continuation of each prompt (600 characters at most), then the example translations."""
    lines = ["## Samples", ""]
    for prompt, text in first_per_prompt(samples):
        lines += ["```", (prompt + text).strip()[:600], "```", ""]
    if translations:
        lines += translation_table(translations)
    return lines


def samples_markdown(samples: list[tuple[str, str]], e, translations: list[dict]) -> str:
    lines = [
        "# Samples",
        "",
        f"Sampled with temperature {e.temperature}, top-k {e.top_k}, top-p {e.top_p}, repetition penalty "
        f"{e.repetition_penalty}, seed {e.seed}, up to {e.sample_tokens} new tokens; the first sample of each prompt.",
        "",
    ]
    for prompt, text in first_per_prompt(samples):
        lines += [f"## {prompt}", "", "```", prompt + text, "```", ""]
    if translations:
        lines += translation_table(translations)
    return "\n".join(lines)
