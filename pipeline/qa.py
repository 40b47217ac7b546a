"""Question answering: question/answer pairs trained and decoded with the pair machinery, the
default QA set built from the corpus's own structure, and the metrics of the field.

A QA pair is a pair with a task tag: `<src> <qa> question <tgt> answer </s>`, where the question
carries its passage first when it has one (reading comprehension): `context \\n\\n question`.
QA sources (`task: qa` in collect, columns `question`, `answer` and optional `context`) and the
default set below are both read into that form, so training, decoding and `generate --ask` share it.

The default set (`clean.qa_templates`) is made from the cleaned splits, each item in the split of
the passage it comes from (no test passage is trained on), at most `clean.qa_items` per template
(chosen by a hash of the question, so the choice is deterministic and independent of order):
- who_says: "Who says: '<first line of a speech>'?" -> the speaker (plays: a speaker's name in
  capitals on a line of its own, then the speech);
- which_play: "In which play does <SPEAKER> say: '<line>'?" -> the title (the first line of the
  play's file);
- which_book: "Which book contains: '<verse>'?" -> the book (records whose source query returns a
  `meta_book` column, as the default Bible's does).
A question asked in two splits is kept only in train.

Scores: exact match and token F1 after SQuAD's normalisation (lower case, no punctuation, no
articles a/an/the, single spaces; tokens are words, or characters of scripts written without
spaces), exact match with its 95% Wilson interval and F1 with a bootstrap interval, beside the
majority answer of the template's train items, for greedy and beam decoding.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter

import numpy as np

from pipeline.common import PipelineError

TASK = "qa"
DEFAULT_QA_SOURCE = "default_qa"  # the source name of the default set's items in the split files
TEMPLATES = ("who_says", "which_play", "which_book")
SPEAKER = re.compile(r"^([A-Z][A-Z' ]{1,30}[A-Z])\.$")  # "HELENA." on a line of its own
MIN_LINE = 20  # characters of a quoted line
MAX_QUOTE = 160  # characters of a quoted line or verse kept in a question


def question_text(question: str, context: str = "") -> str:
    """The source side of a QA pair: the question, after its passage when it has one."""
    return f"{context.strip()}\n\n{question.strip()}" if context.strip() else question.strip()


# --- the default QA set ---------------------------------------------------------------------


def _quote(line: str) -> str:
    line = line.strip()
    return line if len(line) <= MAX_QUOTE else line[:MAX_QUOTE].rsplit(" ", 1)[0] + " ..."


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line of the speech) of each speech in a passage of a play."""
    out = []
    for block in text.split("\n\n"):
        head, _, speech = block.strip("\n").partition("\n")
        m = SPEAKER.match(head.strip())
        first = speech.strip().split("\n", 1)[0].strip()
        if m and len(first) >= MIN_LINE and not first.startswith("["):
            out.append((m.group(1), first))
    return out


def passage_items(record: dict, titles: dict[tuple[str, str], str], templates) -> list[dict]:
    """Every QA item one passage (a cleaned record) offers, over the chosen templates. `titles`:
    the title of each (source, origin file)."""
    items = []
    if "text" in record:
        for speaker, line in speeches(record["text"]):
            if "who_says" in templates:
                items.append(("who_says", f"Who says: '{_quote(line)}'?", speaker))
            title = titles.get((record.get("source"), record.get("origin")))
            if "which_play" in templates and title:
                items.append(("which_play", f"In which play does {speaker} say: '{_quote(line)}'?", title))
    book = (record.get("meta") or {}).get("book")
    if "which_book" in templates and book:
        verse = record.get("src", record.get("text", ""))
        items.append(("which_book", f"Which book contains: '{_quote(verse)}'?", str(book)))
    return [{"src": q, "tgt": a, "task": TASK, "template": t} for t, q, a in items]


def default_items(splits: dict[str, list[dict]], titles: dict, templates, cap: int, salt: str) -> dict:
    """The default QA items per split: {split: [item...]}, at most `cap` per template in all."""
    candidates = [
        (split, item)
        for split, records in splits.items()
        for r in records
        for item in passage_items(r, titles, templates)
    ]
    in_train = {item["src"] for split, item in candidates if split == "train"}
    seen: set = set()
    kept = []
    for split, item in candidates:
        if (split != "train" and item["src"] in in_train) or (split, item["src"]) in seen:
            continue  # a question asked in train too (a line said twice), or twice in one split
        seen.add((split, item["src"]))
        kept.append((split, item))

    def draw(entry) -> bytes:
        return hashlib.blake2b(f"{salt}\0{entry[1]['template']}\0{entry[1]['src']}".encode()).digest()

    out: dict[str, list[dict]] = {split: [] for split in splits}
    for template in templates:
        for split, item in sorted((e for e in kept if e[1]["template"] == template), key=draw)[:cap]:
            out[split].append(item)
    return out


# --- scores ---------------------------------------------------------------------------------

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
    from pipeline.scoring import units

    pred, gold = units(normalize_answer(prediction)), units(normalize_answer(truth))
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def first_answer(text: str) -> str:
    """The answer a model wrote: its first line (an answer is short; what follows is not it)."""
    return text.strip().split("\n", 1)[0].strip()


def interval_of_mean(values: list[float], resamples: int, seed: int = 0) -> list[float]:
    """A 95% percentile bootstrap interval of a mean."""
    if not values or resamples == 0:
        return []
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def answer_scores(predictions: list[str], truths: list[str], resamples: int) -> dict:
    """Exact match (with a Wilson interval) and token F1 (with a bootstrap interval)."""
    from pipeline.understanding import wilson

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


def check_question(question: str, key: str = "--ask") -> str:
    if not question.strip():
        raise PipelineError(f"{key}: the question is empty")
    return question


# --- answering the test questions -----------------------------------------------------------

SHOWN_ANSWERS = 5
ANSWER_TOKENS = 32  # an answer is a name or a title


def qa_items(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("task") == TASK]


def answer(
    model, tok, questions: list[str], decoding, batch_size: int, device: str, label: str | None = None
) -> list[str]:
    """The model's answers: each question rendered as in training, its first line decoded."""
    from pipeline.generate import generate

    limit = model.block_size - decoding.max_new_tokens if model.bounded_context else None
    prompts = [tok.pair_prompt(ids, task=TASK) for ids in tok.encode(questions)]
    prompts = [p[-limit:] if limit else p for p in prompts]  # a long passage is cut from the left
    out = generate(model, prompts, tok.eos_id, decoding, batch_size=batch_size, device=device, progress=label)
    return [first_answer(tok.decode(o)) for o in out]


def answer_test_questions(
    model, tok, e, device: str, test: list[dict], train: list[dict]
) -> tuple[dict | None, list[dict]]:
    """Exact match and F1 of greedy and beam answers to the test questions, per template (or QA
    source), beside always giving the majority answer of the same group's train items; and the
    first answered questions to show."""
    from pipeline.generate import Decoding

    items, train_items = qa_items(test), qa_items(train)
    if not items or TASK not in tok.tasks:
        return None, []
    majority = majority_answers(train_items)
    new_tokens = min(ANSWER_TOKENS, e.max_new_tokens)
    decodings = {"greedy": Decoding(new_tokens)}
    if e.beam_size > 1:
        decodings["beam"] = Decoding(new_tokens, beam_size=e.beam_size, length_penalty=e.length_penalty)
    answers = {
        name: answer(model, tok, [r["src"] for r in items], d, e.batch_size, device, f"answer ({name})")
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
