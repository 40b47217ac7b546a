"""The recipe race: val bits per byte of a model trained for a fixed time (issue 14, docs/RECORDS.md).

    python benchmarks/speedrun.py                          # params.yaml's recipe, 300 s, seeds 1 and 2
    python benchmarks/speedrun.py --recipe rope-rms-swiglu # a named row of RECIPES below
    python benchmarks/speedrun.py -S model.n_embd=128 -S model.n_head=2 --seeds 1 2 3
    python benchmarks/speedrun.py --seconds 600 --out /tmp/runs.jsonl

Each run is the train stage itself (`python -m pipeline.train`, benchmarks/scratch_train.py) in a
scratch project that links this repository's data/tokens (run `dvc repro tokenize` first), with
train.time_budget_s = SECONDS, max_steps out of the way (the schedule decays by the fraction of
time used), no checkpoints, and train.seed = each seed. The best weights are scored as `evaluate`
scores them: bits per byte over the whole val split, per source range, summed. The last line is
the row for docs/RECORDS.md: the mean, the spread (sample standard deviation) over seeds, and the
command.

A time budget makes the figure a property of the recipe *and* the machine: compare rows measured
on one machine, with nothing else running on it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scratch_train import train_in_scratch  # noqa: E402

from pipeline.core import params as P  # noqa: E402
from pipeline.core.common import read_json  # noqa: E402
from pipeline.data.tokenizer import load_tokens  # noqa: E402
from pipeline.evaluation.scoring import bits_per_byte, nats_of_range  # noqa: E402

# Named recipes: overlays on params.yaml, so a row of docs/RECORDS.md is one `--recipe NAME` (plus
# -S options). "default" is params.yaml as it is; the others spell out everything they change, so
# they stay what they were when params.yaml's defaults move.
GPT2_192 = {  # params.yaml's default until 2026-11-30: GPT-2 style, 4 x 192, AdamW
    "model": {"n_embd": 192, "n_head": 3, "positions": "learned", "norm": "layernorm", "mlp": "gelu"},
    "train": {"optimizer": "adamw", "lr": 2.5e-3, "min_lr": 2.5e-4},
}
MUON = {"train": {"optimizer": "muon"}}
LSTM = P.read_yaml(ROOT / "params" / "lstm.yaml")
WIDTH_128 = {"model": {"n_embd": 128, "n_head": 2}, "train": {"lr": 3.0e-3, "min_lr": 3.0e-4}}
RECIPES: dict[str, dict] = {
    "default": {},
    "gpt2-192": GPT2_192,
    "gpt2-192-muon": P.merge(GPT2_192, MUON),
    "gpt2-128": P.merge(GPT2_192, WIDTH_128),
    "gpt2-128-muon": P.merge(P.merge(GPT2_192, WIDTH_128), MUON),
    # the recurrent baselines: params/lstm.yaml (Adam 1e-3, constant), its tanh RNN and its GRU
    "lstm": LSTM,
    "rnn": P.merge(LSTM, {"model": {"arch": "rnn"}}),
    "gru": P.merge(LSTM, {"model": {"arch": "gru"}}),
}


def override(data: dict, assignment: str) -> dict:
    """data with `section.key=value` (value read as YAML) set, as `dvc exp run -S` does."""
    import yaml

    key, sep, value = assignment.partition("=")
    if not sep or "." not in key:
        sys.exit(f"error: -S {assignment!r}: expected section.key=value")
    *path, leaf = key.split(".")
    nested: dict = {leaf: yaml.safe_load(value)}
    for part in reversed(path):
        nested = {part: nested}
    return P.merge(data, nested)


def val_bits_per_byte(model) -> float:
    """evaluate's val bits per byte: each source's token range scored on its own, summed."""
    tokens = ROOT / "data" / "tokens"
    meta, data = read_json(tokens / "val.json"), load_tokens("val", tokens)
    nats = sum(nats_of_range(model, data, s["start"], s["end"], 32)[0] for s in meta["sources"].values())
    return bits_per_byte(nats, sum(s["bytes"] for s in meta["sources"].values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="train.time_budget_s of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--recipe", default="default", choices=list(RECIPES))
    ap.add_argument("-S", dest="set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path, help="append one JSON line per run to this file")
    args = ap.parse_args()
    if not (ROOT / "data" / "tokens" / "train.bin").exists():
        sys.exit("error: data/tokens/train.bin missing; run `dvc repro tokenize` first")

    data = P.merge(P.read_yaml(ROOT / "params.yaml"), RECIPES[args.recipe])
    for assignment in args.set:
        data = override(data, assignment)
    data = P.merge(
        data, {"train": {"max_steps": 10**9, "time_budget_s": args.seconds}, "train_run": {"checkpoint_interval": 0}}
    )
    P.parse(data)  # a bad option combination fails here, naming its key
    label = " ".join([args.recipe, *args.set])
    command = " ".join(
        ["python benchmarks/speedrun.py", f"--seconds {args.seconds:g}", f"--recipe {args.recipe}"]
        + [f"-S {shlex.quote(s)}" for s in args.set]
        + ["--seeds", *map(str, args.seeds)]
    )
    results = []
    for seed in args.seeds:
        run = P.merge(data, {"train": {"seed": seed}})
        t0 = time.perf_counter()
        model, m, wall = train_in_scratch(run, f"{label} seed {seed}")
        bpb = val_bits_per_byte(model)
        results.append(bpb)
        row = {
            "recipe": label,
            "seed": seed,
            "seconds": args.seconds,
            "val_bits_per_byte": round(bpb, 4),
            "parameters": m["parameters"],
            "steps": m["steps"],
            "tokens": m["tokens_seen"],
            "tokens_per_second": round(m["tokens_per_second"]),
            "mfu": m.get("mfu"),
            "best_step": m.get("best_step"),
            "wall_s": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d"),
        }
        print("RUN " + json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    spread = statistics.stdev(results) if len(results) > 1 else 0.0
    print(
        f"RESULT {label}: val {statistics.mean(results):.4f} bits/byte ± {spread:.4f} (sd over "
        f"{len(results)} seeds: {', '.join(f'{r:.4f}' for r in results)}), {args.seconds:g} s each; {command}"
    )


if __name__ == "__main__":
    main()
