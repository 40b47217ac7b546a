"""Does this checkout decode exactly as commit REV did? Every way of decoding, on the default model.

    python benchmarks/research/same_decoding.py --rev 0404d2e

Runs the same cases with REV's pipeline/ (taken from git) and with this checkout's, each in a process
of its own, and prints which give other tokens: greedy at batch 64 and alone, decoding with no end
token, seeded sampling (temperature, top-k, top-p), the repetition penalty with no_repeat_ngram and
max_ratio, beam search ranked under two length penalties, beam search with penalties, the sliding
window past the context (greedy and beam), streaming, an LSTM's and a GRU's greedy and beam search
(random weights, seeded), and the playground's engine (requests admitted together, one of them a
beam search, one an answer cut at its first line). A refactor of decoding must print "identical"
for every case; a change meant to alter decoding says which cases it alters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CASES = """
import json, sys, time
import torch
torch.set_num_threads(1)
from pipeline.core.common import read_jsonl
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.decode import Decoding, beam_search, generate, stream
from pipeline.evaluation.translation import pairs_by_source, translation_prompts
from pipeline.model.model import build_model
from pipeline.model.weights import load_model
from pipeline.serving.engine import Engine, Request
try:
    from pipeline.core.params import ModelConfig
except ImportError:  # before the model's config moved into the schema
    from pipeline.model.config import ModelConfig
root = sys.argv[1]
tok = Tokenizer(f"{root}/data/tokens/tokenizer.model")
model = load_model(f"{root}/data/model/best.safetensors", tok, f"{root}/data/tokens/tokenizer.model")
pairs = next(iter(pairs_by_source(read_jsonl(f"{root}/data/clean/test.jsonl")).values()))[:64]
prompts = [list(p) for p in translation_prompts(model, tok, pairs, 64)]
eos, out = tok.eos_id, {}
out["greedy, batch 64"] = generate(model, prompts, eos, Decoding(64), 64)
out["greedy, alone"] = [generate(model, [p], eos, Decoding(64), 1)[0] for p in prompts[:8]]
out["no end token"] = generate(model, prompts[:16], -1, Decoding(40), 16)
sampled = Decoding(48, temperature=0.9, top_k=40, top_p=0.95, seed=3)
out["sampled"] = generate(model, prompts[:32], eos, sampled, 8)
penalties = Decoding(48, repetition_penalty=1.3, no_repeat_ngram=3, max_ratio=1.5)
out["penalties"] = generate(model, prompts[:32], eos, penalties, 16)
ranked = beam_search(model, prompts[:24], eos, Decoding(48, beam_size=4), [0.6, 1.0], 8)
out["beam, two length penalties"] = {str(k): v for k, v in ranked.items()}
beam_penalties = Decoding(40, beam_size=3, repetition_penalty=1.2, no_repeat_ngram=2)
out["beam with penalties"] = generate(model, prompts[:12], eos, beam_penalties, 12)
out["window, greedy"] = generate(model, [p * 6 for p in prompts[:4]] + prompts[:4], -1, Decoding(300), 8)
out["window, beam"] = generate(model, prompts[:3], -1, Decoding(280, beam_size=2), 3)
out["stream"] = [t.tolist() for t in stream(model, prompts[:5], eos, Decoding(30))]
torch.manual_seed(0)
for arch in ("lstm", "gru"):
    m = build_model(ModelConfig(arch=arch, n_layer=2, n_embd=32, n_hidden=48, block_size=32), 300).eval()
    ps = [[(i * 7 + j) % 300 for j in range(3 + i % 9)] for i in range(12)]
    out[arch] = [generate(m, ps, 5, Decoding(20), 6), generate(m, ps, 5, Decoding(20, beam_size=3), 6)]
engine, events, jobs = Engine(model, tok, max_rows=32), {}, []
with engine.lock:  # admitted together
    for i, p in enumerate(prompts[:6]):
        events[i] = []
        sink = lambda e, i=i: events[i].append(e.get("text") or e["event"])
        jobs.append(engine.submit(Request(p, Decoding(30, beam_size=3 if i == 4 else 1), first_line=i == 5), sink))
deadline = time.monotonic() + 120
while not all(j.finished for j in jobs) and time.monotonic() < deadline:
    time.sleep(0.05)
engine.close()
out["engine"] = ["".join(x for x in events[i] if x not in ("start", "done")) for i in sorted(events)]
print(json.dumps(out))
"""


def outputs(code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(
        [sys.executable, "-c", CASES, str(ROOT)], env=env, cwd=code, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.exit(f"error: decoding with {code} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the commit to compare with")
    args = ap.parse_args()
    if not (ROOT / "data/model/best.safetensors").exists():
        sys.exit("error: data/model/best.safetensors missing; run `dvc repro` first")
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.rev, "pipeline"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        before, now = outputs(Path(tmp)), outputs(ROOT)
    for case in before:
        print(f"{case:>28}: {'identical' if before[case] == now.get(case) else 'DIFFERENT'}")
    same = sum(before[c] == now.get(c) for c in before)
    print(f"RESULT {same} of {len(before)} cases identical to {args.rev}")


if __name__ == "__main__":
    main()
