"""Does the model tell who speaks a speech, and does the scoring matter? Builds the who_speaks task
(pipeline.evaluation.tasks: a speech after the two before it, its speaker among three other
characters of the same play) from every speech of a split, and scores it with the trained model
and the bigram two ways:

- partial (evaluate's): the speech's likelihood after each name (Winogrande's partial scoring);
- joint: the likelihood of name and speech together, so the name's own likelihood counts too.

    python benchmarks/research/who_speaks_scoring.py                  # test and val, every speech
    python benchmarks/research/who_speaks_scoring.py --splits val --items 400
    python benchmarks/research/who_speaks_scoring.py --by-speeches    # distractors as often as each speaks

If the bigram gains as much as the model from the joint scoring, the gain is the names' own
frequency (true speakers come with their speeches, distractors uniformly), not understanding.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.common import read_jsonl  # noqa: E402
from pipeline.data.tokenizer import Tokenizer, load_tokens  # noqa: E402
from pipeline.evaluation.scoring import NgramBaselines  # noqa: E402
from pipeline.evaluation.tasks import score_multiple_choice, who_speaks_items  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="+", default=["test", "val"])
    ap.add_argument("--items", type=int, default=100_000, help="at most this many speeches per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--by-speeches", action="store_true", help="draw distractors as often as each character speaks")
    args = ap.parse_args()
    tokens = ROOT / "data" / "tokens"
    tok = Tokenizer(tokens / "tokenizer.model")
    model = load_model(ROOT / "data" / "model" / "best.safetensors", tok, tokens / "tokenizer.model")
    baselines = NgramBaselines(load_tokens("train", tokens), tok.vocab_size)
    for split in args.splits:
        records = read_jsonl(ROOT / "data" / "clean" / f"{split}.jsonl")
        plays = [(r.get("origin") or r.get("source", ""), r["text"]) for r in records if "text" in r]
        items = who_speaks_items(plays, random.Random(f"{args.seed}/who_speaks"), args.items, args.by_speeches)
        joint = [
            {"context": i["context"], "choices": [c + i["continuation"] for c in i["choices"]], "answer": i["answer"]}
            for i in items
        ]
        for name, task, key in (("partial", items, "unnormalized"), ("joint", joint, "unnormalized")):
            s = score_multiple_choice(model, tok, task, baselines, 32, key)["headline"]
            print(
                f"{split}, {len(items)} speeches, {name}: model {s['model']['accuracy']} {s['model']['ci95']}, "
                f"bigram {s['bigram']['accuracy']} {s['bigram']['ci95']}; chance 0.25",
                flush=True,
            )


if __name__ == "__main__":
    main()
