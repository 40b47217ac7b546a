"""What the playground's side panel shows of a model: its architecture and training, and the
figures evaluate wrote (val bits/byte beside the baselines, translation, understanding, QA), with
the loss curves; read once, at start, from the model's config.json and the metrics folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.core.paths import CURVES_DIR, EVAL_METRICS, MODEL_CONFIG, TRAIN_METRICS

CURVE_POINTS = 200  # at most this many points of each loss curve


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _curve(path: Path) -> list[list[float]]:
    """[step, loss] pairs of a dvclive TSV, thinned to CURVE_POINTS."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [[float(r["step"]), float(r["loss"])] for r in csv.DictReader(f, delimiter="\t")]
    except (OSError, KeyError, ValueError):
        return []
    stride = max(1, -(-len(rows) // CURVE_POINTS))
    return rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])


def _translation(evaluation: dict) -> list[dict]:
    rows = []
    for source, d in ((evaluation.get("translation") or {}).get("directions") or {}).items():
        row = {"source": source, "to": d.get("target_language"), "pairs": d.get("pairs")}
        for decoding in ("greedy", "beam", "copy_source"):
            if decoding in d:
                row[decoding] = {"chrf": d[decoding].get("chrf"), "bleu": d[decoding].get("bleu")}
        beam = d.get("beam", {})
        row["chosen"] = {k: beam[k] for k in ("beam_size", "length_penalty", "repetition_penalty") if k in beam}
        rows.append(row)
    return rows


def _understanding(evaluation: dict) -> list[dict]:
    rows = []
    for task, d in (evaluation.get("understanding") or {}).items():
        head = d.get("headline") or {"model": d.get("model"), "bigram": d.get("bigram")}
        model, bigram = head.get("model") or {}, head.get("bigram") or {}
        rows.append(
            {
                "task": task,
                "items": d.get("items"),
                "model": model.get("accuracy"),
                "ci95": model.get("ci95"),
                "bigram": bigram.get("accuracy"),
                "chance": d.get("chance"),
            }
        )
    return rows


def _qa(evaluation: dict) -> list[dict]:
    rows = []
    for group, d in ((evaluation.get("question_answering") or {}).get("groups") or {}).items():
        rows.append(
            {
                "group": group,
                "items": d.get("items"),
                "greedy": (d.get("greedy") or {}).get("exact_match"),
                "beam": (d.get("beam") or {}).get("exact_match"),
                "majority": (d.get("majority") or {}).get("exact_match"),
            }
        )
    return rows


def _bits_per_byte(evaluation: dict) -> dict | None:
    val = evaluation.get("val")
    if not isinstance(val, dict) or "bits_per_byte" not in val:
        return None
    return {k: val.get(k) for k in ("bits_per_byte", "unigram_bits_per_byte", "bigram_bits_per_byte")}


def model_card(checkpoint: Path, tok, metrics_dir: Path) -> dict:
    """The side panel's content. `metrics` is None where the pipeline has not evaluated a model
    yet; `metrics_of_this_model` says whether the metrics folder's training is this checkpoint's."""
    config = _read_json(checkpoint.with_name(MODEL_CONFIG.name)) or {}
    train = _read_json(metrics_dir / TRAIN_METRICS.name)
    evaluation = _read_json(metrics_dir / EVAL_METRICS.name)
    curves_dir = metrics_dir / CURVES_DIR.relative_to(EVAL_METRICS.parent)
    card = {
        "checkpoint": str(checkpoint),
        "model": config.get("model", {}),
        "parameters": config.get("parameters"),
        "vocab_size": tok.vocab_size,
        "best_step": config.get("best_step"),
        "directions": sorted(tok.languages),
        "answers_questions": "qa" in tok.tasks,
        "train": train and {k: train.get(k) for k in ("steps", "tokens_seen", "best_val_loss", "device")},
        "metrics": None,
        "metrics_of_this_model": bool(train)
        and train.get("parameters") == config.get("parameters")
        and train.get("best_step") == config.get("best_step"),
        "curves": {s: _curve(curves_dir / s / "loss.tsv") for s in ("train", "val")},
    }
    if evaluation is not None:
        card["metrics"] = {
            "bits_per_byte": _bits_per_byte(evaluation),
            "translation": _translation(evaluation),
            "understanding": _understanding(evaluation),
            "qa": _qa(evaluation),
        }
    return card
