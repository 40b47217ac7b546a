"""The Hugging Face export (pipeline.export): transformers loads what it writes and computes the same.

Needs the [hf] extra (transformers, protobuf); CI installs it with [dev]."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, call_stage, copy_project, run_stage, set_params, stage_error

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

from pipeline.core.params import ModelConfig as Model  # noqa: E402
from pipeline.data.tokenizer import Tokenizer, load_tokens  # noqa: E402
from pipeline.decoding.decode import Decoding, generate  # noqa: E402
from pipeline.model.model import build_model  # noqa: E402
from pipeline.model.weights import load_model, save_weights  # noqa: E402

LLAMA = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}  # the default block
GPT2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}
KINDS = {
    "gpt2": (GPT2, "GPT2LMHeadModel"),  # tied, no biases
    "gpt2-bias-untied": ({**GPT2, "bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama": (LLAMA, "LlamaForCausalLM"),
    "llama-bias-untied": ({**LLAMA, "bias": True, "tie_embeddings": False}, "LlamaForCausalLM"),
}
# Besides the corpus's English and Russian: Chinese (characters the tokenizer never saw: bytes),
# spaces in runs, newlines, digits, and the control tags typed as text.
EXTRA_TEXTS = [
    "自然语言处理是人工智能的一个分支。",
    "В начале было Слово, и Слово было у Бога.",
    "  two  spaces,\nthen a newline\n\nand 1234 digits ",
    "ROMEO:\nBut soft! what light through yonder window breaks?",
]


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, prepared, tmp_path_factory):
    """(project, export folder, expected class) for a tiny model of each mappable kind, trained 20 steps."""
    options, cls = KINDS[request.param]
    folder = copy_project(prepared, tmp_path_factory.mktemp(request.param) / "p")
    set_params(
        folder, model=options, train={"max_steps": 20, "eval_interval": 10}, train_run={"checkpoint_interval": 0}
    )
    call_stage("train", folder)
    out = folder / "hf"
    call_stage("export", folder, "--format", "hf", str(out))
    return folder, out, cls


def test_transformers_loads_the_export_and_gives_the_same_logits(exported):
    folder, out, cls = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    ours = load_model(folder / "data/model/best.safetensors")
    val = np.asarray(load_tokens("val", folder / "data/tokens")).astype(np.int64)
    T = ours.block_size
    x = torch.from_numpy(np.stack([val[i * T : (i + 1) * T] for i in range(3)]))
    with torch.no_grad():
        theirs = hf(x).logits
        mine, _ = ours(x)
    assert theirs.shape == mine.shape
    assert (theirs - mine).abs().max().item() < 1e-4


def test_the_tokenizer_gives_the_same_ids_in_every_script(exported):
    folder, out, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer(folder / "data/tokens/tokenizer.model")
    texts = list(EXTRA_TEXTS)
    for split in ("train", "val", "test"):
        for line in (folder / f"data/clean/{split}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record[k] for k in ("text", "src", "tgt") if k in record]
    assert any("Слово" in t for t in texts) and len(texts) > 100
    for text in texts:
        ids = tok.encode([text])[0]
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    # the control tags are single tokens, typed or not; </s> ends text
    assert hf_tok.convert_tokens_to_ids(["<src>", "<tgt>", "</s>"]) == [tok.src_id, tok.tgt_id, tok.eos_id]
    assert hf_tok("<src>", add_special_tokens=False)["input_ids"] == [tok.src_id]
    assert hf_tok.eos_token_id == tok.eos_id


def test_greedy_continuation_is_the_same_as_pipeline_generate(exported):
    folder, out, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer(folder / "data/tokens/tokenizer.model")
    ours = load_model(folder / "data/model/best.safetensors")
    for prompt in ("Shall I compare thee", "В начале"):
        ids = tok.encode([prompt])[0]
        mine = generate(ours, [ids], tok.eos_id, Decoding(max_new_tokens=20))[0]  # up to </s>, excluded
        x = hf_tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        theirs = hf.generate(x, do_sample=False, max_new_tokens=20, pad_token_id=tok.eos_id)[0, len(ids) :].tolist()
        if tok.eos_id in theirs:
            theirs = theirs[: theirs.index(tok.eos_id)]
        assert theirs == mine and len(mine) > 0, prompt


@pytest.mark.parametrize(
    "options, named",
    [
        ({"arch": "lstm"}, "model.arch: lstm"),
        ({**LLAMA, "norm": "layernorm"}, "model.norm: layernorm"),
        ({**GPT2, "norm": "rmsnorm"}, "model.norm: rmsnorm"),
        ({**LLAMA, "mlp": "gelu"}, "model.mlp: gelu"),
        ({"qk_norm": True}, "model.qk_norm"),
        ({"mlp": "relu2"}, "model.mlp: relu2"),
    ],
)
def test_an_architecture_that_does_not_map_is_refused_naming_the_option(prepared, tmp_path, options, named):
    vocab = Tokenizer(prepared / "data/tokens/tokenizer.model").vocab_size
    cfg = Model(**{"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, **options})
    weights = tmp_path / "w.safetensors"
    save_weights(build_model(cfg, vocab).state_dict(), cfg, weights, vocab_size=vocab)
    args = ("--weights", str(weights), "--tokenizer", str(prepared / "data/tokens/tokenizer.model"))
    message = stage_error("export", tmp_path, named, args=(str(tmp_path / "out"), *args))
    assert "export" in message
    assert not (tmp_path / "out").exists()


def test_export_command_line_errors_are_one_line(prepared, tmp_path):
    proc = run_stage("export", tmp_path, str(tmp_path / "out"), check=False)
    assert_clean_error(proc, "data/model/best.safetensors", "missing")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not safetensors")
    proc = run_stage(
        "export",
        tmp_path,
        str(tmp_path / "out"),
        "--weights",
        str(weights),
        "--tokenizer",
        str(prepared / "data/tokens/tokenizer.model"),
        check=False,
    )
    assert_clean_error(proc, "w.safetensors", "not a readable checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_writes_only_its_own_files(exported):
    """An earlier export is replaced only with --force; a folder holding anything else, the
    pipeline's own outputs, and the project itself are refused, and left as they were."""
    folder, out, _ = exported
    model = {p.name: p.read_bytes() for p in (folder / "data/model").iterdir()}
    stage_error("export", folder, "holds an earlier export; --force replaces it", args=("hf",))
    written = json.loads((out / "lmpipe.json").read_text())["files"]
    assert set(written) | {"lmpipe.json"} == {p.name for p in out.iterdir()}
    call_stage("export", folder, str(out), "--force")
    (out / "notes.txt").write_text("mine")  # now it holds something of the user's: never replaced
    stage_error("export", folder, "hf", "holds other files (notes.txt)", args=("hf", "--force"))
    assert (out / "notes.txt").read_text() == "mine"
    for target, needle in (("data/model", "inside data/"), ("metrics/hf", "inside metrics/"), (".", "this project")):
        stage_error("export", folder, needle, args=(target, "--force"))
    assert {p.name: p.read_bytes() for p in (folder / "data/model").iterdir()} == model
    assert not (folder / "metrics/hf").exists()
