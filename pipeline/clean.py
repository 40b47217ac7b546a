"""Stage 2, clean: normalise, filter, de-duplicate and split the collected documents.

Normalisation: Unicode NFC (or NFKC), HTML entities and tags removed, control and invisible
format characters dropped, line ends and spaces made uniform. Filters: empty, too short, too long
(and, for pairs, a length ratio). Exact duplicates are removed on the normalised text; for pairs a
repeated source is a duplicate too, so one source never has two targets in different splits.

The split is a hash of the normalised text (of the source side, for pairs): a document's split
never changes when the corpus grows, and no test pair's source can appear in train.

Optional, with params: PII scrubbing (e-mail addresses, phone numbers, IP addresses become
[EMAIL], [PHONE], [IP]; on by default), Gopher/C4-style quality rules for documents, near-duplicate
removal with MinHash LSH (datasketch, fixed seed; the source side of pairs), decontamination:
a train document that shares an n-word sequence with val or test is removed from train and listed;
language identification (py3langid: each document gets its "lang" and "lang_score"; a source that
names languages keeps only documents in one of them, and pairs whose sides are each in theirs),
and the web's filters for documents (a URL blocklist, lines of JavaScript and cookie notices
removed, lorem ipsum, too few lines ending in punctuation). Off, each changes nothing in the output.

Writes data/clean/{train,val,test}.jsonl (records carry their "source"), data/clean/
decontaminated.jsonl (train documents removed for overlap), metrics/clean.json and
metrics/clean_report.md (per source: documents and bytes in and out, drops per reason, length
quantiles, random dropped examples per reason).

Scale: each source's JSON lines are read in shards of about clean_run.shard_bytes and prepared by a
pool of clean_run.workers processes (normalising, scrubbing, filtering, hashing); the main process
takes the shards back in order and alone decides duplicates and writes, so the output is
byte-identical for any number of workers, and memory does not grow with the corpus except for
the indexes, and for the default QA set drawn at the end (add_default_qa reads every split's
passages, QA items aside, into memory once, to choose questions from all of them):
- exact duplicates: a 64-bit key per kept document (two for pairs), 12 bytes each;
- near-duplicates: one 64-bit key per LSH band (9 bands at the defaults) and a 1-byte-per-
  permutation signature: about 240 bytes per kept document at the defaults;
- decontamination: a 64-bit hash per n-gram of val and test (about 8 bytes per word of them).
Keys wait in a small dict (at most 2**17) before becoming a sorted run; runs merge log-structured.

This module is the step: main() loads the params, reads each source of data/raw in shards, has
workers prepare them, decides keep/drop/duplicate in input order, and writes the splits, the
metrics and the report. The per-document rules are in pipeline.data.rules (the web's in
pipeline.data.web_rules, language identification in pipeline.data.language), hashing and the duplicate
indexes in pipeline.data.dedup, the shards, the workers and what they send back in pipeline.data.shards.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core import params as P
from pipeline.core.common import (
    PipelineError,
    atomic_dir,
    atomic_write_text,
    read_json,
    run_main,
    text_fields,
    utf8_bytes,
    write_json,
)
from pipeline.core.paths import CLEAN_DIR, CLEAN_METRICS, CLEAN_REPORT, DECONTAMINATED, RAW_DIR
from pipeline.data.dedup import KeyIndex, NearDuplicates
from pipeline.data.language import check_codes
from pipeline.data.pool import Pool as TaskPool
from pipeline.data.qa import DEFAULT_QA_SOURCE, choose_items
from pipeline.data.rules import PII, QUALITY_REASONS, normalize
from pipeline.data.shards import (
    Candidate,
    Dropped,
    Pool,
    PreparedShard,
    ngram_shard,
    prepare_shard,
    qa_shard,
    read_shards,
)
from pipeline.data.web_rules import LINE_KINDS, Blocklist

SPLITS = ("train", "val", "test")
DROP_REASONS = (  # in the order the rules apply
    "empty",
    "too_short",
    "too_long",
    "length_ratio",
    "url_blocked",
    "lorem_ipsum",
    "punctuated_lines",
    *QUALITY_REASONS,
    "language",
    "duplicate",
    "near_duplicate",
    "contaminated",
)
# Reasons counted (and shown) only when their knob is on: the clean.<knob> that turns each on.
OPTIONAL_REASONS = {
    "url_blocked": "url_blocklist",
    "lorem_ipsum": "drop_lorem_ipsum",
    "punctuated_lines": "min_punctuated_lines",
    "language": "language_id",
}


def drop_reasons(settings: P.Clean) -> tuple[str, ...]:
    """The reasons a clean with these settings counts: all of DROP_REASONS but the optional ones that are off."""
    return tuple(r for r in DROP_REASONS if r not in OPTIONAL_REASONS or getattr(settings, OPTIONAL_REASONS[r]))


def main() -> None:
    params = P.load()
    settings = params.clean
    manifest = read_json(RAW_DIR / "manifest.json")
    blocklist = Blocklist.read(settings.url_blocklist) if settings.url_blocklist else None
    if settings.language_id:
        check_codes(manifest["sources"])  # loads the model here, before the workers fork: they share it
    state = State(settings)
    with atomic_dir(CLEAN_DIR) as out:
        # With decontamination, train goes to a scratch file first: which documents to drop is
        # known only once val and test are complete.
        scratch = out / ("train.scratch.jsonl" if settings.decontaminate_ngram else "train.jsonl")
        writers = {"train": open(scratch, "wb"), **{s: open(out / f"{s}.jsonl", "wb") for s in ("val", "test")}}
        pool = Pool(settings, params.clean_run, blocklist=blocklist, executor=params.data_run)
        try:
            per_source = {src["name"]: clean_source(src, settings, state, pool, writers) for src in manifest["sources"]}
        finally:
            pool.close()
            for w in writers.values():
                w.close()
        contaminated = 0
        if settings.decontaminate_ngram:
            contaminated = decontaminate(scratch, out, settings, params, state, per_source)
        else:
            (out / DECONTAMINATED.name).touch()
        qa_counts = add_default_qa(out, settings, manifest, params)
        totals = {
            split: sum(source_metrics["splits"][split]["documents"] for source_metrics in per_source.values())
            for split in SPLITS
        }
        check_splits(totals, per_source, state.reasons)
    metrics = clean_metrics(per_source, state, contaminated, totals, qa_counts)
    write_json(CLEAN_METRICS, metrics)
    atomic_write_text(CLEAN_REPORT, clean_report(metrics, state.lengths, state.examples.kept))
    print(
        f"clean: kept {metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes), "
        f"dropped {dict((k, v) for k, v in metrics['dropped'].items() if v)}, splits {totals} -> {CLEAN_DIR} "
        f"({pool.workers} worker{'s' if pool.workers > 1 else ''})"
    )


def check_splits(totals: dict, per_source: dict, reasons: tuple[str, ...]) -> None:
    """Train, val and test must each keep documents: if one is empty, a one-line error says why."""
    if totals["train"] == 0:
        documents_in = sum(source_metrics["documents_in"] for source_metrics in per_source.values())
        dropped = {reason: n for reason, n in _sum_dropped(per_source, reasons).items() if n} or "none"
        kept = sum(totals.values())
        hint = (
            f"the {kept} kept went to val/test: the corpus is too small to split (add text, or split "
            "it into more documents: a source's `split`/`chunk_chars`)"
            if kept
            else "check clean.min_chars/max_chars and the sources"
        )
        raise PipelineError(
            f"clean: no training documents left after cleaning (in: {documents_in}, dropped: {dropped}); {hint}"
        )
    for split in ("val", "test"):
        if totals[split] == 0:
            raise PipelineError(
                f"clean: the {split} split is empty; the corpus is too small for "
                f"clean.{split}_fraction, raise it or add text"
            )


def clean_metrics(per_source: dict, state: State, contaminated: int, totals: dict, qa_counts: dict) -> dict:
    """metrics/clean.json: the totals, then each source's counts. Lines removed and the languages
    kept (per source, documents per language, most frequent first) only when their knobs are on."""
    near = state.near
    languages = {
        name: {code: n for code, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n > 0}
        for name, counts in state.languages.items()
    }
    return {
        "documents_kept": sum(source_metrics["documents_kept"] for source_metrics in per_source.values()),
        "bytes_kept": sum(source_metrics["bytes_kept"] for source_metrics in per_source.values()),
        "dropped": _sum_dropped(per_source, state.reasons),
        "pii_replaced": {k: state.pii[k] for k in PII},
        **({"lines_removed": {k: state.lines_removed[k] for k in LINE_KINDS}} if state.removes_lines else {}),
        "near_duplicate_clusters": len(near.cluster_of) if near else 0,
        "contaminated_removed_from_train": contaminated,
        "splits": totals,
        **({"languages": languages} if state.identifies else {}),
        "sources": per_source,
        "default_qa": qa_counts,
    }


def add_default_qa(out: Path, settings: P.Clean, manifest: dict, params: P.Params) -> dict:
    """Append the default QA set (pipeline.data.qa) to the split files, each item in the split of its
    passage; return the items per template and split. The passages are read in shards by the pool
    (its workers, or Ray tasks); only their candidate items come back, in order."""
    if not settings.qa_templates or not settings.qa_items:
        return {}
    titles = {
        (src["name"], origin): normalize(title, settings.normalization, True)
        for src in manifest["sources"]
        for origin, title in src.get("titles", {}).items()
    }
    with TaskPool(params.clean_run.workers, executor=params.data_run) as workers:
        candidates = [
            (split, item)
            for split in SPLITS
            for offered in workers.map(
                qa_shard,
                read_shards(out / f"{split}.jsonl", params.clean_run.shard_bytes),
                titles,
                settings.qa_templates,
            )
            for item in offered
        ]
    items = choose_items(candidates, list(SPLITS), settings.qa_templates, settings.qa_items, settings.split_salt)
    counts = {template: dict.fromkeys(SPLITS, 0) for template in settings.qa_templates}
    for split, split_items in items.items():
        with open(out / f"{split}.jsonl", "a", encoding="utf-8") as f:
            for item in split_items:
                f.write(json.dumps({"source": DEFAULT_QA_SOURCE, **item}, ensure_ascii=False) + "\n")
                counts[item["template"]][split] += 1
    if any(n for c in counts.values() for n in c.values()):
        print(f"clean: default QA set {counts}", flush=True)
    return counts


# --- The main process: decisions that depend on earlier documents, in input order. ---


class State:
    """What cleaning carries from document to document: indexes, counts, samples."""

    def __init__(self, settings: P.Clean):
        self.reasons = drop_reasons(settings)
        self.exact = KeyIndex()
        self.documents = 0  # kept, numbering them for the exact index
        self.near = NearDuplicates(settings) if settings.near_dup else None
        self.heldout_ngrams: list[np.ndarray] = []  # n-gram hashes of val and test documents
        self.examples = Examples(settings.report_examples)
        self.lengths: dict[str, dict[str, Counter]] = defaultdict(lambda: {"in": Counter(), "kept": Counter()})
        self.pii: Counter = Counter()
        self.removes_lines = settings.drop_javascript_lines or settings.drop_cookie_lines
        self.lines_removed: Counter = Counter()  # kind: lines removed from documents
        self.identifies = settings.language_id
        self.languages: dict[str, Counter] = {}  # source whose language is identified: code: documents kept
        self.pair_languages: dict[str, tuple[str, ...]] = {}  # such a source of pairs: its (source, target)


class Examples:
    """Up to per_reason dropped examples per reason, a deterministic reservoir sample."""

    def __init__(self, per_reason: int, seed: int = 0):
        self.per_reason, self.rng = per_reason, random.Random(seed)
        self.seen: Counter = Counter()
        self.kept: dict[str, list] = defaultdict(list)

    def add(self, reason: str, source: str, texts: list[str]) -> None:
        self.seen[reason] += 1
        item = (source, " ||| ".join(t[:300] for t in texts))
        if len(self.kept[reason]) < self.per_reason:
            self.kept[reason].append(item)
        else:
            j = self.rng.randrange(self.seen[reason])
            if j < self.per_reason:
                self.kept[reason][j] = item


class SourceCounts:
    """One source's counts, as its shards come back."""

    def __init__(self, reasons: tuple[str, ...]):
        self.documents_in = self.bytes_in = 0
        self.kept: Counter = Counter()  # split: documents
        self.kept_bytes: Counter = Counter()  # split: bytes of text
        self.dropped = Counter(dict.fromkeys(reasons, 0))
        self.pii: Counter = Counter()

    def metrics(self) -> dict:
        """The source's entry of metrics/clean.json's "sources"."""
        return {
            "documents_in": self.documents_in,
            "bytes_in": self.bytes_in,
            "documents_kept": sum(self.kept.values()),
            "bytes_kept": sum(self.kept_bytes.values()),
            "dropped": dict(self.dropped),
            "pii_replaced": {k: self.pii[k] for k in PII},
            "splits": {s: {"documents": self.kept[s], "bytes": self.kept_bytes[s]} for s in SPLITS},
        }


def clean_source(src: dict, settings: P.Clean, state: State, pool: Pool, writers: dict) -> dict:
    """Clean one source (its manifest entry) into the split writers (train: a scratch file); return
    its counts. Pairs of a source with languages carry their target's ("tgt_lang"); those of a QA
    source, "task". With language_id, each document's language is identified (and must be one of
    its source's languages, if it names any), and each side of a pair of a source with languages."""
    name, pairs = src["name"], src["pairs"]
    languages = tuple(src.get("languages") or ())
    tgt_lang = languages[1] if pairs and len(languages) == 2 else ""  # only pairs have a target
    if settings.language_id and (languages or not pairs):
        state.languages[name] = Counter()
        if pairs:
            state.pair_languages[name] = languages
    counts = SourceCounts(state.reasons)
    lengths = state.lengths[name]
    for shard in pool.map(
        prepare_shard,
        read_shards(RAW_DIR / f"{name}.jsonl", pool.shard_bytes),
        name,
        pairs,
        tgt_lang,
        src.get("task", ""),
        "titles" in src,  # keep_origin: the default QA set asks for a play's title
        languages,
    ):
        counts.documents_in += shard.documents_in
        counts.bytes_in += shard.bytes_in
        lengths["in"].update(shard.lengths_in)
        counts.pii.update(shard.pii)
        state.lines_removed.update(shard.lines_removed)
        if pairs or state.near is not None:
            take_shard(shard, name, state, counts, writers)
        else:
            take_documents(shard, name, state, counts, writers)
    state.pii.update(counts.pii)
    return counts.metrics()


def take_shard(shard: PreparedShard, name: str, state: State, counts: SourceCounts, writers: dict) -> None:
    """Decide, in order, which of a prepared shard's records are kept (written to their split) and
    which are dropped: by a rule in the worker, or as an exact or near duplicate of an earlier one."""
    candidates = [record for record in shard.records if isinstance(record, Candidate)]
    exact = state.exact.lookup([record.keys for record in candidates]).tolist() if candidates else None
    near = state.near.bands.lookup(shard.bands) if candidates and state.near else None
    heldout_ends, heldout_rows = shard.heldout_ends, []
    row = 0  # of this record among the candidates
    for record in shard.records:
        if isinstance(record, Dropped):  # by a rule, in the worker
            counts.dropped[record.reason] += 1
            state.examples.add(record.reason, name, record.texts)
            continue
        reason = None
        if any(v >= 0 for v in exact[row]) or any(k in state.exact.recent for k in record.keys):
            reason = "duplicate"
        elif state.near is not None and state.near.seen(shard.bands[row], near[row], shard.signatures[row]):
            reason = "near_duplicate"
        row += 1
        if reason:
            counts.dropped[reason] += 1
            rec = json.loads(record.line)
            state.examples.add(reason, name, [rec[k] for k in text_fields(rec)])
            continue
        for k in record.keys:
            state.exact.add(k, state.documents)
        state.documents += 1
        if heldout_ends is not None and record.split != "train":
            heldout_rows.append(row - 1)
        writers[record.split].write(record.line)
        counts.kept[record.split] += 1
        counts.kept_bytes[record.split] += record.text_bytes
        state.lengths[name]["kept"][record.chars] += 1
        if record.languages:
            state.languages[name].update(record.languages)
    if heldout_rows:
        starts = np.concatenate(([0], heldout_ends[:-1]))
        state.heldout_ngrams.append(
            np.concatenate([shard.heldout_ngrams[starts[k] : heldout_ends[k]] for k in heldout_rows])
        )
    state.exact.flush()
    if state.near:
        state.near.bands.flush()


def take_documents(shard: PreparedShard, name: str, state: State, counts: SourceCounts, writers: dict) -> None:
    """take_shard for documents without near-duplicate removal, the shard's records at once: a
    document repeats an earlier one when its key is in the index or earlier in the shard (a key's
    first occurrence was kept, or was itself in the index), so no decision waits for the one
    before it. The same outcome as take_shard, in a fraction of the driver's time."""
    candidates = [record for record in shard.records if isinstance(record, Candidate)]
    keys = np.fromiter((record.keys[0] for record in candidates), np.uint64, len(candidates))
    repeated = state.exact.lookup(keys) >= 0
    if state.exact.recent:
        recent = state.exact.recent
        repeated |= np.fromiter((k in recent for k in keys.tolist()), bool, len(keys))
    first = np.zeros(len(keys), bool)
    first[np.unique(keys, return_index=True)[1]] = True
    repeated |= ~first
    row = 0
    for record in shard.records:  # drops, in order: the examples' reservoir draws in input order
        if isinstance(record, Dropped):
            counts.dropped[record.reason] += 1
            state.examples.add(record.reason, name, record.texts)
            continue
        if repeated[row]:
            counts.dropped["duplicate"] += 1
            rec = json.loads(record.line)
            state.examples.add("duplicate", name, [rec[k] for k in text_fields(rec)])
        row += 1
    rows = np.flatnonzero(~repeated).tolist()
    kept = [candidates[i] for i in rows]
    state.exact.recent.update(zip(keys[rows].tolist(), range(state.documents, state.documents + len(kept))))
    state.documents += len(kept)
    for split in SPLITS:
        mine = [record for record in kept if record.split == split]
        writers[split].write(b"".join(record.line for record in mine))
        counts.kept[split] += len(mine)
        counts.kept_bytes[split] += sum(record.text_bytes for record in mine)
    state.lengths[name]["kept"].update(record.chars for record in kept)
    if name in state.languages:
        state.languages[name].update(code for record in kept for code in record.languages)
    if shard.heldout_ends is not None:
        held = [k for k, i in enumerate(rows) if candidates[i].split != "train"]
        if held:
            starts = np.concatenate(([0], shard.heldout_ends[:-1]))
            state.heldout_ngrams.append(
                np.concatenate([shard.heldout_ngrams[starts[rows[k]] : shard.heldout_ends[rows[k]]] for k in held])
            )
    state.exact.flush()


def decontaminate(scratch: Path, out: Path, settings: P.Clean, params: P.Params, state: State, per_source: dict) -> int:
    """Copy train from the scratch file, moving documents that share an n-gram with val/test to
    decontaminated.jsonl (and out of the counts)."""
    held = np.concatenate(state.heldout_ngrams) if state.heldout_ngrams else np.empty(0, np.uint64)
    state.heldout_ngrams = []
    held.sort()
    held = held[np.concatenate(([True], held[1:] != held[:-1]))] if len(held) else held
    removed = 0
    pool = Pool(settings, params.clean_run, held, executor=params.data_run)
    try:
        with open(out / "train.jsonl", "wb") as train, open(out / DECONTAMINATED.name, "wb") as listed:
            for checked in pool.map(ngram_shard, read_shards(scratch, pool.shard_bytes)):
                for line, contaminated in zip(checked.lines, checked.contaminated.tolist()):
                    if not contaminated:
                        train.write(line)
                        continue
                    rec = json.loads(line)
                    removed += 1
                    source_metrics = per_source[rec["source"]]
                    size = utf8_bytes(rec)
                    source_metrics["dropped"]["contaminated"] += 1
                    source_metrics["documents_kept"] -= 1
                    source_metrics["bytes_kept"] -= size
                    source_metrics["splits"]["train"]["documents"] -= 1
                    source_metrics["splits"]["train"]["bytes"] -= size
                    if rec["source"] in state.languages:
                        state.languages[rec["source"]].subtract(
                            [rec["lang"]] if "lang" in rec else state.pair_languages[rec["source"]]
                        )
                    state.examples.add("contaminated", rec["source"], [rec[k] for k in text_fields(rec)])
                    listed.write(line)
    finally:
        pool.close()
    scratch.unlink()
    return removed


# --- The report. ---


def quantiles(counts: Counter, qs: list[float]) -> list[float]:
    """np.quantile (linear) of the values that `counts` counts, without expanding them."""
    values = np.array(sorted(counts))
    ends = np.cumsum([counts[v] for v in values])
    n = int(ends[-1])

    def at(i: int) -> float:
        return float(values[np.searchsorted(ends, i, side="right")])

    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(at(lo) + (pos - lo) * (at(hi) - at(lo)))
    return out


def clean_report(metrics: dict, lengths: dict, examples: dict) -> str:
    """metrics/clean_report.md: what went in, what came out and why, for a reviewer."""
    import pandas as pd

    def table(df: pd.DataFrame) -> str:
        return df.to_markdown()  # tabulate, which dvc already needs

    sources = metrics["sources"]
    rows = {
        name: {
            "documents in": source_metrics["documents_in"],
            "documents out": source_metrics["documents_kept"],
            "bytes in": source_metrics["bytes_in"],
            "bytes out": source_metrics["bytes_kept"],
            "train/val/test": "/".join(str(source_metrics["splits"][s]["documents"]) for s in SPLITS),
        }
        for name, source_metrics in sources.items()
    }
    drops = pd.DataFrame({name: source_metrics["dropped"] for name, source_metrics in sources.items()})
    drops = drops[(drops.T != 0).any()] if len(drops) else drops
    qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    qrows = {}
    for name, ls in lengths.items():
        for which in ("in", "kept"):
            if ls[which]:
                qrows[f"{name}, {which}"] = {f"q{int(p * 100)}": int(v) for p, v in zip(qs, quantiles(ls[which], qs))}
    lines = [
        "# Cleaning report",
        "",
        _summary(metrics),
        "",
        "## Per source",
        "",
        table(pd.DataFrame(rows).T),
        "",
        "## Dropped, per reason",
        "",
        table(drops) if len(drops) else "Nothing was dropped.",
        "",
        *(_languages_section(metrics["languages"], table) if "languages" in metrics else []),
        "## Length in characters (quantiles), before and after",
        "",
        table(pd.DataFrame(qrows).T) if qrows else "No documents.",
        "",
    ]
    if examples:
        lines += ["## Dropped examples (random, per reason)", ""]
        for reason in DROP_REASONS:
            for source, text in examples.get(reason, []):
                lines.append(f"- **{reason}** ({source}): `{text[:200].replace('`', chr(39))}`".replace("\n", " "))
        lines.append("")
    return "\n".join(lines)


def _summary(metrics: dict) -> str:
    """The report's first paragraph: what was kept, replaced, removed and clustered."""
    removed = metrics.get("lines_removed")
    return (
        f"{metrics['documents_kept']:,} documents ({metrics['bytes_kept']:,} bytes) kept; "
        f"PII replaced: {', '.join(f'{k} {v}' for k, v in metrics['pii_replaced'].items())}; "
        + (f"lines removed: {', '.join(f'{k} {v}' for k, v in removed.items())}; " if removed else "")
        + f"near-duplicate clusters: {metrics['near_duplicate_clusters']}; train documents removed for "
        f"overlap with val/test: {metrics['contaminated_removed_from_train']} (listed in "
        f"{DECONTAMINATED})."
    )


def _languages_section(languages: dict, table: Callable) -> list[str]:
    """The report's "Languages" section: per source, documents kept per identified language (a
    pair counts once for each side's language), most frequent first."""
    import pandas as pd

    rows = {
        f"{name}, {code}": {"documents": n, "share": f"{n / sum(counts.values()):.1%}"}
        for name, counts in languages.items()
        for code, n in counts.items()
    }
    body = table(pd.DataFrame(rows).T) if rows else "No document's language was identified."
    return ["## Languages (identified, documents kept)", "", body, ""]


def _sum_dropped(per_source: dict, reasons: tuple[str, ...]) -> dict:
    total = Counter(dict.fromkeys(reasons, 0))
    for source_metrics in per_source.values():
        total.update(source_metrics["dropped"])
    return dict(total)


if __name__ == "__main__":
    run_main(main)
