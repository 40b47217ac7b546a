"""clean on a Ray cluster (data_run.executor: ray), against the local pool's output.

A real cluster on this machine: the session's `ray_cluster` (a head and a worker node, one CPU
each, `ray start --block` processes stopped by their ids), or a Ray the stage starts for itself
(data_run.address ""). The stage runs as a process of its own, as a user runs it. Its outputs are
byte-identical to the local run's with 1 or 2 CPUs and with the 2-node cluster; a worker node
killed in the middle leaves them identical (its tasks run again on the head); a head stopped in the
middle, an address nothing answers, a task that raises, a worker out of memory and a missing Ray
each end the stage with one line, a non-zero exit and earlier outputs intact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    RayCluster,
    assert_clean_error,
    clean_project,
    filler_docs,
    filler_pairs,
    run_stage,
    set_params,
    snapshot,
)

pytest.importorskip("ray", reason="the [cluster] extra is not installed")
pytestmark = pytest.mark.cluster

OUTPUTS = ("data/clean", "metrics/clean.json", "metrics/clean_report.md")
RUSSIAN = "Москва — столица России, крупнейший город страны и её политический и культурный центр."
CHINESE = "北京是中华人民共和国的首都，是全国的政治中心和文化中心。"


def working(node: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until a Ray worker process of this node runs (its process group holds a "ray::" process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-eo", "pgid,args"], capture_output=True, text=True).stdout.splitlines()
        if any(
            line.split(None, 1)[0] == str(node.pid) and " ray::" in f" {line.split(None, 1)[1]}" for line in out[1:]
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no Ray worker started on node {node.args}")


def start_clean(project: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.clean"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def raylets() -> set[int]:
    """The ids of this machine's raylet processes (one per Ray node)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return {int(line.split()[0]) for line in out if "raylet/raylet" in line}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A collected project of documents in three scripts and pairs, cleaned on 2 local workers in
    shards of 20 KB (about 30 of them) with near-duplicates and decontamination on: the reference."""
    folder = tmp_path_factory.mktemp("cluster") / "project"
    docs = filler_docs(2500) + [{"text": f"{RUSSIAN} {i}"} for i in range(300)]
    docs += [{"text": f"{CHINESE}{i}"} for i in range(300)]
    clean_project(folder, docs=docs, pairs=filler_pairs(1500), near_dup=True, decontaminate_ngram=8)
    set_params(folder, clean_run={"workers": 2, "shard_bytes": 20_000})
    run_stage("clean", folder)
    return folder


def on_ray(project: Path, **data_run) -> subprocess.CompletedProcess:
    set_params(project, data_run={"executor": "ray", "address": "", **data_run})
    return run_stage("clean", project, check=False)


def test_the_same_bytes_on_one_cpu_two_cpus_and_a_two_node_cluster(corpus, ray_cluster):
    local = snapshot(corpus, *OUTPUTS)
    before = raylets()
    for workers, address in ((1, ""), (2, ""), (0, ray_cluster.address)):
        set_params(corpus, clean_run={"workers": workers})
        proc = on_ray(corpus, address=address)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", proc.stderr
        assert snapshot(corpus, *OUTPUTS) == local, (workers, address)
    assert raylets() <= before  # the Rays the stage started for itself are gone


def test_a_worker_node_killed_in_the_middle_changes_nothing(corpus, ray_cluster):
    """The worker node is killed while clean's tasks run on it: they run again on the head."""
    local = snapshot(corpus, *OUTPUTS)
    set_params(
        corpus,
        clean_run={"workers": 0, "shard_bytes": 3_000},  # over a hundred tasks
        data_run={"executor": "ray", "address": ray_cluster.address},
    )
    worker = ray_cluster.nodes[-1]
    stage = start_clean(corpus)
    try:
        working(worker)
        assert stage.poll() is None, "clean ended before the node was killed: give it more to do"
        ray_cluster.kill(worker)
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        ray_cluster.start()  # the session's cluster has its worker node again
        ray_cluster.wait_for(2)
    assert stage.returncode == 0, err
    assert snapshot(corpus, *OUTPUTS) == local


def test_a_head_stopped_in_the_middle_is_one_line_and_loses_nothing(corpus, tmp_path):
    earlier = snapshot(corpus, *OUTPUTS)
    cluster = RayCluster(tmp_path)
    try:
        head = cluster.start(head=True)
        cluster.wait_for(1)
        set_params(
            corpus,
            clean_run={"workers": 0, "shard_bytes": 3_000},
            data_run={"executor": "ray", "address": cluster.address},
        )
        stage = start_clean(corpus)
        working(head)
        assert stage.poll() is None, "clean ended before the head was killed: give it more to do"
        cluster.kill(head)
        out, err = stage.communicate(timeout=120)
    finally:
        cluster.close()
    assert_clean_error(subprocess.CompletedProcess([], stage.returncode, out, err), cluster.address)
    assert snapshot(corpus, *OUTPUTS) == earlier


def test_an_address_nothing_answers_is_one_line(corpus):
    earlier = snapshot(corpus, *OUTPUTS)
    with __import__("socket").socket() as s:  # a port of this machine that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = on_ray(corpus, address=f"127.0.0.1:{port}", connect_timeout_s=5)
    assert_clean_error(proc, f"127.0.0.1:{port}", "nothing answers")
    assert snapshot(corpus, *OUTPUTS) == earlier


def test_a_task_that_raises_names_the_file_and_line(tmp_path):
    project = clean_project(tmp_path, docs=filler_docs(400), pairs=filler_pairs(200))
    set_params(project, clean_run={"workers": 1, "shard_bytes": 5_000})
    run_stage("clean", project)
    earlier = snapshot(project, *OUTPUTS)
    before = raylets()
    raw = project / "data/raw/docs.jsonl"
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[250] = "{not json\n"
    raw.write_text("".join(lines), encoding="utf-8")
    proc = on_ray(project)
    assert_clean_error(proc, "docs.jsonl:251")
    assert snapshot(project, *OUTPUTS) == earlier
    assert raylets() <= before


def test_a_worker_out_of_memory_is_one_line(tmp_path):
    """Ray's memory monitor, told that any use is too much, kills the task's worker: one line."""
    project = clean_project(tmp_path, docs=filler_docs(200))
    set_params(project, clean_run={"workers": 1}, data_run={"executor": "ray", "address": ""})
    before = raylets()
    env = {"RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "50", "RAY_task_oom_retries": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.clean"],
        cwd=project,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean_error(proc, "out of memory")
    assert not (project / "data/clean").exists()
    assert raylets() <= before


def test_without_ray_installed_the_extra_is_named(corpus, tmp_path):
    earlier = snapshot(corpus, *OUTPUTS)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "ray.py").write_text('raise ImportError("no module named ray")\n')
    set_params(corpus, data_run={"executor": "ray", "address": ""})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.clean"],
        cwd=corpus,
        env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_error(proc, "data_run.executor", ".[cluster]")
    assert snapshot(corpus, *OUTPUTS) == earlier


def test_the_local_default_imports_nothing_of_ray():
    code = "import sys, pipeline.clean, pipeline.collect, pipeline.tokenize; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"
