"""Which decoding translates best? The trained model translates the first val pairs of each pair
source under each decoding given, as evaluate prompts them, and prints chrF, BLEU (the tokenizer
that fits the references) and the output's length over the references' (characters):

    python benchmarks/research/decoding.py                       # data/model/best.safetensors, 300 val pairs
    python benchmarks/research/decoding.py --pairs 500 '{}' '{"repetition_penalty": 1.3}' \\
        '{"beam_size": 4, "length_penalty": 1.4, "no_repeat_ngram": 3}'

Each decoding is a JSON object of pipeline.decoding.decode.Decoding's fields (default: greedy, greedy
with repetition penalties 1.15 and 1.3, greedy with no repeated 3-grams, and beam 4 at length
penalties 1.0 and 1.4 with and without a repetition penalty of 1.3). Val, not test: this chooses
defaults. chrF weighs recall twice as much as precision, so a longer output can gain chrF while
it loses BLEU: read the length column beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.common import read_jsonl  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.evaluation.scoring import bleu_tokenizer, corpus_scores  # noqa: E402
from pipeline.evaluation.translation import pairs_by_source, translation_prompts, translation_tokens  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402

DEFAULTS = [
    {},
    {"repetition_penalty": 1.15},
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram": 3},
    {"beam_size": 4, "length_penalty": 1.0},
    {"beam_size": 4, "length_penalty": 1.4},
    {"beam_size": 4, "length_penalty": 1.0, "repetition_penalty": 1.3},
    {"beam_size": 4, "length_penalty": 1.4, "repetition_penalty": 1.3},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("decodings", nargs="*", metavar="JSON", help="Decoding fields, e.g. '{\"beam_size\": 4}'")
    ap.add_argument("--pairs", type=int, default=300, help="val pairs per source")
    ap.add_argument("--checkpoint", default=str(ROOT / "data" / "model" / "best.safetensors"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-ratio", type=float, default=2.0, help="as evaluate.max_target_ratio")
    args = ap.parse_args()
    tokens = ROOT / "data" / "tokens"
    tok = Tokenizer(tokens / "tokenizer.model")
    model = load_model(args.checkpoint, tok, tokens / "tokenizer.model")
    new_tokens = translation_tokens(model, args.max_new_tokens)
    for source, pairs in pairs_by_source(list(read_jsonl(ROOT / "data" / "clean" / "val.jsonl"))).items():
        pairs = pairs[: args.pairs]
        refs = [r["tgt"] for r in pairs]
        tokenize = bleu_tokenizer(refs)
        prompts = translation_prompts(model, tok, pairs, new_tokens)
        for spec in [json.loads(d) for d in args.decodings] or DEFAULTS:
            t0 = time.perf_counter()
            out = generate(model, prompts, tok.eos_id, Decoding(new_tokens, args.max_ratio, **spec), batch_size=32)
            scores, _ = corpus_scores([tok.decode(o).strip() for o in out], refs, 0, tokenize=tokenize)
            print(
                f"{source} ({len(pairs)} val pairs) {json.dumps(spec)}: chrF {scores['chrf']}, "
                f"BLEU ({tokenize}) {scores['bleu']}, length {scores['length_ratio']}; "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
