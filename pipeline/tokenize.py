"""Stage 3, tokenize: train a sentencepiece model on train text, encode every split to tokens.

The tokenizer is lossless (identity normalisation, no dummy prefix, spaces kept, newline a
symbol of its own, byte fallback so nothing is ever unknown): decode(encode(text)) == text, and
every token has an exact UTF-8 byte length, which makes bits per byte exact.

Documents become one flat token stream per split, each followed by the end token </s>; a pair is
rendered as <src> source <tgt> target </s>. Each split file begins with </s>, so every token of
every document has a predecessor and is predicted. Files: data/tokens/{split}.bin (uint16 when
the vocabulary fits, else uint32) with a JSON sidecar, tokenizer.model, and metrics/tokenize.json.

Streaming: the tokenizer learns from a deterministic sample of train (lines of clean's output
chosen by a hash of their bytes, about tokenize.sample_bytes of it; everything when train is
smaller), and each split is read and encoded in batches (sentencepiece's multithreaded batch
encoding, the next batch encoded in a thread while the last is written), so memory does not grow
with the corpus. With data_run.executor ray, Ray tasks parse, encode and render the batches
(pipeline.data.encode) and this process keeps each source's token range and writes, in input order:
the same files.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pipeline.core import params as P
from pipeline.core.common import PipelineError, atomic_dir, read_jsonl, run_main, text_fields, write_json
from pipeline.core.languages import tag
from pipeline.core.paths import CLEAN_DIR, TOKENIZE_METRICS, TOKENS_DIR
from pipeline.data.encode import batches, encode_lines, init_worker
from pipeline.data.pool import Pool
from pipeline.data.tokenizer import ENCODE_BATCH, SRC, TGT, Tokenizer, dtype_for

SPLITS = ("train", "val", "test")


def training_sentences(records, max_chars: int):
    """Lines of train text (both sides of pairs): what sentencepiece learns its pieces from."""
    for r in records:
        for key in text_fields(r):
            for line in r[key].split("\n"):
                if line and len(line) <= max_chars:
                    yield line


def sample(path: Path, sample_bytes: int) -> tuple[Iterator[dict], float]:
    """The train documents the tokenizer learns from: all, or a hash-chosen ~sample_bytes of them.

    Returns the records (read lazily) and the sampling rate (sample_bytes over the file's size). The
    choice depends only on each line's bytes, so it is the same on every run and for every number
    of clean workers (whose output is byte-identical), and only the chosen lines are parsed.
    """
    size = path.stat().st_size
    rate = min(1.0, sample_bytes / size) if sample_bytes and size else 1.0
    if rate >= 1.0:
        return read_jsonl(path), rate
    threshold = rate * 2**64
    return read_jsonl(
        path, lambda line: int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "big") < threshold
    ), rate


def pair_tags(path: Path) -> list[str]:
    """The tags of the pairs in a split file, each a control piece of the vocabulary: a target
    language's <2xx>, a task's <qa>. Only lines that mention the keys are parsed."""
    found = set()
    with open(path, "rb") as f:
        for line in f:
            if b'"tgt_lang"' in line or b'"task"' in line:
                record = json.loads(line)
                if record.get("tgt_lang"):
                    found.add(tag(record["tgt_lang"]))
                if record.get("task"):
                    found.add(f"<{record['task']}>")
    return sorted(found)


def fitting_coverage(sentences: list[str], vocab_size: int, reserved: int) -> tuple[float, int]:
    """tokenize.character_coverage auto: (coverage, vocabulary size). The coverage is the share of
    character occurrences that the most frequent characters reach when each gets a piece of its own
    beside the `reserved` ones (byte and control pieces), within sentencepiece's range [0.98,
    0.9995]; the characters left out are written as UTF-8 bytes (byte fallback), so nothing is lost.
    Where even 0.98 does not fit (thousands of Chinese characters in a small vocabulary), the
    vocabulary grows to hold it, to a multiple of 64."""
    counts = Counter()
    for s in sentences:
        counts.update(s)
    freq = sorted(counts.values(), reverse=True)
    total = sum(freq) or 1
    covered = np.cumsum(freq) / total
    kept = max(vocab_size - reserved, 0)
    reach = float(covered[min(kept, len(freq)) - 1]) if kept and freq else 0.0
    coverage = round(min(0.9995, max(0.98, math.floor(reach * 1e4) / 1e4 - 0.0005)), 4)
    needed = int(np.searchsorted(covered, 0.98)) + 1 + reserved
    if needed > vocab_size:
        vocab_size = 64 * math.ceil((needed + 64) / 64)
    return coverage, vocab_size


def train_tokenizer(records, t: P.Tokenize, out: Path, tags: list[str] = ()) -> tuple[Tokenizer, float]:
    """The sentencepiece model learnt from `records`, and the character coverage it used; `tags`
    (pair_tags) become control pieces beside <src> and <tgt>."""
    model = io.BytesIO()
    sentences = training_sentences(records, t.max_sentence_chars)
    controls = [SRC, TGT, *tags]
    coverage, vocab_size = t.character_coverage, t.vocab_size
    if coverage == "auto":
        sentences = list(sentences)
        # pieces that are not characters: 256 bytes, <unk> <s> </s>, "\n" and the control symbols
        coverage, vocab_size = fitting_coverage(sentences, t.vocab_size, 256 + 3 + 1 + len(controls))
        if vocab_size != t.vocab_size:
            print(
                f"tokenize: vocab_size {t.vocab_size} cannot hold the characters of the train text "
                f"(character_coverage: auto); using {vocab_size}",
                flush=True,
            )
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=t.model_type,
            vocab_size=vocab_size,
            character_coverage=coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            control_symbols=controls,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=4 * t.max_sentence_chars + 16,
            num_threads=t.num_threads or (os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if too_small:  # Chinese text has thousands of characters: each needs a piece of its own
            needed = int(too_small.group(1))
            raise PipelineError(
                f"tokenize.vocab_size: {vocab_size} is too small for the train text, whose characters "
                f"need {needed} pieces at tokenize.character_coverage {coverage}; set it to at least "
                f"{needed} (e.g. {2 ** math.ceil(math.log2(needed))})"
                + (", or character_coverage: auto" if t.character_coverage != "auto" else "")
            ) from None
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise PipelineError(
                f"tokenize.vocab_size: {vocab_size} is larger than the train text "
                f"supports ({msg.split(']')[-1].strip()})"
            ) from None
        raise PipelineError(f"tokenize: sentencepiece training failed: {msg}") from None
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = Tokenizer(out / "tokenizer.model")
    (out / "tokenizer.vocab").write_text(
        "".join(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i)}\n" for i in range(tok.vocab_size)), encoding="utf-8"
    )
    return tok, coverage


def encode_split(tok: Tokenizer, path_in: Path, path: Path, num_threads: int) -> dict:
    """Write one split's token file, batch by batch; return its sidecar (with each source's token range).

    sentencepiece releases the GIL while it encodes, so the next batch is encoded in a thread while
    this one is rendered and written. clean writes each source's records together; a source that
    comes back after another is an error (its tokens would not be one range).
    """
    dtype = dtype_for(tok.vocab_size)
    token_bytes = tok.token_bytes()  # lossless: a text's UTF-8 bytes are its tokens' bytes
    sources: dict[str, dict] = {}
    pos, documents, current = 1, 0, None
    records = read_jsonl(path_in)

    def encode(batch: list[dict]) -> list[list[int]]:
        return tok.encode_records(batch, num_threads)

    with open(path, "wb") as f, ThreadPoolExecutor(1) as encoder:
        f.write(np.array([tok.eos_id], dtype=dtype).tobytes())
        batch = list(itertools.islice(records, ENCODE_BATCH))
        pending = encoder.submit(encode, batch)
        while batch:
            following = list(itertools.islice(records, ENCODE_BATCH))  # read while `batch` is encoded
            encoded = iter(pending.result())
            pending = encoder.submit(encode, following)  # and encode it while `batch` is written
            flat: list[int] = []
            runs = []  # (source, start in flat): where each source's records begin in this batch
            for r in batch:
                if r["source"] != current:
                    if r["source"] in sources:
                        raise PipelineError(f"{path_in}: source '{r['source']}' is not contiguous; re-run clean")
                    current = r["source"]
                    sources[current] = {"start": pos + len(flat), "end": 0, "documents": 0, "bytes": 0}
                    runs.append((current, len(flat)))
                elif not runs:
                    runs.append((current, 0))
                try:
                    tok.render(r, encoded, flat)
                except PipelineError as e:
                    raise PipelineError(f"{path_in}: source '{current}': {e} (no pairs of it in train?)") from None
                sources[current]["documents"] += 1
            ids = np.fromiter(flat, dtype, len(flat))
            for (name, start), (_, end) in zip(runs, [*runs[1:], (None, len(flat))]):
                sources[name]["bytes"] += int(token_bytes[ids[start:end]].sum())
                sources[name]["end"] = pos + end
            f.write(ids.tobytes())
            pos += len(flat)
            documents += len(batch)
            batch = following
    return split_meta(tok, dtype, pos, documents, sources)


def encode_split_tasks(tok: Tokenizer, path_in: Path, path: Path, pool: Pool) -> dict:
    """encode_split by the pool's tasks (pipeline.data.encode: a batch of lines parsed, encoded and
    rendered each); here, in input order, each source's token range is kept and the tokens written."""
    dtype = dtype_for(tok.vocab_size)
    sources: dict[str, dict] = {}
    pos, documents, current = 1, 0, None
    with open(path, "wb") as f:
        f.write(np.array([tok.eos_id], dtype=dtype).tobytes())
        for batch in pool.map(encode_lines, batches(path_in)):
            start = 0
            for name, end, count, size in batch.runs:
                if name != current:
                    if name in sources:
                        raise PipelineError(f"{path_in}: source '{name}' is not contiguous; re-run clean")
                    current = name
                    sources[name] = {"start": pos + start, "end": 0, "documents": 0, "bytes": 0}
                sources[name]["end"] = pos + end
                sources[name]["documents"] += count
                sources[name]["bytes"] += size
                documents += count
                start = end
            f.write(batch.ids.tobytes())
            pos += len(batch.ids)
    return split_meta(tok, dtype, pos, documents, sources)


def split_meta(tok: Tokenizer, dtype: np.dtype, tokens: int, documents: int, sources: dict) -> dict:
    """A split's sidecar: its dtype, vocabulary size, token, byte and document counts, and sources."""
    return {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokens": tokens,
        "bytes": sum(s["bytes"] for s in sources.values()),
        "documents": documents,
        "sources": sources,
    }


def encoders(run: P.DataRun, model: Path) -> Pool | nullcontext:
    """With data_run.executor ray, the Ray tasks that encode (each worker process loads the
    tokenizer from the model's bytes once); else nothing: this process encodes."""
    if run.executor != "ray":
        return nullcontext()
    return Pool(0, init_worker, (model.read_bytes(),), executor=run)


def main() -> None:
    params = P.load()
    t = params.tokenize
    paths = {s: CLEAN_DIR / f"{s}.jsonl" for s in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise PipelineError(f"{path}: missing (run the clean stage first: dvc repro)")
    if next(read_jsonl(paths["train"]), None) is None:
        raise PipelineError(f"{paths['train']}: no documents to train the tokenizer on")
    records, rate = sample(paths["train"], t.sample_bytes)
    metrics = {
        "vocab_size": t.vocab_size,
        "model_type": t.model_type,
        "train_bytes": 0,
        "sample_rate": round(rate, 6),
        "splits": {},
    }
    with atomic_dir(TOKENS_DIR) as out:
        tok, metrics["character_coverage"] = train_tokenizer(records, t, out, pair_tags(paths["train"]))
        metrics["vocab_size"] = tok.vocab_size  # more than asked where character_coverage auto needed it
        with encoders(params.data_run, out / "tokenizer.model") as pool:
            for name, path in paths.items():
                if pool is None:
                    meta = encode_split(tok, path, out / f"{name}.bin", t.num_threads)
                else:
                    meta = encode_split_tasks(tok, path, out / f"{name}.bin", pool)
                write_json(out / f"{name}.json", meta)
                metrics["splits"][name] = {
                    "tokens": meta["tokens"],
                    "bytes": meta["bytes"],
                    "bytes_per_token": round(meta["bytes"] / max(meta["tokens"], 1), 4),
                }
    metrics["train_bytes"] = metrics["splits"]["train"]["bytes"]
    write_json(TOKENIZE_METRICS, metrics)
    summary = ", ".join(
        f"{s} {m['tokens']:,} tokens ({m['bytes_per_token']} B/token)" for s, m in metrics["splits"].items()
    )
    print(f"tokenize: vocab {tok.vocab_size} ({t.model_type}); {summary} -> {TOKENS_DIR}")


if __name__ == "__main__":
    run_main(main)
