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
- Understanding: multiple-choice and cloze tasks built from test (pipeline.evaluation.tasks), and
  question answering on the test QA pairs: exact match and F1 beside the majority answer (pipeline.evaluation.qa).

Writes metrics/eval.json, metrics/samples.md, and metrics/report.md with metrics/loss.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core import params as P
from pipeline.core.common import (
    atomic_dir,
    atomic_write_text,
    read_jsonl,
    run_main,
    set_torch_threads,
    write_json,
)
from pipeline.core.paths import (
    BEST_WEIGHTS,
    CLEAN_DIR,
    EVAL_METRICS,
    EVAL_TIMING,
    REPORT,
    SAMPLES,
    TASKS_DIR,
    TOKENIZER,
)
from pipeline.data.tokenizer import Tokenizer, load_tokens
from pipeline.decoding.decode import compiles
from pipeline.evaluation.generation import sample_prompts
from pipeline.evaluation.qa import answer_test_questions
from pipeline.evaluation.report import SCORING_LABELS, plot_loss, report_markdown, samples_markdown
from pipeline.evaluation.scoring import NgramBaselines, score_split
from pipeline.evaluation.tasks import (
    build_tasks,
    choose_scoring,
    read_task,
    score_cloze,
    score_multiple_choice,
    write_task,
)
from pipeline.evaluation.translation import translate_test_pairs
from pipeline.model.weights import load_model


def score_tasks(
    model,
    tok: Tokenizer,
    e: P.Evaluate,
    baselines: NgramBaselines,
    device: str,
    test: list[dict],
    val: list[dict],
    own: dict[Path, list[dict]],
) -> dict:
    """Build the default tasks from the test split into data/tasks/ (and smaller ones from val
    into data/tasks/val/), then score them and the user's task files (`own`, read and checked
    before any work). A default multiple-choice task is scored the way (per byte, unnormalised or
    context-normalised) that does best on its val twin; a task of one's own, per byte."""
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
    for path in [*paths, *own]:
        items = own[path] if path in own else read_task(path)
        if "answer_text" in items[0]:
            scores = score_cloze(model, tok, items, baselines, e.decode_batch_size, device, compiles(e.compile, device))
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
        results[path.stem] = {"file": str(path), **scores}
        shown = scores.get("headline", scores)  # a cloze task has one score
        print(
            f"evaluate: understanding, {path.stem} ({scores['items']} items): model {shown['model']['accuracy']}, "
            f"bigram {shown['bigram']['accuracy']}, chance {scores['chance']}"
            + (f" (scored {SCORING_LABELS[scores['scoring']]}, chosen on val)" if "scoring_val" in scores else ""),
            flush=True,
        )
    return results


def main() -> None:
    e = P.load().evaluate
    # the user's task files, checked before any work: a bad one ends evaluate at once, naming its line
    own = {Path(f): read_task(Path(f)) for f in e.task_files}
    set_torch_threads(0)
    torch.manual_seed(e.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer(TOKENIZER)
    model = load_model(BEST_WEIGHTS, tok, TOKENIZER, device=device)
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
    metrics["understanding"] = score_tasks(model, tok, e, baselines, device, test, val, own)
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
    write_json(EVAL_METRICS, metrics)
    write_json(EVAL_TIMING, seconds)  # apart from eval.json: `dvc metrics diff` shows what the model does
    atomic_write_text(SAMPLES, samples_markdown(samples, e, shown))
    atomic_write_text(REPORT, report)
    plot_loss()
    print(
        f"evaluate: scoring {t1 - t0:.0f} s, translation {t2 - t1:.0f} s, sampling {t3 - t2:.0f} s, "
        f"understanding {t4 - t3:.0f} s, question answering {t5 - t4:.0f} s "
        f"-> {EVAL_METRICS}, {SAMPLES}, metrics/report.md"
    )


if __name__ == "__main__":
    run_main(main)
