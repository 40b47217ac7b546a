"""Question answering, scored as the field does: exact match and token F1 after SQuAD's
normalisation (lower case, no punctuation, no articles a/an/the, single spaces; tokens are words,
or characters of scripts written without spaces), exact match with its 95% Wilson interval and F1
with a bootstrap interval, beside the majority answer of the template's train items, for greedy
and beam decoding (the answers: pipeline.decoding.answer; the items: pipeline.data.qa).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from pipeline.data.qa import TASK
from pipeline.decoding.answer import ANSWER_TOKENS, answer
from pipeline.decoding.decode import Decoding, compiles
from pipeline.evaluation.scoring import interval_of_mean, units, wilson

PUNCTUATION = set(string.punctuation) | {
    "“",
    "”",
    "‘",
    "’",
    "«",
    "»",
    "—",
    "–",
    "…",
    "。",
    "，",
    "、",
    "？",
    "！",
    "：",
    "；",
}
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(truth)


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's token F1 of the normalised answers (tokens: words, or characters of scripts
    written without spaces, so a Chinese answer is scored by its characters)."""
    pred, gold = units(normalize_answer(prediction)), units(normalize_answer(truth))
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: list[str], truths: list[str], resamples: int) -> dict:
    """Exact match (with a Wilson interval) and token F1 (with a bootstrap interval)."""
    em = [exact_match(p, t) for p, t in zip(predictions, truths)]
    f1 = [token_f1(p, t) for p, t in zip(predictions, truths)]
    lo, hi = wilson(sum(em), len(em))
    return {
        "exact_match": round(sum(em) / max(len(em), 1), 4),
        "exact_match_ci95": [round(lo, 4), round(hi, 4)],
        "f1": round(float(np.mean(f1)) if f1 else 0.0, 4),
        "f1_ci95": interval_of_mean(f1, resamples),
    }


def group_of(record: dict) -> str:
    """What a QA item is scored under: its template, or its source for a QA source of the user's."""
    return record.get("template") or record["source"]


def majority_answers(train_items: list[dict]) -> dict[str, str]:
    """The most frequent answer (after normalisation) of each group's train items, as first
    written (ties: the first in sorted order)."""
    counts: dict[str, Counter] = {}
    written: dict[str, str] = {}
    for r in train_items:
        key = normalize_answer(r["tgt"])
        counts.setdefault(group_of(r), Counter())[key] += 1
        written.setdefault(key, r["tgt"])
    return {g: written[min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]] for g, c in counts.items()}


SHOWN_ANSWERS = 5


def qa_items(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("task") == TASK]


def answer_test_questions(
    model, tok, e, device: str, test: list[dict], train: list[dict]
) -> tuple[dict | None, list[dict]]:
    """Exact match and F1 of greedy and beam answers to the test questions, per template (or QA
    source), beside always giving the majority answer of the same group's train items; and the
    first answered questions to show."""
    items, train_items = qa_items(test), qa_items(train)
    if not items or TASK not in tok.tasks:
        return None, []
    majority = majority_answers(train_items)
    new_tokens = min(ANSWER_TOKENS, e.max_new_tokens)
    decodings = {"greedy": Decoding(new_tokens)}
    if e.beam_size > 1:
        decodings["beam"] = Decoding(new_tokens, beam_size=e.beam_size, length_penalty=e.length_penalty)
    answers = {
        name: answer(
            model,
            tok,
            [r["src"] for r in items],
            d,
            e.decode_batch_size,
            device,
            f"answer ({name})",
            compiles(e.compile, device),
        )
        for name, d in decodings.items()
    }
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(items):
        groups.setdefault(group_of(r), []).append(i)
    train_counts = Counter(group_of(r) for r in train_items)
    result: dict = {"metric": "exact match and token F1 after SQuAD normalisation", "groups": {}}
    for group, rows in groups.items():
        truths = [items[i]["tgt"] for i in rows]
        entry = {
            "items": len(rows),
            "train_items": train_counts[group],
            "example_question": items[rows[0]]["src"],
            **{name: answer_scores([a[i] for i in rows], truths, e.bootstrap) for name, a in answers.items()},
        }
        if group in majority:
            entry["majority_answer"] = majority[group]
            entry["majority"] = answer_scores([majority[group]] * len(rows), truths, e.bootstrap)
        result["groups"][group] = entry
    shown = [
        {"group": group_of(items[i]), "question": items[i]["src"], "truth": items[i]["tgt"]}
        | {name: a[i] for name, a in answers.items()}
        for i in _spread(groups, SHOWN_ANSWERS)
    ]
    return result, shown


def _spread(groups: dict[str, list[int]], n: int) -> list[int]:
    """n item indices, taken from the groups in turn (the first of each, then the second...)."""
    out, k = [], 0
    while len(out) < n and any(k < len(rows) for rows in groups.values()):
        out += [rows[k] for rows in groups.values() if k < len(rows)]
        k += 1
    return out[:n]
