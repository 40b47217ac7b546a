"""Understanding: multiple-choice tasks scored by the model's likelihood, as the standard harnesses
do (HellaSwag, nanochat's CORE), and a cloze task scored by exact match.

A task is a JSON lines file, one item per line. A multiple-choice item is
    {"context": "...", "choices": ["...", "...", ...], "answer": 0}
and the model picks the choice it finds most likely after the context: the sum of its tokens'
log-probabilities, divided by the choice's UTF-8 bytes ("per byte"; the raw sum is reported too,
and the context-normalised likelihood: after the context minus after none). For the default tasks,
the scoring shown first is the one of the three that scores best on the same task built from val.
Two variants:
    {"context": "...", "choices": [...], "continuation": "...", "answer": i}
        the choices sit between context and continuation, and the model picks the choice after
        which the continuation is most likely (who speaks: "HELENA.\\n" before a speech);
    {"src": "...", "tgt_lang": "ru", "choices": [...], "answer": i}
        the context is a pair's prompt `<src> <2ru> source <tgt>`: which text translates `src`
        (with "task": "qa" instead of "tgt_lang", `<src> <qa> question <tgt>`: which answers it).
A cloze item {"context": "...", "answer_text": "word"} is scored by exact match of the first
word the model writes greedily.

The default tasks are built from the **test** split only (nothing in them was trained on), seeded:
- next_line: a few lines of a play, then the true next line among three lines of other test
  passages;
- who_speaks: a speech after the two speeches before it, and its speaker among three other
  characters of the same play (speakers in its test passages; a record's origin names its play);
- which_book: a test verse in the default QA set's which_book question (pipeline.data.qa), and its
  book among three other books;
- translation: an English verse, and its Russian translation among three other test verses';
- last_word: a passage whose last word already occurs in it (predictable from the context, in
  the manner of LAMBADA), that word to be written.
Each is scored beside the bigram baseline (the same likelihoods from train's bigram counts).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.common import PipelineError
from pipeline.data.qa import SPEAKER, passage_items
from pipeline.decoding.decode import Decoding, generate
from pipeline.evaluation.scoring import wilson

ITEMS_PER_TASK = 600
WORD = re.compile(r"[A-Za-z']+")


# --- building the default tasks from the test split ---------------------------------------------


def build_tasks(records: list[dict], seed: int, n: int = ITEMS_PER_TASK) -> dict[str, list[dict]]:
    """The default tasks from test records (text documents and pairs), deterministic in `seed`."""
    texts = [r["text"] for r in records if "text" in r]
    plays = [(r.get("origin") or r.get("source", ""), r["text"]) for r in records if "text" in r]
    pairs = [r for r in records if "src" in r and "task" not in r]
    tasks = {
        "next_line": next_line_items(texts, random.Random(f"{seed}/next_line"), n),
        "who_speaks": who_speaks_items(plays, random.Random(f"{seed}/who_speaks"), n),
        "which_book": which_book_items(records, random.Random(f"{seed}/which_book"), n),
        "translation": translation_items(pairs, random.Random(f"{seed}/translation"), n),
        "last_word": last_word_items(texts, random.Random(f"{seed}/last_word"), n),
    }
    return {name: items for name, items in tasks.items() if items}


def _verse_lines(text: str) -> list[str]:
    """Lines of a passage that are spoken text: not blank, not a speaker's name, not [a stage direction]."""
    return [
        line.strip()
        for line in text.split("\n")
        if len(line.strip()) >= 20 and not SPEAKER.match(line.strip()) and not line.strip().startswith("[")
    ]


def _pick(rng: random.Random, pool: list, k: int, exclude) -> list:
    out: list = []
    for _ in range(50 * k):
        if len(out) == k:
            break
        c = rng.choice(pool)
        if c != exclude and c not in out:
            out.append(c)
    return out if len(out) == k else []


def _shuffled(rng: random.Random, answer, distractors: list) -> tuple[list, int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def next_line_items(texts: list[str], rng: random.Random, n: int) -> list[dict]:
    pool = [(d, line) for d, t in enumerate(texts) for line in _verse_lines(t)]
    candidates = []
    for t in texts:
        lines = t.split("\n")
        for i in range(3, len(lines)):
            line = lines[i].strip()
            if len(line) >= 20 and not SPEAKER.match(line) and not line.startswith("[") and all(lines[i - 3 : i]):
                candidates.append(("\n".join(lines[max(0, i - 4) : i]) + "\n", line))
    items = []
    for context, line in rng.sample(candidates, min(n, len(candidates))):
        distractors = _pick(rng, [text for _, text in pool], 3, line)
        if distractors:
            choices, answer = _shuffled(rng, line, distractors)
            items.append({"context": context, "choices": choices, "answer": answer})
    return items


def who_speaks_items(texts: list[tuple[str, str]], rng: random.Random, n: int, by_speeches: bool = False) -> list[dict]:
    """(play, passage) pairs -> items: a speech after the two blocks before it, and its speaker
    among three other characters of the same play (a record's origin, its file; else its source),
    drawn uniformly, or `by_speeches`: as often as each speaks, as the true speakers are."""
    speeches = []  # (play, speaker, context before the speech, the speech)
    characters: dict[str, list[str]] = {}  # the speaker of each speech
    for play, t in texts:
        blocks = t.split("\n\n")
        for b, block in enumerate(blocks):
            head, _, speech = block.partition("\n")
            m = SPEAKER.match(head.strip())
            if m:
                characters.setdefault(play, []).append(m.group(1))
                if len(speech.strip()) >= 40 and b > 0:
                    before = "\n\n".join(blocks[max(0, b - 2) : b]) + "\n\n"
                    speeches.append((play, m.group(1), before, speech))
    items = []
    for play, name, before, speech in rng.sample(speeches, min(n, len(speeches))):
        others = characters[play] if by_speeches else sorted(set(characters[play]) - {name})
        distractors = _pick(rng, others, 3, name) if len(set(characters[play])) >= 4 else []
        if distractors:
            choices, answer = _shuffled(rng, name, distractors)
            items.append(
                {
                    "context": before,
                    "choices": [f"{c}.\n" for c in choices],
                    "continuation": speech,
                    "answer": answer,
                }
            )
    return items


def translation_items(pairs: list[dict], rng: random.Random, n: int) -> list[dict]:
    targets: dict[str, list[str]] = {}  # per source: distractors come from the same direction
    for p in pairs:
        targets.setdefault(p["source"], []).append(p["tgt"])
    items = []
    for r in rng.sample(pairs, min(n, len(pairs))):
        distractors = _pick(rng, targets[r["source"]], 3, r["tgt"])
        if distractors:
            choices, answer = _shuffled(rng, r["tgt"], distractors)
            item = {"src": r["src"], "choices": choices, "answer": answer}
            if r.get("tgt_lang"):
                item["tgt_lang"] = r["tgt_lang"]
            items.append(item)
    return items


def which_book_items(records: list[dict], rng: random.Random, n: int) -> list[dict]:
    """The default QA set's which_book question (pipeline.data.qa) about test verses (records with a
    book in their metadata) as multiple choice: the true book among three other books of test
    verses, scored after the question's QA prompt."""
    questions = [q for r in records if (r.get("meta") or {}).get("book") for q in passage_items(r, {}, ("which_book",))]
    books = sorted({r["tgt"] for r in questions})
    items = []
    for r in rng.sample(questions, min(n, len(questions))):
        distractors = _pick(rng, books, 3, r["tgt"])
        if distractors:
            choices, answer = _shuffled(rng, r["tgt"], distractors)
            items.append({"src": r["src"], "task": r["task"], "choices": choices, "answer": answer})
    return items


def last_word_items(texts: list[str], rng: random.Random, n: int) -> list[dict]:
    candidates = []
    for t in texts:
        lines = t.split("\n")
        for i in range(4, len(lines)):
            words = WORD.findall(lines[i])
            if len(words) < 4 or not lines[i].rstrip().endswith((".", ",", ";", ":", "!", "?")):
                continue
            last = words[-1]
            cut = lines[i].rfind(last)
            # the space before the word stays with it, as the tokenizer writes it (" word")
            context = "\n".join(lines[max(0, i - 8) : i]) + "\n" + lines[i][:cut].rstrip(" ")
            if len(last) >= 3 and re.search(rf"\b{re.escape(last)}\b", context[:-1]):
                candidates.append({"context": context, "answer_text": last})
    return rng.sample(candidates, min(n, len(candidates)))


# --- task files ------------------------------------------------------------------------------


def write_task(path: Path, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def read_task(path: Path) -> list[dict]:
    """A task file's items, checked: one line naming the file and line for the first bad one."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such task file")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise PipelineError(f"{path}:{lineno}: not valid JSON") from None
            items.append(check_item(item, f"{path}:{lineno}"))
    if not items:
        raise PipelineError(f"{path}: no items")
    kinds = {"answer_text" in item for item in items}
    if len(kinds) > 1:
        raise PipelineError(f"{path}: mixes cloze items (answer_text) and multiple-choice items")
    return items


def check_item(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise PipelineError(f"{where}: expected a JSON object")
    has_context = isinstance(item.get("context"), str) or isinstance(item.get("src"), str)
    if "answer_text" in item:
        if not isinstance(item.get("context"), str) or not isinstance(item["answer_text"], str):
            raise PipelineError(f"{where}: a cloze item needs string 'context' and 'answer_text'")
        return item
    choices = item.get("choices")
    if not has_context:
        raise PipelineError(f"{where}: expected a string 'context' (or 'src' for a translation item)")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise PipelineError(f"{where}: 'choices' must be a list of non-empty strings")
    if len(choices) < 2:
        raise PipelineError(f"{where}: {len(choices)} choice(s); a multiple-choice item needs at least two")
    answer = item.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise PipelineError(f"{where}: 'answer' must be the index of a choice (0 to {len(choices) - 1})")
    if "continuation" in item and not isinstance(item["continuation"], str):
        raise PipelineError(f"{where}: 'continuation' must be a string")
    return item


# --- scoring ---------------------------------------------------------------------------------


def choice_sequences(tok, item: dict, limit: int | None = None) -> list[tuple[list[int], int, int, int]]:
    """Per choice: (token ids, start and end of the scored span, its UTF-8 bytes). With `limit`
    (the model's context plus one), a continuation that would not fit after the context and the
    longest choice is cut at its end, the same for every choice: cutting the sequence at its
    start, as for other items, would drop the context and then the choice itself."""
    if "src" in item:
        context = tok.pair_prompt(tok.encode([item["src"]])[0], item.get("tgt_lang"), item.get("task"))
    else:
        context = [tok.eos_id, *tok.encode([item["context"]])[0]] if item["context"] else [tok.eos_id]
    choices = tok.encode(item["choices"])
    continuation = item.get("continuation")
    cont = tok.encode([continuation])[0] if continuation is not None else None
    room = limit - len(context) - max(map(len, choices)) if limit else None  # for the continuation
    if cont is not None and room is not None and len(cont) > room:
        cont = cont[: max(room, 1)]
        continuation = tok.decode(cont)
    out = []
    for choice, ids in zip(item["choices"], choices):
        if cont is None:
            seq = [*context, *ids]
            out.append((seq, len(context), len(seq), len(choice.encode("utf-8"))))
        else:
            seq = [*context, *ids, *cont]
            out.append((seq, len(seq) - len(cont), len(seq), len(continuation.encode("utf-8"))))
    return out


@torch.no_grad()
def span_nats(model, sequences: list[tuple[list[int], int, int, int]], batch_size: int, baselines) -> tuple:
    """Nats of each sequence's scored span under the model and under the bigram baseline."""
    device = next(model.parameters()).device
    limit = model.block_size + 1 if model.bounded_context else None
    bigram_nats = [
        float(baselines.nats(np.asarray(seq[start - 1 : end - 1]), np.asarray(seq[start:end]))[1].sum())
        for seq, start, end, _ in sequences
    ]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    model_nats = [0.0] * len(sequences)
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        rows, spans = [], []
        for i in batch:
            seq, start, end, _ = sequences[i]
            cut = max(0, len(seq) - limit) if limit else 0  # keep the end: the scored span and what leads to it
            rows.append(seq[cut:])
            spans.append((max(start - cut, 1), end - cut))
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            x[k, : len(r)] = torch.tensor(r)
        logits, _ = model(x[:, :-1].to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        for k, (i, (s, e)) in enumerate(zip(batch, spans)):
            targets = x[k, s:e].to(device)
            model_nats[i] = -float(logp[k, s - 1 : e - 1].gather(-1, targets[:, None]).sum())
    return model_nats, bigram_nats


def accuracy(correct: list[bool]) -> dict:
    lo, hi = wilson(sum(correct), len(correct))
    return {"accuracy": round(sum(correct) / max(len(correct), 1), 4), "ci95": [round(lo, 4), round(hi, 4)]}


SCORINGS = ("per_byte", "unnormalized", "context_normalized")


def score_multiple_choice(
    model, tok, items: list[dict], baselines, batch_size: int, scoring: str | None = None
) -> dict:
    """Accuracy of the choice the model finds most likely under three scorings, and the bigram's:
    per byte (the log-likelihood over the choice's UTF-8 bytes: "model", "bigram"), unnormalised
    (the sum), and context-normalised (each choice's log-likelihood after the context minus after
    an empty one: GPT-3's normalisation for answers whose own likelihood outweighs the context's
    say; only where no item has a continuation, whose choices are compared on the same text
    already). With `scoring` (one of SCORINGS, chosen on val by `choose_scoring`), "headline"
    holds the model's and the bigram's accuracy under it."""
    limit = model.block_size + 1 if model.bounded_context else None
    sequences, owner = [], []
    for i, item in enumerate(items):
        for s in choice_sequences(tok, item, limit):
            sequences.append(s)
            owner.append(i)
    neutral = all("continuation" not in item for item in items)
    if neutral:  # the same choices after an empty context (source), scored in the same batches
        empty = [{**item, "src" if "src" in item else "context": ""} for item in items]
        sequences += [s for item in empty for s in choice_sequences(tok, item, limit)]
    model_nats, bigram_nats = span_nats(model, sequences, batch_size, baselines)
    n = len(owner)
    per_item: list[list[tuple]] = [[] for _ in items]  # per choice: (model, bigram) x (with context, without)
    for k, i in enumerate(owner):
        without = (model_nats[n + k], bigram_nats[n + k]) if neutral else (0.0, 0.0)
        per_item[i].append((model_nats[k], bigram_nats[k], *without, sequences[k][3]))
    score = {
        "per_byte": lambda nats, _, n_bytes: nats / n_bytes,
        "unnormalized": lambda nats, _, n_bytes: nats,
        "context_normalized": lambda nats, without, n_bytes: nats - without,
    }
    result = {
        "items": len(items),
        "metric": "accuracy (log-likelihood per byte)",
        "chance": round(float(np.mean([1 / len(item["choices"]) for item in items])), 4),
    }
    for name in SCORINGS if neutral else SCORINGS[:2]:
        f = score[name]
        for who, col in (("model", 0), ("bigram", 1)):
            picks = [
                int(np.argmin([f(c[col], c[col + 2], c[4]) for c in choices])) == item["answer"]
                for item, choices in zip(items, per_item)
            ]
            result[_key(who, name)] = accuracy(picks)
    if scoring:
        result["scoring"] = scoring
        result["headline"] = {who: result[_key(who, scoring)] for who in ("model", "bigram")}
    return result


def _key(who: str, scoring: str) -> str:
    """Where a scoring's accuracy sits in the result: "model" (per byte), "model_unnormalized", ..."""
    return who if scoring == "per_byte" else f"{who}_{scoring}"


def choose_scoring(val_scores: dict) -> tuple[str, dict]:
    """The scoring with the highest accuracy on val (ties: the first of SCORINGS), and each one's."""
    accs = {name: val_scores[_key("model", name)]["accuracy"] for name in SCORINGS if _key("model", name) in val_scores}
    return max(accs, key=lambda name: (accs[name], -SCORINGS.index(name))), accs


def score_cloze(model, tok, items: list[dict], baselines, batch_size: int, device: str, compile: bool = False) -> dict:
    """Exact match of the first word written greedily (model), or by the bigram's most likely next tokens."""
    prompts = [[tok.eos_id, *ids] for ids in tok.encode([item["context"] for item in items])]
    out = generate(model, prompts, tok.eos_id, Decoding(8), batch_size, device, compile=compile)
    model_hits = [first_word(tok.decode(o)) == item["answer_text"] for o, item in zip(out, items)]
    bigram_hits = []
    for prompt, item in zip(prompts, items):
        ids, last = [], prompt[-1]
        for _ in range(8):
            last = baselines.most_likely_next(last)
            ids.append(last)
        bigram_hits.append(first_word(tok.decode(ids)) == item["answer_text"])
    return {
        "items": len(items),
        "metric": "exact match of the first word written greedily",
        "chance": 0.0,
        "model": accuracy(model_hits),
        "bigram": accuracy(bigram_hits),
    }


def first_word(text: str) -> str:
    """The word a continuation begins with, after the spaces that separate it from the context."""
    m = WORD.match(text.lstrip(" "))
    return m.group(0) if m else ""
