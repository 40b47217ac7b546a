"""params.yaml: the repository's file and presets validate; bad params are one clean line naming the key.

Every stage validates the whole file before touching anything, so a bad value anywhere stops the
stage with `error: params.yaml: <key>: ...` and leaves earlier outputs exactly as they were.
"""
from __future__ import annotations

import copy
import re
import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_clean_error, make_corpus, run_stage, snapshot, tiny_params, write_params
from pipeline import params as P
from pipeline.common import PipelineError

PRESETS = sorted((REPO / "params").glob("*.yaml"))


def set_key(data: dict, dotted: str, value) -> dict:
    """A deep copy of `data` with `dotted` (e.g. "model.n_layr", "collect.sources.0.limit") set."""
    data = copy.deepcopy(data)
    node = data
    *path, last = dotted.split(".")
    for k in path:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    """A folder holding a copy of the repository's params.yaml (for `pipeline.params apply`)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


# --- the repository's own params ------------------------------------------------------------------

def test_repository_params_yaml_validates():
    p = P.load(REPO / "params.yaml")
    assert [s.name for s in p.collect.sources] == ["shakespeare", "bible_en_ru"]
    assert isinstance(p.train.lr, float) and 0 < p.train.min_lr <= p.train.lr  # "3.0e-3" read as a number
    proc = run_stage("params", REPO, "check", str(REPO / "params.yaml"))
    assert proc.stdout == "" and proc.stderr == ""


def test_repository_params_yaml_spells_out_every_group_key():
    data = P.read_yaml(REPO / "params.yaml")
    groups = {f.name: f.default_factory for f in dataclasses.fields(P.Params)}
    assert set(data) == set(groups)
    for name, factory in groups.items():
        keys = {f.name for f in dataclasses.fields(factory())}
        assert set(data[name]) == keys, name


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_applies_to_params_yaml_and_validates(params_copy, preset):
    run_stage("params", params_copy, "apply", str(preset))
    applied = P.read_yaml(params_copy / "params.yaml")
    expected = P.merge(P.read_yaml(REPO / "params.yaml"), P.read_yaml(preset))
    assert applied == expected
    P.load(params_copy / "params.yaml")
    # and the overlay really changed something
    assert applied != P.read_yaml(REPO / "params.yaml")


def test_presets_combine_with_merge_and_parse():
    base = P.read_yaml(REPO / "params.yaml")
    data = base
    for preset in PRESETS:
        data = P.merge(data, P.read_yaml(preset))
    p = P.parse(data)
    tiny = P.read_yaml(REPO / "params" / "tiny.yaml")
    lstm = P.read_yaml(REPO / "params" / "lstm.yaml")
    assert p.model.arch == lstm["model"]["arch"]
    assert p.tokenize.vocab_size == tiny["tokenize"]["vocab_size"]
    # keys no preset touches keep params.yaml's values
    assert p.clean.split_salt == base["clean"]["split_salt"]
    assert len(p.collect.sources) == len(base["collect"]["sources"])


# --- bad params: one clean line naming the key, from any stage -------------------------------------

@pytest.fixture(scope="module")
def good_params(tmp_path_factory) -> tuple[Path, dict]:
    corpus = tmp_path_factory.mktemp("params_corpus")
    return corpus, tiny_params(make_corpus(corpus, n_docs=20, n_pairs=30))


BAD = [
    # (dotted key to set, value, strings the error line must contain)
    ("modle", {"n_layer": 2}, ["modle", "unknown key"]),
    ("model.n_layr", 3, ["model.n_layr", "unknown key"]),
    ("collect.sources.0.limit", 0, ["collect.sources[0].limit", "unknown key"]),
    ("train.max_steps", "many", ["train.max_steps", "many"]),
    ("model.bias", 3, ["model.bias"]),
    ("model.n_layer", 2.5, ["model.n_layer"]),
    ("tokenize.vocab_size", True, ["tokenize.vocab_size"]),
    ("train.lr", "fast", ["train.lr"]),
    ("model", 3, ["model"]),
    ("model.n_embd", 65, ["model.n_embd", "model.n_head"]),
    ("train.max_steps", 0, ["train.max_steps"]),
    ("model.arch", "transformer", ["model.arch", "transformer"]),
    ("clean.normalization", "NFD", ["clean.normalization", "NFD"]),
    ("collect.sources.0.kind", "http", ["collect.sources[0].kind", "http"]),
]


@pytest.mark.parametrize("key,value,needles", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_params_are_a_clean_error_naming_the_key(tmp_path, good_params, key, value, needles):
    _, data = good_params
    write_params(tmp_path, set_key(data, key, value))
    proc = run_stage("collect", tmp_path, check=False)
    assert_clean_error(proc, "params.yaml", *needles)
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "metrics").exists()


def test_bad_params_are_caught_by_parse_too(good_params):
    _, data = good_params
    P.parse(data)  # the good params parse
    for key, value, needles in BAD:
        with pytest.raises(PipelineError) as e:
            P.parse(set_key(data, key, value))
        for n in needles:
            assert n in str(e.value), (key, str(e.value))


def test_invalid_yaml_is_a_clean_error_with_its_line(tmp_path):
    (tmp_path / "params.yaml").write_text("collect:\n  sources: [\n", encoding="utf-8")
    proc = run_stage("collect", tmp_path, check=False)
    assert_clean_error(proc, "params.yaml", "not valid YAML", "line")


def test_missing_params_file_is_a_clean_error(tmp_path):
    proc = run_stage("collect", tmp_path, check=False)
    assert_clean_error(proc, "params.yaml")


@pytest.mark.parametrize("key,value,needle", [
    ("model.n_layr", 3, "model.n_layr"),
    ("train.max_steps", 0, "train.max_steps"),
])
def test_bad_params_leave_earlier_outputs_untouched(tmp_path, good_params, key, value, needle):
    _, data = good_params
    write_params(tmp_path, data)
    run_stage("collect", tmp_path)
    before = snapshot(tmp_path, "data", "metrics")
    assert "data/raw/manifest.json" in before and "metrics/collect.json" in before
    write_params(tmp_path, set_key(data, key, value))
    proc = run_stage("collect", tmp_path, check=False)
    assert_clean_error(proc, needle)
    assert snapshot(tmp_path, "data", "metrics") == before


def test_every_stage_validates_the_whole_file(tmp_path, prepared):
    """A bad key in a group a stage does not read still stops it, before it writes anything."""
    folder = tmp_path / "p"
    shutil.copytree(prepared, folder)
    before = snapshot(folder, "data", "metrics")
    data = P.read_yaml(folder / "params.yaml")
    write_params(folder, set_key(data, "evaluate.top_kk", 5))
    for stage in ("collect", "clean", "tokenize"):
        proc = run_stage(stage, folder, check=False)
        assert_clean_error(proc, "evaluate.top_kk")
    assert snapshot(folder, "data", "metrics") == before


# --- float spellings ----------------------------------------------------------------------------

def test_exponent_without_dot_is_accepted_for_float_keys(tmp_path, good_params):
    corpus, data = good_params
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    text = re.sub(r"(?m)^  lr: .*$", "  lr: 1e-3", text, count=1)
    assert "lr: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    # PyYAML (YAML 1.1) reads 1e-3 as a string: the schema must convert it
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"
    p = P.load(tmp_path / "params.yaml")
    assert isinstance(p.train.lr, float) and p.train.lr == 1e-3
    run_stage("collect", tmp_path)  # and a stage accepts the file


def test_quoted_float_string_is_accepted_but_int_keys_stay_strict(good_params):
    _, data = good_params
    p = P.parse(set_key(data, "model.dropout", "1e-1"))
    assert p.model.dropout == pytest.approx(0.1)
    p = P.parse(set_key(data, "train.beta2", 1))  # an int where a float is expected
    assert p.train.beta2 == 1.0 and isinstance(p.train.beta2, float)
    with pytest.raises(PipelineError, match=r"train\.max_steps"):
        P.parse(set_key(data, "train.max_steps", "1e3"))


# --- python -m pipeline.params apply -------------------------------------------------------------

def test_apply_overlays_nested_keys_only(params_copy):
    (params_copy / "over.yaml").write_text("model:\n  n_layer: 3\ntrain:\n  lr: 5.0e-4\n", encoding="utf-8")
    base = P.read_yaml(params_copy / "params.yaml")
    proc = run_stage("params", params_copy, "apply", "over.yaml")
    assert "over.yaml" in proc.stdout
    after = P.read_yaml(params_copy / "params.yaml")
    assert after["model"]["n_layer"] == 3
    assert after["train"]["lr"] == 5.0e-4
    # every other key, in the touched groups too, is unchanged
    assert {k: v for k, v in after["model"].items() if k != "n_layer"} == \
           {k: v for k, v in base["model"].items() if k != "n_layer"}
    assert {k: v for k, v in after["train"].items() if k != "lr"} == \
           {k: v for k, v in base["train"].items() if k != "lr"}
    for group in ("collect", "clean", "tokenize", "evaluate"):
        assert after[group] == base[group], group
    P.load(params_copy / "params.yaml")


def test_apply_several_presets_in_order(params_copy):
    (params_copy / "a.yaml").write_text("model:\n  n_layer: 3\n  n_head: 8\n", encoding="utf-8")
    (params_copy / "b.yaml").write_text("model:\n  n_layer: 5\n", encoding="utf-8")
    run_stage("params", params_copy, "apply", "a.yaml", "b.yaml")
    p = P.load(params_copy / "params.yaml")
    assert (p.model.n_layer, p.model.n_head) == (5, 8)


@pytest.mark.parametrize("overlay,needle", [
    ("model:\n  n_head: 5\n", "model.n_embd"),
    ("model:\n  n_layr: 3\n", "model.n_layr"),
    ("train:\n  max_steps: 0\n", "train.max_steps"),
    ("model:\n  arch: transformer\n", "model.arch"),
])
def test_apply_refuses_an_overlay_that_makes_params_invalid(params_copy, overlay, needle):
    (params_copy / "bad.yaml").write_text(overlay, encoding="utf-8")
    before = (params_copy / "params.yaml").read_bytes()
    proc = run_stage("params", params_copy, "apply", "bad.yaml", check=False)
    assert_clean_error(proc, needle, "bad.yaml")
    assert (params_copy / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in params_copy.iterdir()) == ["bad.yaml", "params.yaml"]  # no temp file left


def test_apply_of_a_missing_preset_is_a_clean_error(params_copy):
    before = (params_copy / "params.yaml").read_bytes()
    proc = run_stage("params", params_copy, "apply", "nope.yaml", check=False)
    assert_clean_error(proc, "nope.yaml")
    assert (params_copy / "params.yaml").read_bytes() == before


def test_apply_of_a_group_with_every_key_commented_out_changes_nothing(params_copy):
    """`train:` with all its keys commented out is YAML null: it must not reset the group."""
    (params_copy / "over.yaml").write_text("train:\n  # max_steps: 10\n", encoding="utf-8")
    before = P.load(params_copy / "params.yaml")
    proc = run_stage("params", params_copy, "apply", "over.yaml", check=False)
    if proc.returncode == 0:
        assert P.load(params_copy / "params.yaml") == before
    else:
        assert_clean_error(proc, "train")
        assert P.load(params_copy / "params.yaml") == before


def test_code_defaults_agree_with_params_yaml():
    """No hidden defaults: a key left out of a params file means what params.yaml says."""
    from pipeline.params import Params, as_dict, load

    spelled = as_dict(load(REPO / "params.yaml"))
    defaults = as_dict(Params())
    spelled["collect"]["sources"] = defaults["collect"]["sources"] = []
    assert spelled == defaults
