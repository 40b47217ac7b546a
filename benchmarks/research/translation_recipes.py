"""Training recipes for translation and question answering, compared on val: each variant is
params.yaml with an overlay.

    python benchmarks/research/translation_recipes.py              # train.pair_loss all against target
    python benchmarks/research/translation_recipes.py --max-steps 300 --pairs 200
    python benchmarks/research/translation_recipes.py --variant 'base={}' \
        --variant 'pairs_x4={"train": {"source_weights": {"bible_en_ru": 4}}}'

Runs the train stage (`python -m pipeline.train`) once per variant in a scratch copy of the
project that links data/tokens (run `dvc repro tokenize` first), with everything else as in
params.yaml. Then translates the first --pairs **val** pairs of each pair source (greedy; val,
not test, since this chooses a default) and prints chrF and BLEU (sacrebleu, the BLEU tokenizer
that fits the references), val bits per byte over all tokens, and the exact match of greedy
answers to the val QA pairs (pipeline.data.qa, pipeline.evaluation.qa) overall and per template, beside the majority answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # scratch_train

from scratch_train import train_in_scratch  # noqa: E402

from pipeline.core import params as P  # noqa: E402
from pipeline.core.common import read_jsonl  # noqa: E402
from pipeline.data.tokenizer import Tokenizer, load_tokens  # noqa: E402
from pipeline.decoding.answer import answer  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.evaluation.qa import answer_scores, group_of, majority_answers, qa_items  # noqa: E402
from pipeline.evaluation.scoring import bits_per_byte, bleu_tokenizer, corpus_scores, nats_of_range  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variant",
        action="append",
        metavar="NAME=JSON",
        help="a name and a params overlay (JSON); default: train.pair_loss all, then target",
    )
    ap.add_argument("--max-steps", type=int, default=0, help="override train.max_steps (0: params.yaml's)")
    ap.add_argument("--pairs", type=int, default=300, help="val pairs to translate")
    args = ap.parse_args()
    tokens = ROOT / "data" / "tokens"
    if not (tokens / "train.bin").exists():
        sys.exit("error: data/tokens/train.bin missing; run `dvc repro tokenize` first")
    tok = Tokenizer(tokens / "tokenizer.model")
    val = load_tokens("val", tokens)
    val_meta = json.loads((tokens / "val.json").read_text())
    val_bytes = val_meta["bytes"]
    val_records = list(read_jsonl(ROOT / "data" / "clean" / "val.jsonl"))
    pairs = [r for r in val_records if "src" in r and "task" not in r][: args.pairs]
    questions = qa_items(val_records)
    majority = majority_answers(qa_items(read_jsonl(ROOT / "data" / "clean" / "train.jsonl", lambda b: b'"task"' in b)))
    refs = [r["tgt"] for r in pairs]
    tokenize = bleu_tokenizer(refs)
    base = P.read_yaml(ROOT / "params.yaml")
    variants = [v.split("=", 1) for v in args.variant or []] or [
        (f"pair_loss={v}", json.dumps({"train": {"pair_loss": v}})) for v in ("all", "target")
    ]
    for name, overlay in variants:
        data = P.merge(P.merge(base, json.loads(overlay)), {"train_run": {"checkpoint_interval": 0}})
        if args.max_steps:
            data = P.merge(data, {"train": {"max_steps": args.max_steps}})
        model_cfg = P.parse(data).model
        model, train, wall = train_in_scratch(data, name, tok)
        bpb = nats_of_range(model, val, 1, len(val), 32)[0] / math.log(2) / val_bytes
        per_source = {  # each source's range scored on its own, as evaluate does
            name: bits_per_byte(nats_of_range(model, val, s["start"], s["end"], 32)[0], s["bytes"])
            for name, s in val_meta["sources"].items()
        }
        new_tokens = min(128, model_cfg.block_size - 4)  # as evaluate does: room for the target
        room = model_cfg.block_size - new_tokens
        prompts = [
            tok.pair_prompt(ids, r.get("tgt_lang"))[-room:]
            for ids, r in zip(tok.encode([r["src"] for r in pairs]), pairs)
        ]
        out = generate(model, prompts, tok.eos_id, Decoding(new_tokens, max_ratio=2.0), batch_size=32)
        hyps = [tok.decode(o).strip() for o in out]
        scores, _ = corpus_scores(hyps, refs, 0, tokenize=tokenize)
        print(
            f"RESULT {name}: {train['steps']} steps, best val loss {train['best_val_loss']:.4f} "
            f"(the loss it trains on), val {bpb:.4f} bits/byte (all tokens; per source {per_source}); "
            f"{len(pairs)} val pairs greedy: "
            f"chrF {scores['chrf']}, BLEU ({tokenize}) {scores['bleu']}; train stage {wall:.0f} s",
            flush=True,
        )
        if questions:
            answers = answer(model, tok, [q["src"] for q in questions], Decoding(32), 32, "cpu")
            groups = ["all", *dict.fromkeys(map(group_of, questions))]
            for g in groups:
                rows = [i for i, q in enumerate(questions) if g == "all" or group_of(q) == g]
                truths = [questions[i]["tgt"] for i in rows]
                em = answer_scores([answers[i] for i in rows], truths, 0)
                baseline = answer_scores([majority.get(group_of(questions[i]), "") for i in rows], truths, 0)
                print(
                    f"RESULT {name}: QA {g} ({len(rows)} val questions): exact match {em['exact_match']} "
                    f"{em['exact_match_ci95']}, F1 {em['f1']}; majority answer {baseline['exact_match']}, F1 {baseline['f1']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
