"""Question answering: QA sources, the default QA set and its split, the metrics, `generate --ask`."""

import io
import json
import sqlite3

import pytest
from conftest import (
    ACT,
    PAIRS,
    QA,
    assert_clean_error,
    call_stage,
    collect_project,
    copy_project,
    jsonl_source,
    raw_records,
    read_split,
    run_stage,
    set_params,
    stage_error,
    tiny_params,
    write_jsonl,
    write_params,
)

from pipeline.core.common import PipelineError
from pipeline.data.qa import default_items, passage_items, question_text
from pipeline.data.sources.tables import records_from_sqlite
from pipeline.data.tokenizer import Tokenizer
from pipeline.evaluation.qa import exact_match, majority_answers, normalize_answer, token_f1


def test_squad_normalisation_exact_match_and_token_f1_in_every_script():
    assert normalize_answer("The Tempest!") == "tempest"
    assert normalize_answer("  HAMLET, PRINCE   OF DENMARK ") == "hamlet prince of denmark"
    assert exact_match("Hamlet, Prince of Denmark.", "HAMLET, PRINCE OF DENMARK")
    assert exact_match("Иисус.", "иисус") and not exact_match("Иисус", "Бог")
    assert exact_match("“资源类型。”", "资源类型")
    assert token_f1("the king of france", "king") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert token_f1("资源", "资源类型") == pytest.approx(2 * 0.5 / 1.5)  # Chinese: characters are the tokens
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c") == 0.0
    items = [{"source": "s", "template": "t", "tgt": a} for a in ("HELENA", "Helena.", "KING", "BERTRAM")]
    assert majority_answers(items) == {"t": "HELENA"}  # counted after normalisation, shown as first written


def splits_of_passages() -> dict:
    play = {"source": "plays", "text": ACT, "origin": "alls_well.txt"}
    other = {"source": "plays", "text": ACT.replace("HELENA", "DIANA").replace("pity", "grief"), "origin": "x.txt"}
    verse = {"source": "bible", "src": PAIRS[5][0], "tgt": PAIRS[5][1], "meta": {"book": "John"}}
    return {"train": [play], "val": [verse], "test": [other, dict(play)]}


TITLES = {("plays", "alls_well.txt"): "ALL'S WELL THAT ENDS WELL", ("plays", "x.txt"): "X"}


def test_default_qa_items_come_from_the_structure_and_stay_in_their_passages_split():
    items = passage_items(splits_of_passages()["train"][0], TITLES, ("who_says", "which_play", "which_book"))
    assert {"src": "Who says: 'That I wish well.--'Tis pity, pity, pity that I wish well.'?", "tgt": "HELENA"} in [
        {k: i[k] for k in ("src", "tgt")} for i in items
    ]
    assert {i["template"] for i in items} == {"who_says", "which_play"} and all(i["task"] == "qa" for i in items)
    assert "ALL'S WELL THAT ENDS WELL" in {i["tgt"] for i in items}
    out = default_items(splits_of_passages(), TITLES, ("who_says", "which_play", "which_book"), 1000, "salt")
    assert [i["tgt"] for i in out["val"]] == ["John"] and out["val"][0][
        "src"
    ] == f"Which book contains: '{PAIRS[5][0]}'?"
    train_questions = {i["src"] for i in out["train"]}
    # the same passage in test: its questions were asked in train, so they are not test items
    assert not train_questions & {i["src"] for i in out["test"]}
    # lines said in train too (by PAROLLES, BERTRAM, and by HELENA where DIANA says it) are not asked again
    assert [i["tgt"] for i in out["test"] if i["template"] == "who_says"] == ["DIANA"]
    for split, split_items in out.items():  # every quoted line comes from a passage of the same split
        texts = " ".join(r.get("text", r.get("src", "")) for r in splits_of_passages()[split])
        for item in split_items:
            assert item["src"].split("'", 1)[1].rsplit("'", 1)[0] in texts, (split, item)
    capped = default_items(splits_of_passages(), TITLES, ("who_says",), 2, "salt")
    assert sum(len(v) for v in capped.values()) == 2
    reordered = {k: list(reversed(v)) for k, v in splits_of_passages().items()}
    assert default_items(reordered, TITLES, ("who_says",), 2, "salt") == capped  # chosen by hash, not by order
    assert default_items(splits_of_passages(), TITLES, ("who_says",), 2, "other") != capped


def qa_project(folder, rows=QA, n=30, **source):
    write_jsonl(folder / "qa.jsonl", [{**r, "question": f"{r['question']} ({i})"} for i in range(n) for r in rows])
    return collect_project(folder, [jsonl_source("quiz", "qa.jsonl", task="qa", **source)])


def test_collect_reads_a_qa_source_into_tagged_pairs(tmp_path):
    call_stage("collect", qa_project(tmp_path, n=1))
    records = raw_records(tmp_path, "quiz")
    assert [r["tgt"] for r in records] == ["Shakespeare", "Иисус", "资源类型", "a thousand"]
    assert all(r["task"] == "qa" for r in records)
    assert records[3]["src"] == question_text("How many loves shall your master have? (0)", QA[3]["context"])
    assert records[3]["src"].startswith("There shall your master have a thousand loves.\n\n")
    assert json.loads((tmp_path / "data/raw/manifest.json").read_text())["sources"][0]["task"] == "qa"


def test_qa_columns_can_be_named_and_a_missing_one_is_one_line(tmp_path):
    (tmp_path / "qa.csv").write_text("q,a\nWho wept?,Jesus\n", encoding="utf-8")
    source = {"name": "quiz", "kind": "file", "format": "csv", "path": "qa.csv", "task": "qa"}
    collect_project(tmp_path, [{**source, "qa_columns": ["q", "a"]}])
    call_stage("collect", tmp_path)
    assert raw_records(tmp_path, "quiz")[0] | {"origin": ""} == {
        "src": "Who wept?",
        "tgt": "Jesus",
        "task": "qa",
        "origin": "",
    }
    collect_project(tmp_path, [source])
    stage_error("collect", tmp_path, "qa.csv", "no column 'question'", "columns: q, a")
    collect_project(tmp_path, [{**source, "format": "text"}])
    stage_error("collect", tmp_path, "collect.sources[0] (quiz).task", "format 'text'")
    collect_project(tmp_path, [{**source, "task": "", "qa_columns": ["q", "a"]}])
    stage_error("collect", tmp_path, "collect.sources[0] (quiz).qa_columns", "task: qa")
    write_params(tmp_path, tiny_params(clean={"qa_templates": ["who_speaks"]}))
    stage_error("clean", tmp_path, "clean.qa_templates[0]", "'who_speaks'", "who_says, which_play, which_book")


def test_clean_keeps_short_answers_and_questions_with_passages(tmp_path):
    rows = QA + [{"question": "What is six times seven?", "answer": "42"}]
    call_stage("collect", qa_project(tmp_path, rows=rows))
    set_params(tmp_path, clean_run={"workers": 1})
    call_stage("clean", tmp_path)
    kept = [r for split in ("train", "val", "test") for r in read_split(tmp_path, split)]
    assert len(kept) == 30 * len(rows)  # "42" is shorter than min_chars; 3 characters for a long question
    assert all(r["task"] == "qa" for r in kept)
    assert any(r["src"].startswith("There shall your master have a thousand loves.\n\n") for r in kept)


def test_sqlite_meta_columns_become_record_metadata(tmp_path):
    db = tmp_path / "b.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE v (en TEXT, ru TEXT, book TEXT, chapter INTEGER)")
    con.execute("INSERT INTO v VALUES (?, ?, 'John', 11)", PAIRS[5])
    con.commit()
    con.close()
    data = db.read_bytes()
    query = "SELECT en, ru, book AS meta_book, chapter AS meta_chapter FROM v"
    (rec,) = records_from_sqlite(data, query, "b.db", tmp_path)
    assert rec == {"src": PAIRS[5][0], "tgt": PAIRS[5][1], "meta": {"book": "John", "chapter": 11}, "origin": "b.db"}
    with pytest.raises(PipelineError, match=r"b.db: query must return 1 column .* got book, en, ru"):
        list(records_from_sqlite(data, "SELECT book, en, ru FROM v", "b.db", tmp_path))
    with pytest.raises(PipelineError, match=r"then any meta_<key> columns; got meta_book, en"):
        list(records_from_sqlite(data, "SELECT book AS meta_book, en FROM v", "b.db", tmp_path))


def test_the_qa_tag_begins_each_question_and_evaluate_scores_the_answers(answered):
    tok = Tokenizer(answered / "data/tokens/tokenizer.model")
    assert list(tok.tasks) == ["qa"] and tok.token_bytes()[tok.tasks["qa"]] == 0
    qa = json.loads((answered / "metrics/eval.json").read_text())["question_answering"]
    assert {"who_says", "quiz"} <= set(qa["groups"])
    for group in qa["groups"].values():
        for name in ("greedy", "beam", "majority"):
            lo, hi = group[name]["exact_match_ci95"]
            assert 0 <= lo <= group[name]["exact_match"] <= hi <= 1
            assert 0 <= group[name]["f1"] <= 1
    assert qa["groups"]["who_says"]["majority_answer"] in ("HELENA", "DIANA", "KING", "PAROLLES", "BERTRAM")
    translation = json.loads((answered / "metrics/eval.json").read_text())["translation"]
    assert list(translation["directions"]) == ["pairs"]  # QA pairs are not translations
    report = (answered / "metrics/report.md").read_text()
    assert "## Understanding and QA" in report and "Answered test questions:" in report
    assert "| template | greedy | beam | majority answer | test items | train items |" in report


def test_generate_answers_a_question_and_refuses_an_empty_one(answered, prepared, tmp_path, capsys):
    proc = run_stage("generate", answered, "--ask", "Who says: 'That I wish well'?")
    assert proc.returncode == 0 and len(proc.stdout.strip().split("\n")) == 1
    capsys.readouterr()
    call_stage("generate", answered, "--ask", "How many loves?", "--context", "A thousand loves.")
    assert len(capsys.readouterr().out.strip().split("\n")) == 1
    assert_clean_error(run_stage("generate", answered, "--ask", "  ", check=False), "--ask: the question is empty")
    stage_error("generate", answered, "--context: only with --ask", args=("--context", "x", "y"))
    folder = copy_project(prepared, tmp_path / "p")
    set_params(folder, train={"max_steps": 2})
    call_stage("train", folder)
    stage_error("generate", folder, "no tag <qa>", args=("--ask", "Who?"))


def test_a_qa_source_read_from_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    buf = io.BytesIO()
    pd.DataFrame({"question": ["Who wept?"], "answer": ["Jesus"], "context": [""]}).to_parquet(buf)
    (tmp_path / "qa.parquet").write_bytes(buf.getvalue())
    collect_project(
        tmp_path, [{"name": "quiz", "kind": "file", "format": "parquet", "path": "qa.parquet", "task": "qa"}]
    )
    call_stage("collect", tmp_path)
    assert raw_records(tmp_path, "quiz")[0]["src"] == "Who wept?"  # an empty context: a closed-book question
