"""The bad-input catalogue: params, data files, pipeline state, sources and generation.

Each case damages a copy of a project that has run every stage, runs one stage as `run_main`
runs it, and asserts: a non-zero exit, exactly one line on stderr naming what is at fault, and
every output already written (data/, metrics/) byte-identical. Resources (a full disk, a
read-only folder) are in test_faults.py; killed runs in test_reliability.py and
test_train_engine.py; downloads in test_collect_sources.py.
"""

import contextlib
import gzip
import io
import json
import pickle
import sqlite3
import zipfile

import pytest
import yaml
from conftest import call_stage, copy_project, snapshot

from pipeline.core.common import run_main

OUTPUTS = ("data", "metrics")


def params_of(folder) -> dict:
    return yaml.safe_load((folder / "params.yaml").read_text(encoding="utf-8"))


def write_params(folder, data) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def change(group: str, **values):
    def mutate(folder):
        data = params_of(folder)
        data[group].update(values)
        write_params(folder, data)

    return mutate


def change_source(**values):
    def mutate(folder):
        data = params_of(folder)
        data["collect"]["sources"][0].update(values)
        write_params(folder, data)

    return mutate


def with_source(make):
    """Replace the sources by one that `make(folder)` writes and returns."""

    def mutate(folder):
        data = params_of(folder)
        data["collect"]["sources"] = [make(folder)]
        write_params(folder, data)

    return mutate


def text_file(name: str, content: bytes, **kw):
    def make(folder):
        (folder / name).write_bytes(content)
        return {"name": "bad", "kind": "file", "format": kw.pop("format", "text"), "path": name, **kw}

    return make


def write(path: str, content: bytes | str):
    def mutate(folder):
        p = folder / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    return mutate


def remove(path: str):
    def mutate(folder):
        (folder / path).unlink()

    return mutate


def truncate(path: str, keep: int = -3):
    def mutate(folder):
        p = folder / path
        p.write_bytes(p.read_bytes()[:keep])

    return mutate


def sidecar(split: str, **changes):
    def mutate(folder):
        p = folder / "data/tokens" / f"{split}.json"
        meta = json.loads(p.read_text())
        for k, v in changes.items():
            if v is None:
                meta.pop(k)
            else:
                meta[k] = v
        p.write_text(json.dumps(meta))

    return mutate


def both(*mutations):
    def mutate(folder):
        for m in mutations:
            m(folder)

    return mutate


def raw_line(source: str, line: str):
    def mutate(folder):
        p = folder / "data/raw" / f"{source}.jsonl"
        p.write_text(p.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")

    return mutate


def sqlite_db(query: str):
    def make(folder):
        con = sqlite3.connect(folder / "t.db")
        con.execute("CREATE TABLE v (en TEXT, ru TEXT)")
        con.execute("INSERT INTO v VALUES ('Jesus wept.', 'Иисус прослезился.')")
        con.commit()
        con.close()
        with zipfile.ZipFile(folder / "t.zip", "w") as z:
            z.write(folder / "t.db", "t.db")
        return {"name": "bad", "kind": "file", "format": "sqlite", "path": "t.zip", "members": "t.db", "query": query}

    return make


def qa_rows(rows: list[dict]):
    def make(folder):
        (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return {"name": "quiz", "kind": "file", "format": "jsonl", "path": "qa.jsonl", "task": "qa"}

    return make


def zipped(member: str, content: bytes, **kw):
    def make(folder):
        with zipfile.ZipFile(folder / "a.zip", "w") as z:
            z.writestr(member, content)
        return {"name": "bad", "kind": "file", "format": kw.pop("format", "text"), "path": "a.zip", **kw}

    return make


class Pickled:
    def __reduce__(self):
        return (print, ("pwned",))


TASK_ITEM = '{"context": "To be, or not", "choices": [" to be", " xylophone"], "answer": 0}'

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(10)
)

# (case id, stage and its arguments, how to damage the project, what the one line must name)
CASES = [
    # --- params.yaml -----------------------------------------------------------------------
    ("params-missing", ["clean"], remove("params.yaml"), ["params.yaml"]),
    ("params-not-yaml", ["clean"], write("params.yaml", "collect: {[\n"), ["params.yaml"]),
    ("params-a-list", ["clean"], write("params.yaml", "- 1\n- 2\n"), ["params.yaml"]),
    ("params-empty", ["clean"], write("params.yaml", ""), ["params.yaml"]),
    ("params-alias-bomb", ["clean"], write("params.yaml", BILLION_LAUGHS), ["aliases"]),
    ("params-unknown-group", ["clean"], lambda f: write_params(f, {**params_of(f), "banana": 1}), ["banana"]),
    ("params-unknown-key", ["clean"], change("train", banana=1), ["train.banana"]),
    ("params-ill-typed", ["train"], change("model", n_layer="four"), ["model.n_layer"]),
    ("params-float-for-int", ["train"], change("model", n_layer=2.5), ["model.n_layer"]),
    ("params-negative-steps", ["train"], change("train", max_steps=-1), ["train.max_steps"]),
    ("params-zero-batch", ["train"], change("train", batch_size=0), ["train.batch_size"]),
    ("params-heads-do-not-divide", ["train"], change("model", n_embd=100, n_head=3), ["model.n_embd", "100"]),
    ("params-lr-zero", ["train"], change("train", lr=0), ["train.lr"]),
    ("params-min-lr-above-lr", ["train"], change("train", lr=1e-3, min_lr=1e-2), ["min_lr"]),
    ("params-unknown-arch", ["train"], change("model", arch="transformer"), ["model.arch", "transformer"]),
    ("params-unknown-schedule", ["train"], change("train", schedule="linear"), ["train.schedule"]),
    ("params-rope-odd-head", ["train"], change("model", positions="rope", n_embd=66, n_head=2), ["model.positions"]),
    ("params-block-size-zero", ["train"], change("model", block_size=0), ["model.block_size"]),
    ("params-dropout-one", ["train"], change("model", dropout=1.0), ["model.dropout"]),
    (
        "params-negative-weight",
        ["train"],
        change("train", source_weights={"pairs": -1}),
        ["train.source_weights.pairs"],
    ),
    ("params-decay-fraction", ["train"], change("train", decay_fraction=0), ["train.decay_fraction"]),
    (
        "params-weight-infinite",
        ["train"],
        change("train", source_weights={"default_qa": float("inf")}),
        ["train.source_weights.default_qa", "finite"],
    ),
    ("params-lr-nan", ["train"], change("train", lr=float("nan")), ["train.lr", "finite"]),
    ("params-tune-grid-inf", ["evaluate"], change("evaluate", tune_length_penalties=[1.0, float("inf")]), ["[1]"]),
    ("params-eval-interval", ["train"], change("train", eval_interval=0), ["eval_interval"]),
    ("params-patience-negative", ["train"], change("train", patience=-1), ["train.patience", "-1"]),
    ("params-patience-fraction", ["train"], change("train", patience=1.5), ["train.patience", "integer"]),
    ("params-patience-word", ["train"], change("train", patience="x"), ["train.patience", "integer"]),
    ("params-patience-bool", ["train"], change("train", patience=True), ["train.patience", "integer"]),
    ("params-fused-loss-unknown", ["train"], change("train", fused_loss="triton"), ["train.fused_loss", "triton"]),
    ("train-fused-loss-on-cpu", ["train"], change("train", fused_loss="liger"), ["train.fused_loss", "[gpu]"]),
    ("params-vocab-tiny", ["tokenize"], change("tokenize", vocab_size=8), ["tokenize.vocab_size"]),
    ("params-coverage", ["tokenize"], change("tokenize", character_coverage=0.5), ["tokenize.character_coverage"]),
    ("params-model-type", ["tokenize"], change("tokenize", model_type="wordpiece"), ["tokenize.model_type"]),
    ("params-fractions", ["clean"], change("clean", val_fraction=0.6, test_fraction=0.6), ["val_fraction"]),
    ("params-min-over-max", ["clean"], change("clean", min_chars=10, max_chars=5), ["min_chars"]),
    ("params-length-ratio", ["clean"], change("clean", max_length_ratio=0.5), ["clean.max_length_ratio"]),
    ("params-normalization", ["clean"], change("clean", normalization="NFD"), ["clean.normalization"]),
    ("params-qa-template", ["clean"], change("clean", qa_templates=["nope"]), ["clean.qa_templates[0]"]),
    ("params-near-dup-threshold", ["clean"], change("clean", near_dup_threshold=0), ["near_dup_threshold"]),
    ("params-top-p", ["evaluate"], change("evaluate", top_p=0), ["evaluate.top_p"]),
    ("params-beam-zero", ["evaluate"], change("evaluate", beam_size=0), ["evaluate.beam_size"]),
    ("params-temperature", ["evaluate"], change("evaluate", temperature=-1), ["evaluate.temperature"]),
    ("params-tune-sizes", ["evaluate"], change("evaluate", tune_beam_sizes=[]), ["evaluate.tune_beam_sizes"]),
    ("params-task-items", ["evaluate"], change("evaluate", task_items=-1), ["evaluate.task_items"]),
    ("params-no-sources", ["collect"], change("collect", sources=[]), ["collect.sources"]),
    (
        "params-duplicate-sources",
        ["collect"],
        lambda f: write_params(f, {**params_of(f), "collect": {"sources": params_of(f)["collect"]["sources"][:1] * 2}}),
        ["unique"],
    ),
    ("params-source-name", ["collect"], change_source(name="a b"), ["name"]),
    ("params-unknown-kind", ["collect"], change_source(kind="ftp"), ["kind"]),
    (
        "params-pypi-no-sha",
        ["collect"],
        change_source(kind="pypi", package="x==1", filename="x.whl", members="*"),
        ["sha256"],
    ),
    ("params-url-not-http", ["collect"], change_source(kind="url", url="ftp://x", sha256="0" * 64), ["url"]),
    ("params-one-language", ["collect"], change_source(format="gettext", languages=["en"]), ["languages"]),
    ("params-language-name", ["collect"], change_source(languages=["English", "ru"]), ["'English'"]),
    ("params-qa-columns-no-task", ["collect"], change_source(qa_columns=["q", "a"]), ["qa_columns"]),
    ("params-qa-text-format", ["collect"], change_source(task="qa"), ["task"]),
    ("params-sqlite-no-query", ["collect"], change_source(format="sqlite"), ["query"]),
    ("params-aligned-no-target", ["collect"], change_source(format="aligned"), ["target_path"]),
    ("params-max-documents", ["collect"], change("collect", max_documents=-1), ["collect.max_documents"]),
    ("params-timeout", ["collect"], change("collect_run", download_timeout_s=0), ["collect_run.download_timeout_s"]),
    # --- sources ----------------------------------------------------------------------------
    ("source-no-file", ["collect"], change_source(path="nowhere/*.txt"), ["no file matches"]),
    ("source-binary", ["collect"], with_source(text_file("x.txt", bytes(range(256)) * 40)), ["x.txt", "binary"]),
    (
        "source-truncated-gzip",
        ["collect"],
        with_source(text_file("x.txt.gz", gzip.compress(b"text\n" * 1000)[:-20])),
        ["x.txt.gz", "truncated or corrupt"],
    ),
    (
        "source-jsonl-no-text",
        ["collect"],
        with_source(text_file("x.jsonl", b'{"body": "x"}\n', format="jsonl")),
        ["x.jsonl:1", "'text'"],
    ),
    (
        "source-jsonl-not-json",
        ["collect"],
        with_source(text_file("x.jsonl", b"{oops\n", format="jsonl")),
        ["x.jsonl:1"],
    ),
    (
        "source-jsonl-not-object",
        ["collect"],
        with_source(text_file("x.jsonl", b"[1, 2]\n", format="jsonl")),
        ["x.jsonl:1", "object"],
    ),
    (
        "source-csv-no-column",
        ["collect"],
        with_source(text_file("x.csv", b"body\nhello\n", format="csv", text_columns=["text"])),
        ["x.csv", "no column 'text'"],
    ),
    (
        "source-qa-no-question",
        ["collect"],
        with_source(text_file("x.csv", b"q,answer\nWho?,Me\n", format="csv", task="qa")),
        ["x.csv", "no column 'question'"],
    ),
    (
        "source-empty-target-side",
        ["collect"],
        with_source(text_file("x.jsonl", b'{"src": "Hello there", "tgt": ""}\n' * 3, format="jsonl")),
        ["target side", "empty"],
    ),
    (
        "source-wrong-script",
        ["collect"],
        with_source(
            text_file(
                "x.jsonl", b'{"src": "Hello there", "tgt": "Hello again"}\n' * 3, format="jsonl", languages=["en", "ru"]
            )
        ),
        ["'ru'", "Cyrillic"],
    ),
    ("source-sqlite-bad-query", ["collect"], with_source(sqlite_db("SELECT nothing FROM nowhere")), ["query failed"]),
    (
        "source-sqlite-three-columns",
        ["collect"],
        with_source(sqlite_db("SELECT en, ru, en FROM v")),
        ["query must return"],
    ),
    ("source-zip-escape", ["collect"], with_source(zipped("../evil.txt", b"evil", members="*.txt")), ["refused"]),
    (
        "source-zip-bad-member",
        ["collect"],
        with_source(zipped("d/a.jsonl", b"{broken\n", format="jsonl", members="d/*.jsonl")),
        ["a.zip:d/a.jsonl:1"],
    ),
    (
        "source-gettext-garbage",
        ["collect"],
        with_source(text_file("x.po", b'msgid "a\nmsgstr\n', format="gettext")),
        ["x.po"],
    ),
    ("source-empty", ["collect"], with_source(text_file("x.txt", b"  \n\n")), ["no documents"]),
    # --- data files between stages ---------------------------------------------------------
    ("data-no-manifest", ["clean"], remove("data/raw/manifest.json"), ["manifest.json"]),
    ("data-raw-not-json", ["clean"], raw_line("sonnets", "{oops"), ["sonnets.jsonl"]),
    ("data-raw-no-text", ["clean"], raw_line("sonnets", '{"body": "x"}'), ["sonnets.jsonl", "text"]),
    ("data-no-clean-train", ["tokenize"], remove("data/clean/train.jsonl"), ["train.jsonl"]),
    ("data-clean-not-json", ["tokenize"], write("data/clean/val.jsonl", "{oops\n"), ["val.jsonl"]),
    ("data-tokens-short", ["train"], truncate("data/tokens/train.bin"), ["train.bin"]),
    ("data-tokens-dtype", ["train"], sidecar("train", dtype="banana"), ["train.json", "banana"]),
    ("data-tokens-float", ["train"], sidecar("train", dtype="float64"), ["train.json", "float64"]),
    ("data-tokens-no-dtype", ["train"], sidecar("train", dtype=None), ["train.json", "dtype"]),
    ("data-tokens-count", ["train"], sidecar("val", tokens=10), ["val"]),
    ("data-tokens-vocab", ["train"], sidecar("train", vocab_size=999), ["vocabulary"]),
    ("data-no-sidecar", ["train"], remove("data/tokens/val.json"), ["val.json"]),
    ("data-no-tokenizer", ["train"], remove("data/tokens/tokenizer.model"), ["tokenizer.model"]),
    ("data-tokenizer-garbage", ["evaluate"], write("data/tokens/tokenizer.model", b"\x07" * 999), ["tokenizer.model"]),
    ("data-no-model", ["evaluate"], remove("data/model/best.safetensors"), ["best.safetensors"]),
    ("data-model-truncated", ["evaluate"], truncate("data/model/best.safetensors", 100), ["best.safetensors"]),
    ("data-model-garbage", ["evaluate"], write("data/model/best.safetensors", b"\0" * 5000), ["best.safetensors"]),
    (
        "data-model-pickle",
        ["evaluate"],
        write("data/model/best.safetensors", pickle.dumps(Pickled())),
        ["best.safetensors"],
    ),
    ("data-no-train-metrics", ["evaluate"], remove("metrics/train.json"), ["train.json"]),
    # a task file of one's own: checked before any work, so a bad one costs nothing and writes nothing
    ("data-task-file-missing", ["evaluate"], change("evaluate", task_files=["mine.jsonl"]), ["mine.jsonl", "no such"]),
    (
        "data-task-file-empty",
        ["evaluate"],
        both(write("mine.jsonl", "\n"), change("evaluate", task_files=["mine.jsonl"])),
        ["mine.jsonl", "no items"],
    ),
    (
        "data-task-file-not-json",
        ["evaluate"],
        both(write("mine.jsonl", TASK_ITEM + "\n{nope\n"), change("evaluate", task_files=["mine.jsonl"])),
        ["mine.jsonl:2", "not valid JSON"],
    ),
    (
        "data-task-answer-out-of-range",
        ["evaluate"],
        both(
            write("mine.jsonl", TASK_ITEM.replace('"answer": 0', '"answer": 5')),
            change("evaluate", task_files=["mine.jsonl"]),
        ),
        ["mine.jsonl:1", "'answer'"],
    ),
    # --- QA sources: a row without its question or answer ------------------------------------
    (
        "qa-source-missing-column",
        ["collect"],
        with_source(qa_rows([{"question": "Who wept?"}])),
        ["qa.jsonl:1", "no field 'answer'"],
    ),
    (
        "qa-source-null-cell",
        ["collect"],
        with_source(qa_rows([{"question": "Who wept?", "answer": None}])),
        ["qa.jsonl:1", "'answer'"],
    ),
    (
        "qa-source-empty-answers",
        ["collect"],
        with_source(qa_rows([{"question": "Who wept?", "answer": ""}])),
        ["quiz", "target side is empty"],
    ),
    (
        "qa-source-empty-questions",
        ["collect"],
        with_source(qa_rows([{"question": " ", "answer": "Jesus"}])),
        ["quiz", "source side is empty"],
    ),
    # --- compare: experiments side by side need a DVC repository ---------------------------------
    ("compare-outside-dvc", ["compare", "--md"], None, ["dvc exp show", "DVC repository"]),
    # --- export: only its own files, never the pipeline's outputs ----------------------------
    ("export-into-the-model", ["export", "data/model"], None, ["data/model", "inside data/"]),
    ("export-into-the-metrics", ["export", "metrics/hf"], None, ["metrics/hf", "inside metrics/"]),
    ("export-over-other-files", ["export", "other"], write("other/notes.txt", "mine"), ["other", "notes.txt"]),
    ("export-over-the-project", ["export", "."], None, ["holds this project"]),
    # --- pipeline state --------------------------------------------------------------------
    (
        "state-checkpoint-garbage",
        ["train"],
        both(change("train", max_steps=22), write("data/checkpoints/step_0000020/state.pt", b"garbage")),
        ["step_0000020", "not a readable checkpoint"],
    ),
    (
        "state-checkpoint-pickle",
        ["train"],
        both(change("train", max_steps=22), write("data/checkpoints/step_0000020/state.pt", pickle.dumps(Pickled()))),
        ["step_0000020", "not a readable checkpoint"],
    ),
    (
        "state-strict-incompatible",
        ["train"],
        both(change("train", lr=1e-3), change("train_run", resume="strict")),
        ["cannot resume", "train_run.resume: strict"],
    ),
    # --- generation ------------------------------------------------------------------------
    ("generate-empty-prompt", ["generate", ""], None, ["prompt"]),
    ("generate-no-prompt", ["generate", "--seed", "1"], None, ["prompt"]),
    ("generate-bad-utf8", ["generate", "\udcff ROMEO"], None, ["UTF-8"]),
    ("generate-nan-temperature", ["generate", "x", "--temperature", "nan"], None, ["temperature"]),
    ("generate-negative-temperature", ["generate", "x", "--temperature", "-1"], None, ["temperature"]),
    ("generate-top-p", ["generate", "x", "--top-p", "2"], None, ["top_p"]),
    ("generate-no-new-tokens", ["generate", "x", "--max-new-tokens", "-1"], None, ["max_new_tokens"]),
    ("generate-beam-zero", ["generate", "x", "--beam-size", "0"], None, ["beam_size"]),
    ("generate-unknown-language", ["generate", "--translate", "--to", "fr", "x"], None, ["'fr'"]),
    ("generate-empty-question", ["generate", "--ask", " "], None, ["--ask"]),
    ("generate-no-qa-model", ["generate", "--ask", "Who?"], None, ["<qa>"]),
    ("generate-context-alone", ["generate", "--context", "x", "y"], None, ["--context"]),
    ("generate-no-checkpoint", ["generate", "x", "--checkpoint", "nowhere.safetensors"], None, ["nowhere.safetensors"]),
    (
        "generate-pickle-checkpoint",
        ["generate", "x", "--checkpoint", "evil.pt"],
        write("evil.pt", pickle.dumps(Pickled())),
        ["evil.pt"],
    ),
]


def run(stage: str, folder, *args) -> tuple[int, str]:
    """A stage run as `python -m pipeline.<stage>` runs it (run_main), in this process: (exit, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        run_main(lambda: call_stage(stage, folder, *args))
    return stop.value.code, err.getvalue()


@pytest.mark.parametrize("case,command,damage,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(finished, tmp_path, capsys, case, command, damage, needles):
    folder = copy_project(finished, tmp_path / "p")
    if damage:
        damage(folder)
    before = snapshot(folder, *OUTPUTS)
    code, err = run(command[0], folder, *command[1:])
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert len(lines[0]) < 600, lines[0]
    assert snapshot(folder, *OUTPUTS) == before
    assert "pwned" not in capsys.readouterr().out
