"""Question answering data: the form of a QA pair and the default QA set built from the corpus.

A QA pair is a pair with a task tag: `<src> <qa> question <tgt> answer </s>`, where the question
carries its passage first when it has one (reading comprehension): `context \\n\\n question`.
QA sources (`task: qa` in collect, columns `question`, `answer` and optional `context`) and the
default set below are both read into that form, so training, decoding (pipeline.decoding.answer)
and scoring (pipeline.evaluation.qa) share it.

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
"""

from __future__ import annotations

import hashlib
import re

from pipeline.core.params import QA_TEMPLATES

TASK = "qa"
DEFAULT_QA_SOURCE = "default_qa"  # the source name of the default set's items in the split files
TEMPLATES = QA_TEMPLATES  # the names clean.qa_templates may hold (the schema declares them)
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
    return choose_items(candidates, list(splits), templates, cap, salt)


def choose_items(candidates: list[tuple[str, dict]], splits: list[str], templates, cap: int, salt: str) -> dict:
    """From every (split, item) the passages offer, in split then passage order: {split: [item...]},
    at most `cap` per template in all, a question asked in train too kept only there."""
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
