"""The experiments side by side: a compact table of what matters, and the scaling picture.

    python -m pipeline.compare                      # every commit and experiment `dvc exp show` knows
    python -m pipeline.compare --plot scaling.png   # + val bits/byte against training FLOPs and parameters
    python -m pipeline.compare --md                 # the table in Markdown (for a pull request)

It reads `dvc exp show --json` (so the workspace, the commits of `--all-commits` or `-A`, and the
queued or finished experiments, as DVC knows them) and keeps, per row: the model (architecture,
layers x width), its parameters, the training FLOPs (flops_per_token x tokens seen, from
metrics/train.json), val bits per byte, chrF and BLEU of the beam search per translation
direction, and QA exact match (greedy, over every question). A row without metrics (an experiment still queued or failed) is
listed as such. Wall-clock figures (tokens/s) live in metrics/timing/, which DVC keeps out of
`exp show`; a run's own tokens/s is in its dvclive curves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from pipeline.core.common import PipelineError, run_main
from pipeline.core.paths import EVAL_METRICS, TRAIN_METRICS


def dvc_experiments(extra: list[str]) -> list[dict]:
    """`dvc exp show --json` as a list of rows: name, params, metrics (one dict per file each)."""
    cmd = ["dvc", "exp", "show", "--json", *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PipelineError("compare: dvc is not installed (pip install -e .)") from None
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise PipelineError(f"compare: {' '.join(cmd)} failed: {lines[-1] if lines else proc.returncode}")
    try:
        entries = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as e:
        raise PipelineError(f"compare: dvc exp show --json printed no JSON ({e})") from None
    rows: list[dict] = []

    def add(entry: dict) -> None:
        data = entry.get("data") or {}
        rev = entry.get("rev") or ""
        name = entry.get("name") or (rev if rev == "workspace" else rev[:7])
        rows.append({"name": name, "rev": rev, "params": by_file(data, "params"), "metrics": by_file(data, "metrics")})
        for group in entry.get("experiments") or []:
            for child in group.get("revs") or []:
                add(child)

    for entry in entries:
        add(entry)
    return rows


def by_file(data: dict, kind: str) -> dict:
    """{file: its data} of one `dvc exp show --json` entry's params or metrics."""
    return {f: (v or {}).get("data") or {} for f, v in (data.get(kind) or {}).items()}


def summarize(row: dict) -> dict:
    """The figures of one row that the table and the plot show (None where absent)."""
    params = row["params"].get("params.yaml", {})
    train = row["metrics"].get(str(TRAIN_METRICS), {})
    ev = row["metrics"].get(str(EVAL_METRICS), {})
    model = params.get("model", {})
    arch = model.get("arch", "gpt")
    width = model.get("n_embd") if arch == "gpt" else model.get("n_hidden")
    out = {
        "name": row["name"],
        "model": f"{arch} {model.get('n_layer', '?')}x{width}" if model else "?",
        "parameters": train.get("parameters"),
        "train_flops": (
            train["flops_per_token"] * train["tokens_seen"]
            if "flops_per_token" in train and "tokens_seen" in train
            else None
        ),
        "val_bits_per_byte": (ev.get("val") or {}).get("bits_per_byte"),
        "translation": {},
        "qa_exact_match": None,
    }
    for direction, d in ((ev.get("translation") or {}).get("directions") or {}).items():
        beam = d.get("beam") or d.get("greedy") or {}
        out["translation"][direction] = (beam.get("chrf"), beam.get("bleu"))
    groups = [g for g in ((ev.get("question_answering") or {}).get("groups") or {}).values() if g.get("items")]
    if groups:  # over all questions: each group's exact match weighted by its items
        em = sum((g.get("greedy") or {}).get("exact_match", 0.0) * g["items"] for g in groups)
        out["qa_exact_match"] = em / sum(g["items"] for g in groups)
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summaries: list[dict], markdown: bool = False) -> str:
    directions = sorted({d for s in summaries for d in s["translation"]})
    head = ["experiment", "model", "params", "train FLOPs", "val bits/byte"]
    head += [f"{d} chrF / BLEU" for d in directions] + ["QA EM"]
    body = []
    for s in summaries:
        cells = [
            s["name"],
            s["model"],
            _fmt(s["parameters"], ",d"),
            _fmt(s["train_flops"], ".2e"),
            _fmt(s["val_bits_per_byte"], ".4f"),
        ]
        for d in directions:
            chrf, bleu = s["translation"].get(d, (None, None))
            cells.append(f"{_fmt(chrf, '.2f')} / {_fmt(bleu, '.2f')}")
        cells.append(_fmt(s["qa_exact_match"], ".4f"))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    # names left-aligned, numbers right-aligned
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *body]
    )


def plot(summaries: list[dict], path: Path) -> int:
    """val bits/byte against training FLOPs and against parameters; returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in summaries if s["val_bits_per_byte"] is not None and s["parameters"]]
    if not points:
        raise PipelineError("compare: no experiment has val bits/byte and parameters to plot (run them first)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "train_flops", "training FLOPs"), (axes[1], "parameters", "parameters")):
        for arch in sorted({s["model"].split()[0] for s in points}):
            mine = [s for s in points if s["model"].split()[0] == arch and s[key]]
            ax.scatter([s[key] for s in mine], [s["val_bits_per_byte"] for s in mine], label=arch)
            for s in mine:
                ax.annotate(
                    s["name"], (s[key], s["val_bits_per_byte"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("val bits per byte (lower is better)")
    axes[0].legend()
    fig.suptitle("Scaling: val bits per byte of each experiment")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return len(points)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--plot", type=Path, help="write the scaling picture (PNG) here")
    ap.add_argument("--md", action="store_true", help="print the table in Markdown")
    ap.add_argument("-A", "--all-commits", action="store_true", help="every commit's metrics (dvc exp show -A)")
    args = ap.parse_args(argv)

    rows = dvc_experiments(["-A"] if args.all_commits else [])
    summaries = [summarize(r) for r in rows]
    print(table(summaries, args.md))
    if args.plot:
        n = plot(summaries, args.plot)
        print(f"compare: {n} experiment(s) plotted in {args.plot}")


if __name__ == "__main__":
    run_main(main)
