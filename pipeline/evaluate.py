"""Stage 5, evaluate: how well the model predicts held-out text, translates, and writes.

- Per split (val, test) and per source: mean cross-entropy (nats/token), perplexity, and bits per
  byte = total nats / ln 2 / UTF-8 bytes of the text, which compares models across tokenizers.
  Every token of the split is scored once, in consecutive windows of block_size. Unigram and
  bigram baselines (counted on train) in bits per byte beside the model. The special tokens'
  predictions (</s>, <src>, <tgt>) count; `text_only` gives the same figures without them.
- Test pairs: BLEU, chrF and TER (sacrebleu, corpus level, with signatures and 95% bootstrap
  confidence intervals) for greedy and beam decoding of each source, and for copying the source.
- Text sampled from fixed prompts: distinct-1/2, repeated 4-grams, mean length, beside the same
  statistics of real held-out text.
- Understanding: multiple-choice and cloze tasks built from test (pipeline.understanding), and
  question answering on the test QA pairs: exact match and F1 beside the majority answer (pipeline.qa).

Writes metrics/eval.json, metrics/samples.md, and metrics/report.md with metrics/loss.png.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline import params as P
from pipeline.checkpoint import load_model
from pipeline.common import (
    PipelineError,
    atomic_dir,
    atomic_write_text,
    read_json,
    read_jsonl,
    run_main,
    set_torch_threads,
    write_json,
)
from pipeline.generate import Decoding, generate
from pipeline.qa import answer_test_questions
from pipeline.report import (
    REPORT,
    SCORING_LABELS,
    decoding_words,
    first_per_prompt,
    plot_loss,
    report_markdown,
    translation_table,
)
from pipeline.scoring import (
    NgramBaselines,
    bits_per_byte,
    bleu_tokenizer,
    corpus_scores,
    nats_of_range,
    summarize,
    text_statistics,
    units,
)
from pipeline.tokenizer import TOKENS_DIR, Tokenizer, load_tokens
from pipeline.understanding import (
    build_tasks,
    choose_scoring,
    read_task,
    score_cloze,
    score_multiple_choice,
    write_task,
)

CHECKPOINT = Path("data/model/best.safetensors")
TASKS_DIR = Path("data/tasks")
CLEAN_DIR = Path("data/clean")
METRICS = Path("metrics/eval.json")
TIMING = Path("metrics/timing/evaluate.json")
SAMPLES = Path("metrics/samples.md")
SHOWN_TRANSLATIONS = 8


def score_split(model, split: str, baselines: NgramBaselines, batch_size: int, special_ids) -> dict:
    """Bits per byte of the model and the baselines, per source and in all; and the same over the
    text tokens alone (`text_only`: the predictions of `special_ids` left out)."""
    data = load_tokens(split)
    meta = read_json(TOKENS_DIR / f"{split}.json")
    result: dict = {"sources": {}}
    total = Counter()
    special = np.asarray(sorted(special_ids))
    for name, source in meta["sources"].items():
        start, end, n_bytes = source["start"], source["end"], source["bytes"]
        nats, special_nats = nats_of_range(model, data, start, end, batch_size, special_ids)
        prev, nxt = np.asarray(data[start - 1 : end - 1]), np.asarray(data[start:end])
        uni, bi = baselines.nats(prev, nxt)
        text = ~np.isin(nxt, special)
        counts = {
            "nats": nats,
            "uni": float(uni.sum()),
            "bi": float(bi.sum()),
            "tokens": end - start,
            "bytes": n_bytes,
            "text_nats": nats - special_nats,
            "text_uni": float(uni[text].sum()),
            "text_bi": float(bi[text].sum()),
        }
        result["sources"][name] = split_scores(counts)
        total.update(counts)
    result.update(split_scores(total))
    return result


def split_scores(counts) -> dict:
    """Cross-entropy, perplexity and bits per byte of the model and the baselines, from summed counts."""
    scores = {
        **summarize(counts["nats"], counts["tokens"], counts["bytes"]),
        "unigram_bits_per_byte": bits_per_byte(counts["uni"], counts["bytes"]),
        "bigram_bits_per_byte": bits_per_byte(counts["bi"], counts["bytes"]),
        "text_only": {
            "bits_per_byte": bits_per_byte(counts["text_nats"], counts["bytes"]),
            "unigram_bits_per_byte": bits_per_byte(counts["text_uni"], counts["bytes"]),
            "bigram_bits_per_byte": bits_per_byte(counts["text_bi"], counts["bytes"]),
        },
    }
    scores["bits_per_byte_vs_unigram"] = round(scores["bits_per_byte"] / max(scores["unigram_bits_per_byte"], 1e-9), 4)
    return scores


def translation_tokens(model, max_new_tokens: int) -> int:
    """The most tokens a translation may have: max_new_tokens, within a GPT's context less a little
    room for the source."""
    return min(max_new_tokens, model.block_size - 4) if model.bounded_context else max_new_tokens


def translation_prompts(model, tok: Tokenizer, pairs: list[dict], new_tokens: int) -> list[list[int]]:
    """Each pair's prompt `</s> <src> <2xx> source <tgt>`, a source too long for the context cut
    from the left so that `new_tokens` of target still fit."""
    room = model.block_size - new_tokens if model.bounded_context else None
    prompts = [tok.pair_prompt(ids, r.get("tgt_lang")) for ids, r in zip(tok.encode([r["src"] for r in pairs]), pairs)]
    return [p[-room:] for p in prompts] if room else prompts


def pairs_by_source(records: list[dict]) -> dict[str, list[dict]]:
    """The translation pairs (not QA pairs) of each source."""
    by_source: dict[str, list[dict]] = {}
    for r in records:
        if "src" in r and "task" not in r:
            by_source.setdefault(r["source"], []).append(r)
    return by_source


def translate_test_pairs(
    model, tok: Tokenizer, e: P.Evaluate, device: str, test: list[dict], val: list[dict]
) -> tuple[dict | None, list[dict]]:
    """Translate the test pairs of each pair source (a direction), score them against the references
    with the BLEU tokenizer that fits the target's script, beside copying the source. The beam's
    size and length penalty are chosen per direction by chrF on the first `tune_pairs` val pairs."""
    by_source = pairs_by_source(test)
    if not by_source:
        return None, []
    val_pairs = pairs_by_source(val) if e.tune_pairs else {}
    new_tokens = translation_tokens(model, e.max_new_tokens)

    def translate(pairs: list[dict], decoding: Decoding, label: str) -> list[str]:
        prompts = translation_prompts(model, tok, pairs, new_tokens)
        out = generate(model, prompts, tok.eos_id, decoding, batch_size=e.batch_size, device=device, progress=label)
        return [tok.decode(o).strip() for o in out]

    result: dict = {
        "beam_size": e.beam_size,
        "bootstrap_samples": e.bootstrap,
        "max_target_ratio": e.max_target_ratio,
        "directions": {},
    }
    shown = []
    for source, pairs in by_source.items():
        pairs = pairs[: e.max_pairs] if e.max_pairs else pairs
        refs = [r["tgt"] for r in pairs]
        tokenize = bleu_tokenizer(refs)
        direction: dict = {"pairs": len(pairs), "bleu_tokenize": tokenize}
        if pairs[0].get("tgt_lang"):
            direction["target_language"] = pairs[0]["tgt_lang"]
        decodings = {"greedy": Decoding(new_tokens, e.max_target_ratio)}
        beam = {"beam_size": e.beam_size, "length_penalty": e.length_penalty, "repetition_penalty": 1.0}
        tune = val_pairs.get(source, [])[: e.tune_pairs] if e.beam_size > 1 else []
        if tune:
            beam, direction["beam_chosen_on_val"] = choose_beam(translate, tune, source, e, new_tokens, tokenize)
        if e.beam_size > 1:
            decodings["beam"] = Decoding(new_tokens, e.max_target_ratio, **beam)
        hyps = {}
        for name, decoding in decodings.items():
            hyps[name] = translate(pairs, decoding, f"translate {source} ({name})")
            direction[name], signatures = corpus_scores(hyps[name], refs, e.bootstrap, tokenize=tokenize)
            if name == "beam":
                direction[name].update(beam)
        direction["copy_source"], _ = corpus_scores([r["src"] for r in pairs], refs, e.bootstrap, tokenize=tokenize)
        direction["signatures"] = signatures
        result["directions"][source] = direction
        shown += [
            {"direction": source, "src": r["src"], "ref": r["tgt"], **{k: h[i] for k, h in hyps.items()}}
            for i, r in enumerate(pairs[:SHOWN_TRANSLATIONS])
        ]
    return result, shown


def choose_beam(
    translate, pairs: list[dict], source: str, e: P.Evaluate, new_tokens: int, tokenize: str
) -> tuple[dict, dict]:
    """The beam size, length penalty and repetition penalty with the best chrF on `pairs` (val),
    over the grid of tune_beam_sizes x tune_length_penalties x tune_repetition_penalties (the
    first best on ties); and every point's chrF, BLEU and length ratio."""
    refs = [r["tgt"] for r in pairs]
    grid = []
    for size in e.tune_beam_sizes:
        for length in e.tune_length_penalties if size > 1 else [1.0]:
            for repetition in e.tune_repetition_penalties:
                point = {"beam_size": size, "length_penalty": length, "repetition_penalty": repetition}
                hyps = translate(
                    pairs, Decoding(new_tokens, e.max_target_ratio, **point), f"val {source} ({decoding_words(point)})"
                )
                scores, _ = corpus_scores(hyps, refs, 0, tokenize=tokenize)
                grid.append({**point, **{k: scores[k] for k in ("chrf", "bleu", "length_ratio")}})
    best = max(grid, key=lambda g: g["chrf"])
    chosen = {k: best[k] for k in ("beam_size", "length_penalty", "repetition_penalty")}
    return chosen, {"pairs": len(pairs), "by": "chrf", "grid": grid}


def sample_prompts(
    model, tok: Tokenizer, e: P.Evaluate, device: str, val: list[dict]
) -> tuple[list[tuple[str, str]], dict]:
    """Sample `samples_per_prompt` continuations of each prompt; their statistics beside real text's."""
    if not e.prompts:
        return [], {}
    prompts, labels = [], []
    for text, ids in zip(e.prompts, tok.encode(e.prompts)):
        p = [tok.eos_id, *ids]
        prompts += [p] * e.samples_per_prompt  # generate() keeps the end of an over-long prompt
        labels += [text] * e.samples_per_prompt
    decoding = Decoding(
        e.sample_tokens,
        temperature=e.temperature,
        top_k=e.top_k,
        top_p=e.top_p,
        repetition_penalty=e.repetition_penalty,
        seed=e.seed,
    )
    out = generate(model, prompts, tok.eos_id, decoding, batch_size=e.batch_size, device=device)
    samples = [(label, tok.decode(o)) for label, o in zip(labels, out)]
    texts = [s for _, s in samples]
    # Real held-out text of the same lengths: the start of val documents (text ones first).
    docs = [r["text"] for r in val if "text" in r] or [r["tgt"] for r in val if "tgt" in r]
    reference = (
        [" ".join(units(docs[i % len(docs)])[: max(len(units(t)), 1)]) for i, t in enumerate(texts)] if docs else []
    )
    return samples, {"model": text_statistics(texts), "held_out_text": text_statistics(reference)}


def understanding(
    model, tok: Tokenizer, e: P.Evaluate, baselines: NgramBaselines, device: str, test: list[dict], val: list[dict]
) -> dict:
    """Build the default tasks from the test split into data/tasks/ (and smaller ones from val
    into data/tasks/val/), then score them and the user's task files. A default multiple-choice
    task is scored the way (per byte, unnormalised or context-normalised) that does best on its
    val twin; a task of one's own, per byte. A bad task file is one line (printed, and in the
    metrics); the other tasks still run."""
    with atomic_dir(TASKS_DIR) as out:
        paths = []
        for name, items in build_tasks(test, e.seed, e.task_items).items() if e.task_items else ():
            write_task(out / f"{name}.jsonl", items)
            paths.append(TASKS_DIR / f"{name}.jsonl")
        tune = build_tasks(val, e.seed, e.task_tune_items) if e.task_items and e.task_tune_items else {}
        if tune:
            (out / "val").mkdir()
        for name, items in tune.items():
            write_task(out / "val" / f"{name}.jsonl", items)
    results = {}
    for path in [*paths, *map(Path, e.task_files)]:
        try:
            items = read_task(path)
            if "answer_text" in items[0]:
                scores = score_cloze(model, tok, items, baselines, e.batch_size, device)
            else:
                scoring, tuned = "per_byte", None
                if path in paths and path.stem in tune:
                    val_items = tune[path.stem]
                    scoring, accuracies = choose_scoring(
                        score_multiple_choice(model, tok, val_items, baselines, e.batch_size)
                    )
                    tuned = {"items": len(val_items), "model": accuracies}
                scores = score_multiple_choice(model, tok, items, baselines, e.batch_size, scoring)
                if tuned:
                    scores["scoring_val"] = tuned
        except PipelineError as err:
            print(f"evaluate: task skipped: {err}", flush=True)
            results[path.stem] = {"file": str(path), "error": str(err)}
            continue
        results[path.stem] = {"file": str(path), **scores}
        shown = scores.get("headline", scores)  # a cloze task has one score
        print(
            f"evaluate: understanding, {path.stem} ({scores['items']} items): model {shown['model']['accuracy']}, "
            f"bigram {shown['bigram']['accuracy']}, chance {scores['chance']}"
            + (f" (scored {SCORING_LABELS[scores['scoring']]}, chosen on val)" if "scoring_val" in scores else ""),
            flush=True,
        )
    return results


def samples_markdown(samples: list[tuple[str, str]], e: P.Evaluate, translations: list[dict]) -> str:
    lines = [
        "# Samples",
        "",
        f"Sampled with temperature {e.temperature}, top-k {e.top_k}, top-p {e.top_p}, repetition penalty "
        f"{e.repetition_penalty}, seed {e.seed}, up to {e.sample_tokens} new tokens; the first sample of each prompt.",
        "",
    ]
    for prompt, text in first_per_prompt(samples):
        lines += [f"## {prompt}", "", "```", prompt + text, "```", ""]
    if translations:
        lines += translation_table(translations)
    return "\n".join(lines)


def main() -> None:
    e = P.load().evaluate
    set_torch_threads(0)
    torch.manual_seed(e.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer(TOKENS_DIR / "tokenizer.model")
    model = load_model(CHECKPOINT, tok, TOKENS_DIR / "tokenizer.model", device=device)
    baselines = NgramBaselines(load_tokens("train"), tok.vocab_size)
    metrics: dict = {}
    t0 = time.perf_counter()
    special_ids = np.flatnonzero(tok.token_bytes() == 0)  # </s>, <src>, <tgt>...: tokens that stand for no text
    for split in ("val", "test"):
        metrics[split] = scores = score_split(model, split, baselines, e.batch_size, special_ids)
        print(
            f"evaluate: {split}: {scores['cross_entropy']} nats/token, perplexity {scores['perplexity']}, "
            f"{scores['bits_per_byte']} bits/byte (unigram {scores['unigram_bits_per_byte']}, bigram "
            f"{scores['bigram_bits_per_byte']}; text tokens alone {scores['text_only']['bits_per_byte']})",
            flush=True,
        )
    t1 = time.perf_counter()
    # the held-out records, read once: test for translation and the tasks, val for tuning and samples
    test, val = (list(read_jsonl(CLEAN_DIR / f"{split}.jsonl")) for split in ("test", "val"))
    metrics["translation"], shown = translate_test_pairs(model, tok, e, device, test, val)
    t2 = time.perf_counter()
    for source, direction in (metrics["translation"] or {}).get("directions", {}).items():
        greedy, best = direction["greedy"], direction.get("beam", direction["greedy"])
        print(
            f"evaluate: test translation, {source} ({direction['pairs']} pairs): chrF {greedy['chrf']} greedy, "
            f"{best['chrf']} beam; BLEU ({direction['bleu_tokenize']}) {greedy['bleu']} greedy, {best['bleu']} beam; "
            f"copying the source: chrF {direction['copy_source']['chrf']}, BLEU {direction['copy_source']['bleu']}",
            flush=True,
        )
    samples, metrics["generation"] = sample_prompts(model, tok, e, device, val)
    t3 = time.perf_counter()
    metrics["understanding"] = understanding(model, tok, e, baselines, device, test, val)
    t4 = time.perf_counter()
    train_qa = list(read_jsonl(CLEAN_DIR / "train.jsonl", lambda line: b'"task"' in line))
    metrics["question_answering"], answered = answer_test_questions(model, tok, e, device, test, train_qa)
    for group, g in (metrics["question_answering"] or {}).get("groups", {}).items():
        best = g.get("beam", g["greedy"])
        print(
            f"evaluate: question answering, {group} ({g['items']} items): exact match {g['greedy']['exact_match']} "
            f"greedy, {best['exact_match']} beam, majority answer {g.get('majority', {}).get('exact_match')}; "
            f"F1 {g['greedy']['f1']} greedy, {best['f1']} beam",
            flush=True,
        )
    t5 = time.perf_counter()
    seconds = {
        "scoring": round(t1 - t0, 1),
        "translation": round(t2 - t1, 1),
        "sampling": round(t3 - t2, 1),
        "understanding": round(t4 - t3, 1),
        "question_answering": round(t5 - t4, 1),
    }
    report = report_markdown(metrics, samples, shown, answered)  # reads the other stages' outputs first
    write_json(METRICS, metrics)
    write_json(TIMING, seconds)  # apart from eval.json: `dvc metrics diff` shows what the model does
    atomic_write_text(SAMPLES, samples_markdown(samples, e, shown))
    atomic_write_text(REPORT, report)
    plot_loss()
    print(
        f"evaluate: scoring {t1 - t0:.0f} s, translation {t2 - t1:.0f} s, sampling {t3 - t2:.0f} s, "
        f"understanding {t4 - t3:.0f} s, question answering {t5 - t4:.0f} s "
        f"-> {METRICS}, {SAMPLES}, metrics/report.md"
    )


if __name__ == "__main__":
    run_main(main)
