"""The model's own config: what a model is (its architecture and sizes), filled from params.yaml's
`model` group (pipeline.core.params) and saved in every weights file's metadata
(pipeline.model.weights), so a weights file alone rebuilds its model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    arch: Literal["gpt", "lstm", "gru", "rnn"] = "gpt"
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 128
    n_hidden: int = 256  # lstm/gru/rnn hidden width
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    # gpt only
    positions: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu", "relu2"] = "swiglu"
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no weights) before attention
    zero_init_proj: bool = False  # the residual projections (attention's and the MLP's) start at zero
