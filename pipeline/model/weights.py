"""Weights on disk: safetensors (no pickle), with the model config in the file's metadata, so a
weights file alone rebuilds its model (`save_weights`, `load_weights`, and `load_model` for
inference, which refuses a tokenizer the model was not trained with)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipeline.core.common import PipelineError, first_line, sha256_file
from pipeline.core.params import ModelConfig
from pipeline.model.model import build_model


def save_weights(state_dict: dict, cfg: ModelConfig, path: str | Path, **meta) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if cfg.arch == "gpt" and cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same tensor as wte.weight
    info = {"model_config": dataclasses.asdict(cfg), **meta}
    try:
        save_file(tensors, str(path), metadata={"lmpipe": json.dumps(info, sort_keys=True)})
    except Exception as e:  # safetensors' own error type carries the OS's (a full disk, a read-only folder)
        raise PipelineError(f"{path}: cannot write the weights ({first_line(e)})") from None


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model saved in `path` and its metadata (model_config, vocab_size, ...); raises on a bad file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {})["lmpipe"])
    cfg = ModelConfig(**info["model_config"])
    model = build_model(cfg, info["vocab_size"])
    tensors = load_file(str(path))
    if cfg.arch == "gpt" and cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    model.load_state_dict(tensors)
    return model.to(device), info


def load_model(
    path: str | Path, tokenizer=None, tokenizer_path: str | Path | None = None, device: str = "cpu"
) -> torch.nn.Module:
    """A model saved by `train`, in eval mode; refuse a tokenizer it was not trained with."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no checkpoint (run the train stage: dvc repro)")
    try:
        model, info = load_weights(path, device)
    except Exception as e:  # truncated file, foreign file, wrong keys: one line, no traceback
        raise PipelineError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if tokenizer is not None and tokenizer.vocab_size != info["vocab_size"]:
        raise PipelineError(
            f"{path}: trained with a vocabulary of {info['vocab_size']} but the tokenizer "
            f"has {tokenizer.vocab_size}; pass the tokenizer it was trained with"
        )
    if tokenizer_path is not None and info.get("tokenizer_sha256") not in (None, sha256_file(tokenizer_path)):
        raise PipelineError(f"{path}: was not trained with the tokenizer {tokenizer_path} (sha256 differs)")
    return model.eval()


def copy_weights(state_dict: dict) -> dict:
    """A snapshot of weights on the CPU (the best weights so far)."""
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}
