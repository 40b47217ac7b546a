"""Does a translation depend on the document before it? Training windows are cut at random from
the token stream, so most pairs are seen after other documents (attention crosses document
boundaries); at test time a pair is prompted alone (`</s> <src> ... <tgt>`). This translates the
same val pairs both ways, greedily, with the trained model:

    python benchmarks/research/cross_document_context.py            # data/model/best.safetensors, 300 val pairs
    python benchmarks/research/cross_document_context.py --pairs 500

- alone: the prompt evaluate uses;
- after another pair: the previous val pair of the same source, in full (`<src> ... <tgt> ... </s>`),
  before the prompt, as a training window would show it.

Both decode up to the same number of new tokens (no cap by prompt length, which would differ).
If the two score alike (chrF, BLEU with the tokenizer that fits the references), what the model
learnt does not lean on the document before, and masking attention at document boundaries in
training would not change what test translation measures; if `alone` scores lower, it does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core.common import read_jsonl  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.evaluation.scoring import bleu_tokenizer, corpus_scores  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--checkpoint", default=str(ROOT / "data" / "model" / "best.safetensors"))
    args = ap.parse_args()
    tok = Tokenizer(ROOT / "data" / "tokens" / "tokenizer.model")
    model = load_model(args.checkpoint, tok)
    val = [r for r in read_jsonl(ROOT / "data" / "clean" / "val.jsonl") if "src" in r][: args.pairs + 1]
    pairs, previous = val[1:], val[:-1]
    refs = [r["tgt"] for r in pairs]
    tokenize = bleu_tokenizer(refs)
    new_tokens = min(128, model.block_size // 2)
    room = model.block_size - new_tokens
    alone = [tok.pair_prompt(ids, r.get("tgt_lang")) for ids, r in zip(tok.encode([r["src"] for r in pairs]), pairs)]
    before = []
    for prev, prompt in zip(previous, alone):
        rendered: list[int] = []
        tok.render(prev, iter(tok.encode([prev["src"], prev["tgt"]])), rendered)
        before.append(([tok.eos_id, *rendered, *prompt[1:]])[-room:])
    for name, prompts in (("alone", alone), ("after another pair", before)):
        out = generate(model, prompts, tok.eos_id, Decoding(new_tokens), batch_size=32)
        scores, _ = corpus_scores([tok.decode(o).strip() for o in out], refs, 0, tokenize=tokenize)
        print(
            f"RESULT {name}: {len(pairs)} val pairs greedy: chrF {scores['chrf']}, BLEU ({tokenize}) {scores['bleu']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
