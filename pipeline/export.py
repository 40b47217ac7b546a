"""Export a trained model to a format other tools load.

    python -m pipeline.export --format hf OUT/                  # data/model/best.safetensors
    python -m pipeline.export --format hf OUT/ --weights data/model/last.safetensors

`--format hf` writes a folder that Hugging Face transformers loads as it is
(`pip install -e ".[hf]"`):

    model = AutoModelForCausalLM.from_pretrained("OUT")
    tokenizer = AutoTokenizer.from_pretrained("OUT")

- The GPT with rotary positions, RMSNorm and a SwiGLU MLP becomes a `LlamaForCausalLM`; the
  GPT-2-style one (learned positions, LayerNorm, GELU) a `GPT2LMHeadModel` (exact GELU, and zero
  biases where model.bias is false). Weights in safetensors (model.safetensors), the same
  numbers: the fused query/key/value matrix is split for Llama and transposed for GPT-2's Conv1D.
  Anything else is refused, naming the option that does not map (a recurrent model, a mixed
  recipe, QK-norm, ReLU squared).
- The sentencepiece tokenizer becomes a `tokenizers` tokenizer.json that gives the same ids:
  BPE with the merges its vocabulary implies (or Unigram with its scores), byte fallback, spaces
  as ▁, no dummy prefix; the newline and the control tags (<src>, <tgt>, <2ru>, <qa>) are
  added tokens, </s> is the end-of-text token. Unlike sentencepiece, the tags typed in text
  are read as the tags: `"<src><2ru>In the beginning<tgt>"` prompts a translation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from pipeline.core.common import PipelineError, atomic_dir, run_main
from pipeline.core.paths import BEST_WEIGHTS, TOKENIZER
from pipeline.model.weights import load_model

FORMATS = ("hf",)
MARKER = "lmpipe.json"  # in every export: what it was exported from, and the files it wrote
PIPELINE_FOLDERS = ("data", "metrics")  # the pipeline's outputs: never written by an export


def hf_architecture(cfg) -> str:
    """ "llama" or "gpt2" for a model config, or PipelineError naming what does not map."""
    if cfg.arch != "gpt":
        raise PipelineError(f"export: model.arch: {cfg.arch} has no transformers counterpart (only the GPT exports)")
    if cfg.qk_norm:
        raise PipelineError("export: model.qk_norm: true maps to neither Llama nor GPT-2")
    if cfg.mlp == "relu2":
        raise PipelineError("export: model.mlp: relu2 maps to neither Llama nor GPT-2")
    # the positions choose the family (rope: Llama, learned: GPT-2); the rest must be that family's
    name, title, want = (
        ("llama", "Llama", {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"})
        if cfg.positions == "rope"
        else ("gpt2", "GPT-2", {"positions": "learned", "norm": "layernorm", "mlp": "gelu"})
    )
    wrong = [f"model.{k}: {getattr(cfg, k)}" for k, v in want.items() if getattr(cfg, k) != v]
    if wrong:
        needs = ", ".join(f"model.{k}: {v}" for k, v in want.items())
        raise PipelineError(
            f"export: {', '.join(wrong)} does not map: {cfg.positions} positions export as {title}, which needs {needs}"
        )
    return name


def llama_weights(state: dict, cfg) -> dict:
    C = cfg.n_embd
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = state[b + "ln1.weight"]
        out[h + "post_attention_layernorm.weight"] = state[b + "ln2.weight"]
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = state[b + f"attn.qkv.{part}"].split(C, dim=0)
            out[h + f"self_attn.q_proj.{part}"] = q
            out[h + f"self_attn.k_proj.{part}"] = k
            out[h + f"self_attn.v_proj.{part}"] = v
            out[h + f"self_attn.o_proj.{part}"] = state[b + f"attn.proj.{part}"]
            gate, up = state[b + f"mlp.fc.{part}"].chunk(2, dim=0)  # silu(gate x) * (up x)
            out[h + f"mlp.gate_proj.{part}"] = gate
            out[h + f"mlp.up_proj.{part}"] = up
            out[h + f"mlp.down_proj.{part}"] = state[b + f"mlp.proj.{part}"]
    return out


def gpt2_weights(state: dict, cfg) -> dict:
    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if cfg.bias else torch.zeros(size)

    C = cfg.n_embd
    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    out["transformer.ln_f.weight"] = state["ln_f.weight"]
    out["transformer.ln_f.bias"] = bias("ln_f.bias", C)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + f"{theirs}.weight"] = state[b + f"{ours}.weight"]
            out[h + f"{theirs}.bias"] = bias(b + f"{ours}.bias", C)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc")):
            w = state[b + f"{ours}.weight"]
            out[h + f"{theirs}.weight"] = w.t()  # Conv1D: (in, out)
            out[h + f"{theirs}.bias"] = bias(b + f"{ours}.bias", w.size(0))
        w = state[b + "mlp.proj.weight"]
        out[h + "mlp.c_proj.weight"] = w.t()
        out[h + "mlp.c_proj.bias"] = bias(b + "mlp.proj.bias", w.size(0))
    return out


def hf_config(arch: str, cfg, vocab_size: int, special: dict, mlp_width: int):
    import transformers

    ids = {"bos_token_id": special["<s>"], "eos_token_id": special["</s>"]}
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=mlp_width,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            hidden_act="silu",
            max_position_embeddings=cfg.block_size,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            tie_word_embeddings=cfg.tie_embeddings,
            **ids,
        )
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu",  # exact (erf) GELU, as torch's F.gelu; GPT-2's default is the tanh one
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=cfg.tie_embeddings,
        **ids,
    )


def hf_tokenizer(model_file: Path):
    """The sentencepiece model as a `tokenizers.Tokenizer` that encodes to the same ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower()
    if kind not in ("bpe", "unigram", "char"):
        raise PipelineError(f"export: tokenize.model_type: {kind} has no tokenizers counterpart (bpe, unigram, char)")
    if norm.add_dummy_prefix or norm.name != "identity" or spec.treat_whitespace_as_suffix:
        raise PipelineError(f"{model_file}: not a tokenizer this pipeline trained (normalisation {norm.name!r})")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    NORMAL, UNKNOWN, CONTROL, USER = 1, 2, 3, 4  # sentencepiece's piece types
    if kind == "unigram":
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=spec.unk_id, byte_fallback=True)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = []  # bpe: the pairs that make each normal piece, by the piece's rank (its id); char: none
        for i, (piece, _, piece_type) in enumerate(pieces):
            if kind == "bpe" and piece_type == NORMAL:
                splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
                merges += [(i, vocab[a], vocab[b], a, b) for a, b in splits if a in vocab and b in vocab]
        merges.sort()
        model = models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=pieces[spec.unk_id][0],
            byte_fallback=True,
            fuse_unk=True,
        )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, t in pieces if t == USER])
    tok.add_special_tokens(
        [AddedToken(p, normalized=False, special=True) for p, _, t in pieces if t in (CONTROL, UNKNOWN)]
    )
    return tok, {p: i for i, (p, _, t) in enumerate(pieces) if t in (CONTROL, UNKNOWN)}


def export_hf(weights: Path, tokenizer_file: Path, out_dir: Path) -> str:
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    model = load_model(weights, tokenizer_path=tokenizer_file)  # refuses another tokenizer's weights
    cfg = model.cfg
    arch = hf_architecture(cfg)
    tok, special = hf_tokenizer(tokenizer_file)
    if tok.get_vocab_size() != model.vocab_size:
        raise PipelineError(
            f"{tokenizer_file}: {tok.get_vocab_size()} tokens, but {weights} was trained on {model.vocab_size}"
        )
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tensors = (llama_weights if arch == "llama" else gpt2_weights)(state, cfg)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    config = hf_config(arch, cfg, model.vocab_size, special, model.blocks[0].mlp.proj.in_features)
    config.architectures = ["LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=cfg.block_size,
        add_bos_token=False,
        add_eos_token=False,
    )
    with atomic_dir(out_dir) as out:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(out)
        fast.save_pretrained(out)
        files = sorted(p.name for p in out.iterdir())
        (out / MARKER).write_text(
            json.dumps({"source": str(weights), "model_config": dataclasses.asdict(cfg), "files": files}, indent=2)
            + "\n"
        )
    return arch


def check_out(out: Path, force: bool) -> None:
    """Export writes only its own files: a new or empty folder, or with --force a previous export
    of this project (its own files and nothing else), never under data/ or metrics/."""
    here = Path.cwd().resolve()
    target = out.resolve()
    for folder in PIPELINE_FOLDERS:
        if target == here / folder or (here / folder) in target.parents:
            raise PipelineError(
                f"export: {out}: inside {folder}/, the pipeline's outputs; export to a folder of its own"
            )
    if target in (here, *here.parents) or target == Path.home().resolve():
        raise PipelineError(
            f"export: {out}: would replace a folder that holds this project; export to a folder of its own"
        )
    if out.exists() and not out.is_dir():
        raise PipelineError(f"export: {out}: a file, not a folder")
    held = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not held:
        return
    try:
        written = set(json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        written = set()  # no export of this project wrote this folder
    if not held <= written:
        others = ", ".join(sorted(held - written)[:3])
        raise PipelineError(f"export: {out}: holds other files ({others}); export to a new or empty folder")
    if not force:
        raise PipelineError(f"export: {out}: holds an earlier export; --force replaces it")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path, help="the folder to write: new, empty, or an earlier export with --force")
    ap.add_argument("--force", action="store_true", help="replace an earlier export in OUT (nothing else)")
    ap.add_argument("--format", choices=FORMATS, default="hf")
    ap.add_argument("--weights", type=Path, default=BEST_WEIGHTS)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    args = ap.parse_args(argv)

    check_out(args.out, args.force)
    for path in (args.weights, args.tokenizer):
        if not path.is_file():
            raise PipelineError(f"{path}: missing (run the pipeline first: dvc repro)")
    try:
        import transformers  # noqa: F401
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except ImportError as e:
        raise PipelineError(f'export: {e.name} is not installed (pip install -e ".[hf]")') from None
    arch = export_hf(args.weights, args.tokenizer, args.out)
    print(f"export: {args.weights} -> {args.out}/ as {arch} (transformers: AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    run_main(main)
