"""Where each stage writes: every path of the pipeline's outputs, typed once (dvc.yaml names the
same ones). Relative to the repository root, where `dvc repro` runs the stages."""

from pathlib import Path

# collect
RAW_DIR = Path("data/raw")
MANIFEST = RAW_DIR / "manifest.json"
COLLECT_METRICS = Path("metrics/collect.json")
# clean
CLEAN_DIR = Path("data/clean")
DECONTAMINATED = CLEAN_DIR / "decontaminated.jsonl"  # train documents removed for overlap with val/test
CLEAN_METRICS = Path("metrics/clean.json")
CLEAN_REPORT = Path("metrics/clean_report.md")
# tokenize
TOKENS_DIR = Path("data/tokens")
TOKENIZER = TOKENS_DIR / "tokenizer.model"
TOKENIZE_METRICS = Path("metrics/tokenize.json")
# train (its resumable checkpoints go to train_run.checkpoint_dir, a param)
MODEL_DIR = Path("data/model")
BEST_WEIGHTS = MODEL_DIR / "best.safetensors"
LAST_WEIGHTS = MODEL_DIR / "last.safetensors"
MODEL_CONFIG = MODEL_DIR / "config.json"
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_TIMING = Path("metrics/timing/train.json")
LIVE_DIR = Path("metrics/train")  # dvclive's folder
CURVES_DIR = LIVE_DIR / "plots" / "metrics"  # one TSV per curve
# evaluate
TASKS_DIR = Path("data/tasks")
EVAL_METRICS = Path("metrics/eval.json")
EVAL_TIMING = Path("metrics/timing/evaluate.json")
SAMPLES = Path("metrics/samples.md")
REPORT = Path("metrics/report.md")
LOSS_PNG = Path("metrics/loss.png")
