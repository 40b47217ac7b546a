"""How well clean.language_id's identifier (py3langid) knows each side of the default Bible pairs.

    python benchmarks/research/language_scores.py [--pairs 2000] [--scores 0 0.3 0.5 0.65]

Reads data/clean/train.jsonl (run `dvc repro clean` first), draws --pairs of the bible_en_ru pairs
(fixed seed) and prints, per side, the share whose identified language is the declared one, and the
share that also scores at least each of --scores: what a pair source keeps at each
clean.min_language_score.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.data.language import identify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--scores", type=float, nargs="*", default=[0.0, 0.3, 0.5, 0.65])
    args = ap.parse_args()
    path = REPO / "data/clean/train.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: missing; run `dvc repro clean` first")
    pairs = [r for r in map(json.loads, open(path, encoding="utf-8")) if r["source"] == "bible_en_ru"]
    sample = random.Random(0).sample(pairs, min(args.pairs, len(pairs)))
    both = [True] * len(sample)
    for side, code in (("src", "en"), ("tgt", "ru")):
        found = [identify(r[side]) for r in sample]
        shares = ", ".join(
            f">= {s:g}: {sum(c == code and p >= s for c, p in found) / len(found):.1%}" for s in args.scores
        )
        print(f"{side} ({code}), {len(sample)} pairs: identified as {code} {shares}")
        both = [b and c == code and p >= 0.5 for b, (c, p) in zip(both, found)]
    print(f"both sides at >= 0.5: {sum(both) / len(both):.1%}")


if __name__ == "__main__":
    main()
