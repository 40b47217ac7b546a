"""Where evaluate's translation time goes, on the trained model: the part as evaluate runs it
(`translate_test_pairs`), split into decoding the test pairs, the tuning grid's beam searches and
sacrebleu's scoring; then each direction's test prompts decoded greedily and by beam search at
several batch sizes (prompts decoded together), with a hash of the outputs to show which agree.

    python benchmarks/speed/translation_time.py                        # after dvc repro
    python benchmarks/speed/translation_time.py --batches 32 128 --repeats 1

Nothing else should run meanwhile: the seconds are wall-clock (docs/LOG.md).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core import params as P  # noqa: E402
from pipeline.core.common import read_jsonl, set_torch_threads  # noqa: E402
from pipeline.core.paths import BEST_WEIGHTS, CLEAN_DIR, TOKENIZER  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.evaluation import translation as T  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402


def timed_parts(model, tok, e, test, val) -> tuple[float, dict]:
    """translate_test_pairs' seconds in all and per part (its calls timed where it makes them)."""
    spent = collections.Counter()

    def timing(name, f):
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t

        return run

    saved = {n: getattr(T, n) for n in ("generate", "beam_search", "corpus_scores")}
    T.generate = timing("test pairs decoded (greedy, then beam)", saved["generate"])
    T.beam_search = timing("tuning grid's beam searches (val)", saved["beam_search"])
    T.corpus_scores = timing("sacrebleu scoring", saved["corpus_scores"])
    try:
        t = time.perf_counter()
        result, _ = T.translate_test_pairs(model, tok, e, "cpu", test, val)
        total = time.perf_counter() - t
    finally:
        for n, f in saved.items():
            setattr(T, n, f)
    for source, d in result["directions"].items():
        g, b = d["greedy"], d.get("beam", {})
        print(
            f"  {source}: chrF {g['chrf']} greedy, {b.get('chrf')} beam; BLEU {g['bleu']} greedy, {b.get('bleu')} beam"
        )
    return total, spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--repeats", type=int, default=1, help="runs of the whole part (the median is printed)")
    args = ap.parse_args()
    set_torch_threads(0)
    e = P.load().evaluate
    tok = Tokenizer(TOKENIZER)
    model = load_model(BEST_WEIGHTS, tok, TOKENIZER)
    test, val = (list(read_jsonl(CLEAN_DIR / f"{s}.jsonl")) for s in ("test", "val"))
    runs = []
    for _ in range(args.repeats):
        runs.append(timed_parts(model, tok, e, test, val))
    total, spent = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(f"translation, as evaluate runs it (decode_batch_size {e.decode_batch_size}): {total:.1f} s")
    for name, s in spent.items():
        print(f"  {name}: {s:.1f} s")
    new_tokens = T.translation_tokens(model, e.max_new_tokens)
    for source, pairs in T.pairs_by_source(test).items():
        prompts = T.translation_prompts(model, tok, pairs, new_tokens)
        beam = {"beam_size": e.beam_size, "length_penalty": 1.4, "repetition_penalty": 1.3}
        for name, decoding in (
            ("greedy", Decoding(new_tokens, e.max_target_ratio)),
            ("beam", Decoding(new_tokens, e.max_target_ratio, **beam)),
        ):
            for batch in args.batches:
                t = time.perf_counter()
                out = generate(model, prompts, tok.eos_id, decoding, batch)
                seconds = time.perf_counter() - t
                digest = hashlib.md5(json.dumps(out).encode()).hexdigest()[:8]
                print(
                    f"  {source} {name}, {len(prompts)} prompts, batch {batch}: {seconds:.1f} s, "
                    f"{sum(map(len, out)):,} new tokens, outputs {digest}"
                )


if __name__ == "__main__":
    main()
