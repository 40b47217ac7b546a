"""train, evaluate and generate on the tiny corpus.

The stages run in this process (what they compute, the errors they raise); `python -m
pipeline.generate` runs as a command where its output and error format are what is under test.
"""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_clean_error, call_stage, copy_project, run_stage, set_params, stage_error
from safetensors.torch import load_file

from pipeline.core.common import PipelineError
from pipeline.core.params import Evaluate
from pipeline.data.tokenizer import Tokenizer
from pipeline.decoding.decode import Decoding, generate
from pipeline.model.weights import load_model, load_weights


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    folder = copy_project(prepared, tmp_path_factory.mktemp("trained") / "p")
    call_stage("train", folder)
    call_stage("evaluate", folder)
    return folder


@pytest.fixture(scope="module")
def trained_model(trained):
    """The trained tokenizer and best model, loaded once."""
    tok = Tokenizer(trained / "data/tokens/tokenizer.model")
    return tok, load_model(trained / "data/model/best.safetensors", tok)


def read_curve(folder: Path, name: str) -> list[float]:
    path = folder / "metrics/train/plots/metrics" / f"{name}.tsv"
    with open(path) as f:
        return [float(r[name.split("/")[-1]]) for r in csv.DictReader(f, delimiter="\t")]


def test_train_writes_checkpoints_metrics_and_curves(trained):
    p = yaml.safe_load((trained / "params.yaml").read_text())
    steps, batch, block = p["train"]["max_steps"], p["train"]["batch_size"], p["model"]["block_size"]
    m = json.loads((trained / "metrics/train.json").read_text())
    timing = json.loads((trained / "metrics/timing/train.json").read_text())
    assert not {"tokens_per_second", "train_seconds", "mfu"} & set(m)  # apart: not in `dvc metrics diff`
    assert m["arch"] == "gpt" and m["steps"] == steps and m["parameters"] > 0
    assert m["tokens_seen"] == steps * batch * block
    assert timing["tokens_per_second"] > 0 and timing["train_seconds"] > 0
    val = read_curve(trained, "val/loss")
    assert len(val) == steps // p["train"]["eval_interval"] + 1  # steps 0, 10, ..., max_steps
    assert val[-1] < val[0] - 0.5, val  # it learns
    assert m["best_val_loss"] == pytest.approx(min(val), abs=1e-4)
    lr = read_curve(trained, "lr")
    assert len(lr) == steps and max(lr) == pytest.approx(p["train"]["lr"]) and lr[-1] < lr[len(lr) // 2]
    for name in ("best.safetensors", "last.safetensors"):
        model, info = load_weights(trained / "data/model" / name)
        assert info["vocab_size"] == 512 and info["model_config"]["arch"] == "gpt"
    assert load_weights(trained / "data/model/last.safetensors")[1]["step"] == steps
    assert m["flops_per_token"] > 6 * m["parameters"] * 0.5 and 0 < timing["mfu"] < 1.5
    assert len(read_curve(trained, "mfu")) == steps and len(read_curve(trained, "tokens_per_second")) == steps


def test_train_is_deterministic_on_cpu(trained, tmp_path):
    again = copy_project(trained, tmp_path / "again")
    shutil.rmtree(again / "data/checkpoints")  # a fresh run, not a resumed one
    call_stage("train", again)
    a = load_file(trained / "data/model/last.safetensors")
    b = load_file(again / "data/model/last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_recurrent_baselines_train_and_evaluate(prepared, tmp_path, arch):
    folder = copy_project(prepared, tmp_path / arch)
    set_params(folder, model={"arch": arch}, train={"max_steps": 10, "eval_interval": 5, "optimizer": "adamw"})
    call_stage("train", folder)
    call_stage("evaluate", folder)
    ev = json.loads((folder / "metrics/eval.json").read_text())
    assert ev["val"]["bits_per_byte"] > 0 and ev["translation"]["directions"]["pairs"]["pairs"] == 20


def test_block_size_larger_than_token_file_is_a_clean_error(trained, tmp_path):
    folder = copy_project(trained, tmp_path / "p")
    before = (folder / "data/model/best.safetensors").read_bytes()
    set_params(folder, model={"block_size": 100000})
    stage_error("train", folder, "model.block_size", "100000")
    assert (folder / "data/model/best.safetensors").read_bytes() == before


def test_evaluate_reports_bits_per_byte_and_baselines(trained):
    ev = json.loads((trained / "metrics/eval.json").read_text())
    for split in ("val", "test"):
        s = ev[split]
        assert s["bits_per_byte"] == pytest.approx(
            s["cross_entropy"] * s["tokens"] / math.log(2) / s["bytes"], rel=1e-3
        )
        assert s["perplexity"] == pytest.approx(math.exp(s["cross_entropy"]), rel=1e-3)
        # The model beats the unigram baseline after 60 steps on this repetitive corpus, and a
        # bigram model of train beats the unigram one.
        assert s["bits_per_byte"] < s["unigram_bits_per_byte"]
        assert s["bigram_bits_per_byte"] < s["unigram_bits_per_byte"]
        assert set(s["sources"]) == {"sonnets", "pairs"}
        assert sum(x["bytes"] for x in s["sources"].values()) == s["bytes"]


def test_evaluate_scores_translation_with_confidence_intervals_and_baseline(trained):
    tr = json.loads((trained / "metrics/eval.json").read_text())["translation"]
    assert tr["beam_size"] == 2 and tr["bootstrap_samples"] == 100
    assert list(tr["directions"]) == ["pairs"]  # one direction per pair source
    direction = tr["directions"]["pairs"]
    assert direction["pairs"] == 20 and direction["bleu_tokenize"] == "13a"  # Russian references
    for decoding in ("greedy", "beam", "copy_source"):
        scores = direction[decoding]
        for metric in ("bleu", "chrf", "ter"):
            assert 0 <= scores[metric] and scores[f"{metric}_ci95"] >= 0, (decoding, metric)
        assert scores["chrf"] <= 100 and scores["bleu"] <= 100
    # Copying an English source scores near zero chrF against Russian references.
    assert direction["copy_source"]["chrf"] < 15
    sig = direction["signatures"]
    assert sig["bleu"].startswith("nrefs:1|") and "tok:13a" in sig["bleu"]
    assert "chrF" not in sig["bleu"] and set(sig) == {"bleu", "chrf", "ter"}
    # Per source, the model's bits per byte beside the unigram's, as for the split.
    ev = json.loads((trained / "metrics/eval.json").read_text())
    for source in ev["test"]["sources"].values():
        assert source["bits_per_byte_vs_unigram"] == pytest.approx(
            source["bits_per_byte"] / source["unigram_bits_per_byte"], abs=1e-3
        )


def test_evaluate_writes_generation_statistics_samples_and_report(trained):
    g = json.loads((trained / "metrics/eval.json").read_text())["generation"]
    assert g["model"]["texts"] == 3 * 2 and g["held_out_text"]["texts"] == 6
    for k in ("distinct_1", "distinct_2", "repeated_4gram_fraction"):
        assert 0 <= g["model"][k] <= 1 and 0 <= g["held_out_text"][k] <= 1
    samples = (trained / "metrics/samples.md").read_text()
    assert "## ROMEO:" in samples and "pairs:\n\n| source | reference | greedy | beam |" in samples
    report = (trained / "metrics/report.md").read_text()
    for section in ("# Evaluation report", "## Model", "## Data", "## Metrics", "## Loss", "## Samples"):
        assert section in report, section
    assert "sonnets" in report and "bits per byte" in report and "| greedy |" in report
    assert "Translation, pairs (into ru): 20 test pairs" in report and "| decoding | chrF | BLEU | TER |" in report
    assert (trained / "metrics/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_command_streams_the_seeded_continuation(trained, trained_model, capsys):
    """The command prints the prompt, then what the library generates from it, token by token."""
    tok, model = trained_model
    args = ("Shall I compare", "--max-new-tokens", "20", "--seed", "3")
    out = run_stage("generate", trained, *args)
    prompt = [tok.eos_id, *tok.encode(["Shall I compare"])[0]]
    sampled = Decoding(max_new_tokens=20, **{**Evaluate().sampling(), "seed": 3})  # the command's defaults: evaluate's
    (new,) = generate(model, [prompt], tok.eos_id, sampled)
    assert len(new) > 0
    assert out.stdout == "Shall I compare" + tok.decode(new) + "\n"
    call_stage("generate", trained, *args)  # seeded sampling is reproducible, in any process
    assert capsys.readouterr().out == out.stdout


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_translates_a_pair_prompt(trained, trained_model, capsys, beam_size):
    """--translate renders `<src> <2ru> text <tgt>` (the model's one target language) and decodes the
    target greedily (or by beam search)."""
    tok, model = trained_model
    call_stage(
        "generate", trained, "--translate", "Jesus wept.", "--max-new-tokens", "20", "--beam-size", str(beam_size)
    )
    prompt = tok.pair_prompt(tok.encode(["Jesus wept."])[0], "ru")
    assert prompt == [tok.eos_id, tok.src_id, tok.languages["ru"], *tok.encode(["Jesus wept."])[0], tok.tgt_id]
    (new,) = generate(model, [prompt], tok.eos_id, Decoding(max_new_tokens=20, beam_size=beam_size))
    assert len(new) > 0
    assert capsys.readouterr().out == tok.decode(new) + "\n"  # the translation alone, not the source


def test_generate_rejects_bad_input(trained, tmp_path):
    # As a command: exit status 1, one line on stderr, no traceback.
    proc = run_stage("generate", trained, "", check=False)
    assert proc.returncode == 1
    assert_clean_error(proc, "prompt")
    stage_error("generate", trained, "temperature", args=("x", "--temperature", "-1"))
    stage_error("generate", trained, "nope.pt", args=("x", "--checkpoint", "nope.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes((trained / "data/model/best.safetensors").read_bytes()[:1000])
    stage_error("generate", trained, "broken.pt", args=("x", "--checkpoint", str(broken)))


def test_batched_greedy_decoding_equals_one_at_a_time(trained_model):
    tok, model = trained_model
    texts = ["Shall I compare", "Rough winds", "And summer's lease", "Thou art", "Jesus wept.", "So long"]
    prompts = [[tok.eos_id, *ids] for ids in tok.encode(texts)]
    greedy = Decoding(max_new_tokens=20)
    batched = generate(model, prompts, tok.eos_id, greedy, batch_size=4)
    single = [generate(model, [p], tok.eos_id, greedy)[0] for p in prompts]
    assert batched == single
    assert any(len(b) > 0 for b in batched)
    # Past the context (64): generation goes on by re-encoding the last half context.
    long = generate(model, [prompts[0]], -1, Decoding(max_new_tokens=150, temperature=1.0, seed=1))[0]
    assert len(long) == 150
    assert np.all(np.asarray(long) < tok.vocab_size)


@pytest.fixture(scope="module")
def model_and_prompts(trained_model):
    tok, model = trained_model
    prompts = [tok.pair_prompt(ids) for ids in tok.encode(["Jesus wept.", "And God said, Let there be light."])]
    return model, tok, prompts


def test_beam_search_of_one_is_greedy_and_batches_exactly(model_and_prompts):
    from pipeline.decoding.decode import beam_search

    model, tok, prompts = model_and_prompts
    greedy = generate(model, prompts, tok.eos_id, Decoding(max_new_tokens=30))
    for p, g in zip(prompts, greedy):
        assert beam_search(model, [p], tok.eos_id, Decoding(max_new_tokens=30, beam_size=1), [1.0])[1.0] == [g]
    beam = Decoding(max_new_tokens=30, beam_size=3)
    together = generate(model, prompts + prompts, tok.eos_id, beam, batch_size=4)
    assert together[:2] == [generate(model, [p], tok.eos_id, beam)[0] for p in prompts]
    assert together[:2] == together[2:]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model_and_prompts):
    """Beam search (ranked by log-probability alone) ends with a translation at least as likely as
    greedy's output (a finished one with its </s>; one that runs to the token limit unfinished,
    whose probability bounds that of any way to finish it)."""
    model, tok, prompts = model_and_prompts
    limit = 40

    def logprob(prompt, new):
        finished = len(new) < limit  # generate() drops the eos that ended it
        seq = torch.tensor([prompt + new + ([tok.eos_id] if finished else [])])
        logits, _ = model(seq[:, :-1])
        logp = torch.log_softmax(logits[0, len(prompt) - 1 :], dim=-1)
        return logp.gather(1, seq[0, len(prompt) :, None]).sum().item()

    for p in prompts:
        g = generate(model, [p], tok.eos_id, Decoding(max_new_tokens=limit))[0]
        b = generate(model, [p], tok.eos_id, Decoding(max_new_tokens=limit, beam_size=4, length_penalty=0.0))[0]
        assert len(b) > 0, p
        assert logprob(p, b) >= logprob(p, g) - 1e-4, (tok.decode(b), tok.decode(g))


def test_sampling_filters(model_and_prompts):
    model, tok, prompts = model_and_prompts
    greedy = generate(model, prompts, tok.eos_id, Decoding(max_new_tokens=20))
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    assert generate(model, prompts, tok.eos_id, Decoding(max_new_tokens=20, temperature=1.0, top_p=1e-6)) == greedy
    assert generate(model, prompts, tok.eos_id, Decoding(max_new_tokens=20, temperature=1.0, top_k=1)) == greedy
    # A huge repetition penalty: no token of the prompt or of the output comes back.
    out = generate(model, prompts, -1, Decoding(max_new_tokens=30, repetition_penalty=1e9))
    for p, o in zip(prompts, out):
        assert len(set(o)) == len(o) and not set(o) & set(p)
    with pytest.raises(Exception, match="top_p"):
        generate(model, prompts, tok.eos_id, Decoding(top_p=0.0))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_repetition_controls_hold_in_greedy_and_beam_search(model_and_prompts, beam_size):
    model, tok, prompts = model_and_prompts
    plain = generate(model, prompts, -1, Decoding(max_new_tokens=40, beam_size=beam_size))
    assert any(len(set(zip(o, o[1:]))) < len(o) - 1 for o in plain)  # it repeats itself, unchecked
    for n in (2, 3):
        for o in generate(model, prompts, -1, Decoding(max_new_tokens=40, beam_size=beam_size, no_repeat_ngram=n)):
            grams = [tuple(o[i : i + n]) for i in range(len(o) - n + 1)]
            assert len(o) == 40 and len(set(grams)) == len(grams)
    out = generate(model, prompts, -1, Decoding(max_new_tokens=30, beam_size=beam_size, repetition_penalty=1e9))
    for p, o in zip(prompts, out):
        assert len(set(o)) == len(o) and not set(o) & set(p)
    with pytest.raises(PipelineError, match="no_repeat_ngram: must be 0 .off. or >= 2, got 1"):
        generate(model, prompts, -1, Decoding(no_repeat_ngram=1))


def test_text_statistics_on_known_text():
    from pipeline.evaluation.scoring import text_statistics

    s = text_statistics(["a b a b a b", "c d e f"])
    assert s["distinct_1"] == pytest.approx(6 / 10)  # a b c d e f over 10 words
    assert s["distinct_2"] == pytest.approx(5 / 8)  # ab ba (x2 each... ) cd de ef
    assert s["repeated_4gram_fraction"] == pytest.approx(1 / 4)  # abab, baba, abab | cdef
    assert s["mean_words"] == 5.0 and s["texts"] == 2


def test_text_statistics_count_characters_in_scripts_without_spaces():
    from pipeline.evaluation.scoring import text_statistics, units

    assert units("Blessed are   the meek.") == "Blessed are   the meek.".split()
    assert units("Резервное копирование данных") == ["Резервное", "копирование", "данных"]
    assert units("资源类型 (Resource Types)") == ["资", "源", "类", "型", "(Resource", "Types)"]
    s = text_statistics(["在起初神创造天地", "地是空虚混沌"])
    assert s["mean_words"] == 7.0  # characters, not the one "word" per line that spaces give
    assert s["distinct_1"] == pytest.approx(13 / 14, abs=1e-4)  # 地 twice


def test_bleu_tokenizer_follows_the_script_of_the_references():
    from pipeline.evaluation.scoring import bleu_tokenizer, corpus_scores

    assert bleu_tokenizer(["В начале сотворил Бог небо и землю."]) == "13a"
    assert bleu_tokenizer(["In the beginning God created the heaven and the earth."]) == "13a"
    assert bleu_tokenizer(["起初，神创造天地。", "资源类型"]) == "zh"
    assert bleu_tokenizer(["สวัสดีครับ"]) == "char"  # Thai: no spaces, no sacrebleu tokenizer of its own
    assert bleu_tokenizer(["はじめに神は天と地とを創造された。"]) in ("ja-mecab", "char")
    # Copying an English source against Chinese references: 13a sees each Chinese sentence as one
    # word, so a hypothesis sharing a few characters scores nothing, while zh scores the characters.
    refs = ["起初神创造天地", "地是空虚混沌"]
    hyps = ["起初神创造", "地是空虚"]
    zh, sig = corpus_scores(hyps, refs, 0, tokenize="zh")
    plain, _ = corpus_scores(hyps, refs, 0)
    assert zh["bleu"] > 30 and plain["bleu"] == 0.0
    assert "tok:zh" in sig["bleu"] and "asian_support" not in sig["bleu"]


def test_bootstrap_interval_agrees_with_sacrebleus_own():
    import random

    import sacrebleu

    from pipeline.evaluation.scoring import corpus_scores

    rnd = random.Random(0)
    words = "the king and queen of a land far away lived in peace for many years".split()
    refs = [" ".join(rnd.choices(words, k=12)) for _ in range(300)]
    hyps = [" ".join(w if rnd.random() < 0.6 else rnd.choice(words) for w in r.split()) for r in refs]
    ours, sig = corpus_scores(hyps, refs, 1000)
    theirs = sacrebleu.BLEU().corpus_score(hyps, [refs], n_bootstrap=1000)
    assert ours["bleu"] == pytest.approx(theirs.score, abs=0.01)
    assert ours["bleu_ci95"] == pytest.approx(theirs._ci, rel=0.2)
    assert ours["bleu_ci95"] > 0.5 and sig["bleu"].startswith("nrefs:1|")


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context(trained, trained_model, capsys):
    tok, model = trained_model
    long_prompt = " ".join(["Shall I compare thee to a summer's day?"] * 40)  # far more than 64 tokens
    call_stage("generate", trained, long_prompt, "--max-new-tokens", "5", "--temperature", "0")
    out, err = capsys.readouterr()
    prompt = [tok.eos_id, *tok.encode([long_prompt])[0]]
    assert len(prompt) > 64
    assert err == f"note: the prompt has {len(prompt)} tokens, more than the context of 64; using its last 63\n"
    # What follows the prompt is generated from its last 63 tokens.
    (new,) = generate(model, [prompt[-63:]], tok.eos_id, Decoding(max_new_tokens=5))
    assert out == long_prompt + tok.decode(new) + "\n"


def test_generate_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(trained, tmp_path):
    other = copy_project(trained, tmp_path / "other")
    other_tokenizer = str(other / "data/tokens/tokenizer.model")
    set_params(other, tokenize={"vocab_size": 400})
    call_stage("tokenize", other)
    stage_error("generate", trained, "vocabulary of 512", "400", args=("x", "--tokenizer", other_tokenizer))
    # Same size, different pieces: caught by the tokenizer's digest.
    set_params(other, tokenize={"vocab_size": 512, "max_sentence_chars": 40})
    call_stage("tokenize", other)
    assert Tokenizer(other_tokenizer).vocab_size == 512
    stage_error("generate", trained, "sha256", args=("x", "--tokenizer", other_tokenizer))
