"""Every figure issue 25 names for params/gpu.yaml, read from the pipeline's outputs, beside its target.

    python benchmarks/gpu/gpu_preset_figures.py                       # metrics/ and data/clean/ of this folder
    python benchmarks/gpu/gpu_preset_figures.py --baseline cpu.json   # val bits/byte beside the CPU default's

Reads metrics/eval.json, metrics/train.json (and metrics/timing/train.json), and counts the test
pairs of each translation source in data/clean/test.jsonl, so a score on a prefix of the test split
is said to be one. The baseline is the CPU default's metrics/eval.json (benchmarks/gpu/gpu_preset.sh
passes the committed one, from git); without it the CPU default's val bits/byte is not shown.
Prints nothing it did not read: a figure that is missing is said to be missing.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# issue 25's targets, on the whole test split
RU_BLEU, RU_CHRF = 30.0, 55.0
ZH_OVER_COPY = 15.0  # en->zh BLEU (tokenizer zh) at least copying the source's + this, per gettext source
WHO_SPEAKS = 0.40
QA_EXACT = 0.60


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def test_pairs(clean_test: Path) -> Counter:
    """Pairs per source in the test split (records with a target; QA items have the source default_qa)."""
    counts: Counter = Counter()
    if clean_test.is_file():
        with open(clean_test, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "tgt" in rec:
                    counts[rec.get("source", "")] += 1
    return counts


def whole(direction: dict, name: str, counts: Counter) -> str:
    n = direction["pairs"]
    if name not in counts:
        return f"{n:,} test pairs"
    return f"{n:,} test pairs" + ("" if n == counts[name] else f", a PREFIX of the {counts[name]:,} in the split")


def translation(e: dict, counts: Counter) -> list[str]:
    directions = (e.get("translation") or {}).get("directions", {})
    lines = []
    for name, d in directions.items():
        beam, copy = d.get("beam", d["greedy"]), d["copy_source"]
        size = whole(d, name, counts)
        text = (
            f"{name} (en->{d.get('target_language', '?')}, BLEU tokenizer {d.get('bleu_tokenize', '?')}, {size}): "
            f"beam BLEU {beam['bleu']} chrF {beam['chrf']}; greedy BLEU {d['greedy']['bleu']} chrF "
            f"{d['greedy']['chrf']}; copying the source BLEU {copy['bleu']} chrF {copy['chrf']}"
        )
        if d.get("target_language") == "ru":
            ok = beam["bleu"] >= RU_BLEU and beam["chrf"] >= RU_CHRF
            text += f" | target beam BLEU >= {RU_BLEU:g} and chrF >= {RU_CHRF:g}: {verdict(ok)}"
        elif d.get("target_language") == "zh":
            best = max(beam["bleu"], d["greedy"]["bleu"])
            need = copy["bleu"] + ZH_OVER_COPY
            text += f" | target BLEU >= copying + {ZH_OVER_COPY:g} = {need:.1f}: {verdict(best >= need)}"
        lines.append(text)
    return lines or ["translation: MISSING from eval.json"]


def task_line(e: dict, name: str, target: float | None) -> str:
    task = (e.get("understanding") or {}).get(name)
    if not task:
        return f"{name}: MISSING from eval.json"
    head = task.get("headline", {}).get("model", task["model"])
    lo, hi = head["ci95"]
    chance = task["chance"]
    text = (
        f"{name} ({task['items']} test items, scored {task.get('scoring', 'per_byte')}): accuracy "
        f"{head['accuracy']} [{lo}, {hi}] against chance {chance}"
    )
    ok = lo > chance and (target is None or head["accuracy"] >= target)
    want = f">= {target:g} with" if target is not None else "its"
    return text + f" | target {want} interval above chance: {verdict(ok)}"


def qa_lines(e: dict) -> list[str]:
    groups = (e.get("question_answering") or {}).get("groups", {})
    if not groups:
        return ["QA: MISSING from eval.json"]
    lines, items = [], sum(g["items"] for g in groups.values())
    overall = {
        way: sum(g[way]["exact_match"] * g["items"] for g in groups.values()) / items for way in ("greedy", "beam")
    }
    best = max(overall.values())
    lines.append(
        f"QA exact match overall ({items} test items, weighted by template): greedy {overall['greedy']:.3f}, "
        f"beam {overall['beam']:.3f} | target >= {QA_EXACT:g}: {verdict(best >= QA_EXACT)}"
    )
    for name, g in groups.items():
        em = {way: g[way]["exact_match"] for way in ("greedy", "beam")}
        lo = {way: g[way]["exact_match_ci95"][0] for way in ("greedy", "beam")}
        majority = g["majority"]["exact_match"]
        lines.append(
            f"  {name} ({g['items']} items): greedy {em['greedy']} (95% from {lo['greedy']}), beam {em['beam']} "
            f"(from {lo['beam']}); majority answer {g.get('majority_answer')!r} {majority} | target above "
            f"the majority: {verdict(max(em.values()) > majority)}"
        )
    return lines


def bits_per_byte(e: dict, baseline: dict | None) -> list[str]:
    val = e.get("val", {})
    lines = [f"val bits/byte: {val.get('bits_per_byte', 'MISSING')} over every val source of this preset"]
    if baseline is None:
        return lines + ["  (no baseline: pass --baseline with the CPU default's metrics/eval.json)"]
    base = baseline.get("val", {})
    lines.append(f"  the CPU default's: {base.get('bits_per_byte')} over its own val split (fewer sources)")
    # params/gpu.yaml keeps these sources as params.yaml has them: the same val records (docs/LOG.md)
    for name, b in base.get("sources", {}).items():
        mine = val.get("sources", {}).get(name)
        if mine:
            lines.append(f"  {name}: {mine['bits_per_byte']} here, {b['bits_per_byte']} in the CPU default")
    return lines


def training(metrics: Path) -> list[str]:
    path = metrics / "train.json"
    if not path.is_file():
        return ["train.json: MISSING"]
    m = json.loads(path.read_text())
    timing = metrics / "timing" / "train.json"
    m |= json.loads(timing.read_text()) if timing.is_file() else {}
    return [
        f"training: {m['steps']} steps, {m.get('train_seconds', '?')} s, {m.get('tokens_per_second', '?')} "
        f"tokens/s, MFU {m.get('mfu')}; stopped by {m.get('stopped', '?')} (best val loss {m['best_val_loss']} "
        f"at step {m['best_step']}, {m.get('evals_without_improvement', '?')} evaluations without a better one)"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="the project folder (metrics/, data/clean/)")
    ap.add_argument("--baseline", type=Path, help="the CPU default's metrics/eval.json")
    args = ap.parse_args()
    e = json.loads((args.root / "metrics" / "eval.json").read_text())
    baseline = json.loads(args.baseline.read_text()) if args.baseline and args.baseline.is_file() else None
    counts = test_pairs(args.root / "data" / "clean" / "test.jsonl")
    lines = training(args.root / "metrics")
    lines += translation(e, counts)
    lines += [task_line(e, "who_speaks", WHO_SPEAKS), task_line(e, "next_line", None)]
    lines += qa_lines(e)
    lines += bits_per_byte(e, baseline)
    print("\n".join(f"FIGURE {line}" for line in lines))


if __name__ == "__main__":
    main()
