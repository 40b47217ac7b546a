"""clean: PII scrubbing, quality rules, MinHash near-duplicates, decontamination and the report."""

from __future__ import annotations

import json

from conftest import SONNET, call_stage, clean_project, filler_docs, read_clean_metrics, read_split

from pipeline.core.params import Clean
from pipeline.data.rules import split_of

PROSE = (
    "The committee met on a grey morning to weigh the harbour plans, and after long argument about "
    "tides, costs and the fishing fleet it chose the northern site, which the engineers had favoured "
    "from the start because the rock there would hold the new sea wall far better than the sand"
)


def all_texts(folder) -> list[str]:
    return [r.get("text", r.get("src")) for s in ("train", "val", "test") for r in read_split(folder, s)]


def test_pii_is_replaced_and_counted(tmp_path):
    docs = filler_docs(40) + [
        {"text": "Write to jane.doe+news@example.co.uk or call +1 (415) 555-0132 today."},
        {"text": "The server at 192.168.10.254 and 2001:0db8:85a3:0000:0000:8a2e:0370:7334 answered."},
        {"text": "John 3:16 and Psalm 23, verse 4, year 1611, page 12-13: not personal data."},
    ]
    folder = clean_project(tmp_path, docs)
    call_stage("clean", folder)
    texts = all_texts(folder)
    assert "Write to [EMAIL] or call [PHONE] today." in texts
    assert "The server at [IP] and [IP] answered." in texts
    assert "John 3:16 and Psalm 23, verse 4, year 1611, page 12-13: not personal data." in texts
    assert read_clean_metrics(folder)["pii_replaced"] == {"email": 1, "ip": 2, "phone": 1}


def test_pii_rules_leave_full_width_digits_alone(tmp_path):
    """Statistics written in full-width digits are not phone numbers; ASCII ones in the same text are."""
    stats = "２０２３年人口为４１８４．８４３０．１３５４万人，增长１２３４５６７８９。"
    docs = filler_docs(40) + [{"text": stats}, {"text": "请拨打电话 +86 10 6552 9988 或 ٠١٢٣٤٥٦٧٨٩ 联系我们。"}]
    folder = clean_project(tmp_path, docs)
    call_stage("clean", folder)
    texts = all_texts(folder)
    assert stats in texts
    assert "请拨打电话 [PHONE] 或 [PHONE] 联系我们。" in texts  # ASCII and Arabic-Indic digits
    assert read_clean_metrics(folder)["pii_replaced"]["phone"] == 2


def test_quality_rules_drop_and_count_each_reason(tmp_path):
    bad = {
        "quality_alpha": "x = 1 + 2 * 3 / 4 - 5 % 6 ; " * 6,
        "quality_word_length": " ".join(
            ["aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ="] * 3 + [f"QmFzZTY0IGVuY29kZWQ{i}" for i in range(60)]
        ),
        "quality_repeated_lines": "\n".join(["Buy now and save big on every item."] * 8 + [PROSE]),
        "quality_repeated_bigram": " ".join(["click here"] * 40) + " " + PROSE,
        "quality_symbols": " ".join(f"#tag{i} ..." for i in range(30)) + " " + PROSE,
    }
    docs = filler_docs(40) + [{"text": PROSE}] + [{"text": t} for t in bad.values()]
    folder = clean_project(tmp_path, docs, quality_filters=True, quality_min_words=20)
    call_stage("clean", folder)
    dropped = read_clean_metrics(folder)["dropped"]
    assert {r: dropped[r] for r in bad} == {r: 1 for r in bad}
    assert PROSE in all_texts(folder)
    report = (folder / "metrics/clean_report.md").read_text()
    for reason in bad:
        assert f"**{reason}**" in report


def test_near_duplicates_are_removed_reproducibly(tmp_path):
    variant = PROSE.replace("grey", "gray")
    docs = [{"text": PROSE}, {"text": variant}, {"text": PROSE.replace("northern", "southern")}] + [
        {"text": f"Entirely different document number {i}: {line} and more words here"}
        for i, line in enumerate(SONNET.split("\n"))
    ] * 1
    runs = []
    for name in ("a", "b"):
        folder = clean_project(tmp_path / name, docs, near_dup=True, near_dup_threshold=0.7, shingle_words=3)
        call_stage("clean", folder)
        runs.append(((folder / "data/clean/train.jsonl").read_bytes(), read_clean_metrics(folder)))
    assert runs[0][0] == runs[1][0]
    metrics = runs[0][1]
    assert metrics["dropped"]["near_duplicate"] == 2 and metrics["near_duplicate_clusters"] == 1
    texts = all_texts(tmp_path / "a")
    assert PROSE in texts and variant not in texts


def test_train_documents_overlapping_val_or_test_are_removed_and_listed(tmp_path):
    settings = Clean(val_fraction=0.1, test_fraction=0.1)  # tiny.yaml's, which clean_project() uses
    docs = filler_docs(60)
    held = next(d["text"] for d in docs if split_of(d["text"], settings) != "train")
    span = " ".join(held.split()[:6])  # the filler lines are short: decontaminate on 6-word sequences
    leak = next(
        f"Copied {i}: {span} and then some"
        for i in range(100)
        if split_of(f"Copied {i}: {span} and then some", settings) == "train"
    )
    folder = clean_project(tmp_path, docs + [{"text": leak}], decontaminate_ngram=6)
    call_stage("clean", folder)
    train = [r["text"] for r in read_split(folder, "train")]
    assert leak not in train
    listed = [json.loads(l)["text"] for l in (folder / "data/clean/decontaminated.jsonl").read_text().splitlines()]
    assert leak in listed
    metrics = read_clean_metrics(folder)
    assert metrics["contaminated_removed_from_train"] == len(listed) >= 1
    assert metrics["dropped"]["contaminated"] == len(listed)
    assert metrics["splits"]["train"] == len(train)


def test_clean_report_summarises_sources_drops_lengths_and_examples(tmp_path):
    folder = clean_project(tmp_path, filler_docs(40) + [{"text": ""}, {"text": "x"}] + filler_docs(3))
    call_stage("clean", folder)
    report = (folder / "metrics/clean_report.md").read_text()
    lines = report.splitlines()
    for heading in ("## Per source", "## Dropped, per reason", "## Length in characters", "## Dropped examples"):
        assert [line for line in lines if line.startswith(heading)], heading
    metrics = read_clean_metrics(folder)
    docs = metrics["sources"]["docs"]
    assert (docs["documents_in"], docs["documents_kept"]) == (45, 40)
    assert f"{metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes) kept;" in lines[2]

    def row(first: str) -> list[str]:
        return next(
            [cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith(f"| {first} ")
        )

    assert row("docs") == [
        "docs",
        *map(str, (docs["documents_in"], docs["documents_kept"], docs["bytes_in"], docs["bytes_kept"])),
        "/".join(str(docs["splits"][s]["documents"]) for s in ("train", "val", "test")),
    ]
    dropped = {reason: n for reason, n in docs["dropped"].items() if n}
    assert dropped == {"empty": 1, "too_short": 1, "duplicate": 3}
    assert {reason: int(row(reason)[1]) for reason in dropped} == dropped
    assert not [
        line for line in lines if line.startswith(("| too_long ", "| near_duplicate "))
    ]  # only reasons that dropped
    assert row("docs, in")[1] == "0" and row("docs, kept")[1] == str(min(len(d["text"]) for d in filler_docs(40)))
    examples = [line for line in lines if line.startswith("- **")]
    assert examples == [
        "- **empty** (docs): ``",
        "- **too_short** (docs): `x`",
        *(f"- **duplicate** (docs): `{d['text']}`" for d in filler_docs(3)),
    ]
