"""Run the train stage on given params in a scratch project that links this repository's
data/tokens, as a user's `python -m pipeline.train` would; shared by the benchmarks that train
through the stage (speedrun.py, speed/train_throughput.py --stage, research/translation_recipes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model.weights import load_model  # noqa: E402


def train_in_scratch(data: dict, label: str, tokenizer=None):
    """(the best model, metrics/train.json with metrics/timing/train.json, wall seconds of the
    stage) of a run with params `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        os.symlink(ROOT / "data" / "tokens", work / "data" / "tokens")
        (work / "params.yaml").write_text(json.dumps(data))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.train"], cwd=work, env=env, capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"{label}: train failed\n{proc.stderr[-2000:]}")
        wall = time.perf_counter() - t0
        model = load_model(work / "data" / "model" / "best.safetensors", tokenizer)
        metrics = json.loads((work / "metrics" / "train.json").read_text())
        metrics |= json.loads((work / "metrics" / "timing" / "train.json").read_text())
    return model, metrics, wall
