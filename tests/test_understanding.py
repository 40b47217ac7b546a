"""Understanding: multiple-choice and cloze tasks built from the test split, their files, and their scores."""

import json
import random

import numpy as np
import pytest
from conftest import PAIRS, SONNET, call_stage, copy_project, set_params, stage_error

from pipeline.core.common import PipelineError
from pipeline.data.tokenizer import Tokenizer
from pipeline.evaluation.scoring import NgramBaselines, wilson
from pipeline.evaluation.tasks import build_tasks, check_item, choice_sequences, read_task, who_speaks_items

PLAY = """HELENA.
Not my virginity yet.
There shall your master have a thousand loves,
A mother, and a mistress, and a friend,
A phoenix, captain, and an enemy,

PAROLLES.
What one, i' faith? What one, i' faith, my lady?

HELENA.
That I wish well.--'Tis pity, pity, pity that I wish well.

BERTRAM.
Stay; the king--the king will have his way, and I must stay.

LAFEU.
Pardon, my lord, for me and for my tidings, my good lord.

KING.
I'll fee thee to stand up, and fee thee well, and fee thee again."""


OTHER_PLAY = "\n\n".join(
    f"{name}.\nA speech of {name.lower()}, long enough to be asked who says it, in another play."
    for name in ("MACBETH", "BANQUO", "DUNCAN", "MACBETH", "ROSS", "LENNOX", "BANQUO")
)


def records() -> list[dict]:
    texts = [
        {"source": "plays", "origin": "alls_well.txt", "text": PLAY},
        {"source": "plays", "origin": "macbeth.txt", "text": OTHER_PLAY},
        {"source": "sonnets", "text": SONNET + "\nShall I compare thee?"},
    ]
    pairs = [{"source": "bible", "src": s, "tgt": t, "tgt_lang": "ru"} for s, t in PAIRS]
    return texts + pairs


def test_default_tasks_are_built_from_the_records_given_deterministically():
    tasks = build_tasks(records(), seed=0, n=50)
    assert tasks == build_tasks(records(), seed=0, n=50)
    assert set(tasks) == {"next_line", "who_speaks", "translation", "last_word"}
    for name, items in tasks.items():
        for item in items:
            check_item(item, name)
    speakers = {"HELENA.\n", "PAROLLES.\n", "BERTRAM.\n", "LAFEU.\n", "KING.\n"}
    others = {"MACBETH.\n", "BANQUO.\n", "DUNCAN.\n", "ROSS.\n", "LENNOX.\n"}
    plays = set()
    for item in tasks["who_speaks"]:  # the speaker among characters of the same play
        play = PLAY if set(item["choices"]) <= speakers else OTHER_PLAY
        assert set(item["choices"]) <= (speakers if play == PLAY else others) and len(item["choices"]) == 4
        assert item["continuation"] in play and item["context"].endswith("\n\n")
        plays.add(play)
    assert len(plays) == 2
    weighted = who_speaks_items([(r["origin"], r["text"]) for r in records()[:2]], random.Random(0), 50, True)
    assert weighted and all(len(set(i["choices"])) == 4 and i["continuation"] in PLAY + OTHER_PLAY for i in weighted)
    truth = dict(PAIRS)
    for item in tasks["translation"]:
        assert item["choices"][item["answer"]] == truth[item["src"]] and item["tgt_lang"] == "ru"
        assert set(item["choices"]) <= set(truth.values())
    for item in tasks["next_line"]:
        assert len(set(item["choices"])) == 4
    for item in tasks["last_word"]:  # the word occurs before in its passage: predictable from context
        assert item["answer_text"] in item["context"] and len(item["answer_text"]) >= 3


def test_a_long_continuation_is_cut_at_its_end_so_context_and_choice_stay(prepared):
    tok = Tokenizer(prepared / "data/tokens/tokenizer.model")
    speech = " ".join(["Thy father's ghost walks on the battlements at night."] * 40)
    item = {"context": "HAMLET.\nWho goes there?\n\n", "choices": ["KING.\n", "HORATIO.\n"], "continuation": speech}
    whole = choice_sequences(tok, item)
    cut = choice_sequences(tok, item, limit=64)
    spans = set()
    for (seq, start, end, n_bytes), (full, full_start, _, full_bytes) in zip(cut, whole):
        assert len(seq) <= 64 and end == len(seq) and seq[:start] == full[:full_start]  # context and choice whole
        spans.add(tuple(seq[start:end]))
        assert 0 < n_bytes < full_bytes
    assert len(spans) == 1  # every choice is scored on the same part of the speech
    assert choice_sequences(tok, item, limit=100_000) == whole


def test_bad_task_files_are_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = {"context": "To be, or not to be", "choices": [", that is the question", " a banana"], "answer": 0}
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(PipelineError, match=r"mine.jsonl:2: not valid JSON"):
        read_task(path)
    path.write_text(json.dumps({**good, "choices": ["only one"]}) + "\n")
    with pytest.raises(PipelineError, match=r"mine.jsonl:1: 1 choice\(s\); .* at least two"):
        read_task(path)
    path.write_text(json.dumps({**good, "answer": 2}) + "\n")
    with pytest.raises(PipelineError, match=r"mine.jsonl:1: 'answer' must be the index of a choice \(0 to 1\)"):
        read_task(path)
    path.write_text("\n")
    with pytest.raises(PipelineError, match=r"mine.jsonl: no items"):
        read_task(path)


def test_wilson_interval_and_bigram_argmax():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    b = NgramBaselines(np.array([1, 2, 1, 2, 1, 3, 4, 4, 4, 4]), 6)
    assert b.most_likely_next(1) == 2 and b.most_likely_next(4) == 4
    assert b.most_likely_next(5) == 4  # never followed: the most frequent token


def test_evaluate_scores_every_task_and_stops_at_once_on_a_bad_one(prepared, tmp_path, capsys):
    folder = copy_project(prepared, tmp_path / "p")
    mine = folder / "mine.jsonl"
    item = {"context": "Shall I compare thee to a summer's", "choices": [" day?", " xylophone?"], "answer": 0}
    mine.write_text("\n".join(json.dumps(item) for _ in range(5)) + "\n")
    (folder / "broken.jsonl").write_text(json.dumps(item) + "\n" + json.dumps({**item, "answer": 2}) + "\n")
    set_params(folder, train={"max_steps": 30}, evaluate={"prompts": [], "task_files": ["mine.jsonl", "broken.jsonl"]})
    call_stage("train", folder)
    # a bad task file of one's own ends evaluate before any work, naming its line: nothing written
    stage_error("evaluate", folder, "broken.jsonl:2", "'answer' must be the index of a choice")
    assert not (folder / "metrics/eval.json").exists() and not (folder / "data/tasks").exists()
    set_params(folder, evaluate={"task_files": ["mine.jsonl"]})
    call_stage("evaluate", folder)
    tasks = json.loads((folder / "metrics/eval.json").read_text())["understanding"]
    assert tasks["mine"]["items"] == 5 and tasks["mine"]["chance"] == 0.5
    for name in ("mine", "next_line", "translation"):
        t = tasks[name]
        for who in ("model", "bigram"):
            for key in (who, f"{who}_unnormalized", f"{who}_context_normalized"):
                lo, hi = t[key]["ci95"]
                assert 0 <= lo <= t[key]["accuracy"] <= hi <= 1, (name, key)
    assert tasks["mine"]["model"]["accuracy"] in (0.0, 1.0)  # the same item five times
    # a task of one's own is scored per byte; a default one the way its val twin scores best
    assert tasks["mine"]["scoring"] == "per_byte" and "scoring_val" not in tasks["mine"]
    assert tasks["mine"]["headline"]["model"] == tasks["mine"]["model"]
    for name in ("next_line", "translation"):
        t = tasks[name]
        val = t["scoring_val"]["model"]
        assert t["scoring"] == max(val, key=lambda k: (val[k], -list(val).index(k)))
        key = "" if t["scoring"] == "per_byte" else f"_{t['scoring']}"
        assert t["headline"] == {"model": t[f"model{key}"], "bigram": t[f"bigram{key}"]}
    defaults = sorted(f"{n}.jsonl" for n in tasks if n != "mine")
    assert sorted(p.name for p in (folder / "data/tasks").iterdir()) == sorted([*defaults, "val"])
    assert {p.name for p in (folder / "data/tasks/val").iterdir()} <= set(defaults)
    report = (folder / "metrics/report.md").read_text()
    header = "| task | model | bigram | chance | items | scoring | per byte | unnormalised | context-normalised |"
    assert header in report
