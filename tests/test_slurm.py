"""The whole pipeline under a real Slurm: scripts/slurm/pipeline.sbatch, submitted with `sbatch --wait`
to a one-node cluster this module starts, writes what a local `dvc repro` writes, byte for byte.

The cluster: munged (as the munge user; the machine's own where one already answers), then
slurmctld and slurmd in the foreground (-D), children of this process with their state, spool and
logs in a temporary folder and a slurm.conf whose node is `slurmd -C`'s; every daemon started here
is stopped by its process id at the end. It needs root and Debian's slurm-wlm and munge (.ci/run
installs them): without them the tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, repository_copy, sh, snapshot, text_source, tiny_params, write_params

# A Slurm cluster, a Ray cluster and torchrun: CI runs them (once: `cluster`, Makefile)
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SCRIPT = "scripts/slurm/pipeline.sbatch"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
DAEMONS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "sinfo", "srun", "scontrol", "scancel")
OUTPUTS = ("data/raw", "data/clean", "data/tokens", "data/model", "data/tasks", "metrics")
# Wall-clock figures: never the same twice (metrics/timing, the curves of speed, dvclive's summary of them)
TIMING_FILES = {
    "metrics/timing/train.json",
    "metrics/timing/evaluate.json",
    "metrics/train/plots/metrics/tokens_per_second.tsv",
    "metrics/train/plots/metrics/mfu.tsv",
}
TIMING_KEYS = {"tokens_per_second", "train_seconds", "mfu"}


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def why_not() -> str | None:
    """Why this machine cannot run a Slurm of its own, or None."""
    if os.geteuid() != 0:
        return "needs root: it starts munged (as the munge user), slurmctld and slurmd"
    missing = [name for name in DAEMONS if which(name) is None]
    if missing:
        return f"Debian's slurm-wlm and munge are not installed (no {', '.join(missing)}; .ci/run installs them)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (Debian's munge package makes it)"
    return None


def free_port() -> int:
    """A port nothing listens on (from the ephemeral range: clear of Ray's worker ports, 10002-19999)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def munge_answers() -> bool:
    """Whether a munged answers at the default socket: a credential made and read back."""
    made = subprocess.run([which("munge"), "-n"], capture_output=True, timeout=10)
    if made.returncode != 0:
        return False
    read = subprocess.run([which("unmunge")], input=made.stdout, capture_output=True, timeout=10)
    return read.returncode == 0


class Slurm:
    """A one-node Slurm on this machine: its daemons are children of this process."""

    def __init__(self, root: Path):
        self.root = root
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.conf = root / "slurm.conf"
        self.jobs: list[str] = []  # job names submitted, cancelled at the end if still there
        # the node as slurmd sees it: NodeName=... CPUs=... RealMemory=...
        self.node = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        self.node = self.node.splitlines()[0]
        self.name = re.search(r"NodeName=(\S+)", self.node).group(1)
        self.cpus = int(re.search(r"CPUs=(\d+)", self.node).group(1))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self.start_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=lmpipe-test",
                    f"SlurmctldHost={self.name}",
                    "SlurmUser=root",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    # sbatch --wait polls every 2 s where MinJobAge is under 4 (else 2, 8, then every 32 s:
                    # up to half a minute late); 0 also keeps every job's record, so none is missed
                    "MinJobAge=0",
                    f"{self.node} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.daemon("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        self.daemon("slurmd", [which("slurmd"), "-D", "-f", str(self.conf)])
        self.wait(lambda: self.node_state() == "idle", "sinfo never showed the node idle")

    def start_munge(self) -> None:
        """The machine's munged where one answers (left alone), else one started here as the munge
        user, with Debian's paths: the key in /etc/munge (made if missing), the socket in /run/munge."""
        if munge_answers():
            return
        user = pwd.getpwnam("munge")
        for folder, mode in (
            ("/etc/munge", 0o700),
            ("/run/munge", 0o755),
            ("/var/lib/munge", 0o711),
            ("/var/log/munge", 0o700),
        ):
            path = Path(folder)
            if not path.is_dir():
                path.mkdir(mode=mode, parents=True)
                os.chown(path, user.pw_uid, user.pw_gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            if which("mungekey"):
                subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
            else:
                key.write_bytes(os.urandom(1024))
            os.chown(key, user.pw_uid, user.pw_gid)
            key.chmod(0o600)
        self.daemon("munged", [which("munged"), "--foreground"], user="munge", group="munge", extra_groups=[])
        self.wait(munge_answers, "munged never answered")

    def daemon(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, **kw)
        log.close()
        self.daemons.append((name, proc))

    def wait(self, ready, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} in {timeout:g} s: {' | '.join(self.log(n) for n, _ in self.daemons)}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")[-2000:]

    def node_state(self) -> str:
        out = subprocess.run([which("sinfo"), "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return out.stdout.strip()

    def submit(self, folder: Path, *options: str, env: dict, timeout: float = 600) -> tuple[int, str]:
        """`sbatch --wait` the pipeline's script from `folder`; returns its exit status and its output."""
        name = f"lmpipe-test-{len(self.jobs)}"
        self.jobs.append(name)
        cmd = [which("sbatch"), "--parsable", "--wait", f"--job-name={name}", *options, SCRIPT]
        try:
            proc = subprocess.run(
                cmd, cwd=folder, env={**env, **self.env}, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            self.cancel(name)
            raise
        job = proc.stdout.split(";")[0].strip()
        assert job.isdigit(), proc.stdout + proc.stderr
        return proc.returncode, (folder / f"slurm-{job}.out").read_text()

    def cancel(self, name: str) -> None:
        subprocess.run([which("scancel"), f"--name={name}"], env=self.env, capture_output=True, timeout=30)

    def stop(self) -> None:
        if any(proc.poll() is None for name, proc in self.daemons if name == "slurmctld"):
            for name in self.jobs:
                self.cancel(name)
        for _, proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def job_env(tmp_path):
    """The environment a job gets (sbatch passes it on): this Python's tools first on PATH, Ray and
    torchrun on free ports, Ray's session files in a folder of the test's (short: Ray's sockets live there)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        RAY_PORT=str(free_port()),
        RDZV_PORT=str(free_port()),
        RAY_TMPDIR=str(ray_tmp),
    )
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def ray_left(port: str) -> list[str]:
    """The processes still running of the Ray cluster on this port (its GCS, raylet, `ray start`)."""
    ours = re.compile(rf"[:=]{port}\b")  # --port=P, --gcs_server_port=P, --address=HOST:P
    left = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmdline and ours.search(cmdline):
            left.append(f"{proc.name}: {cmdline[:200]}")
    return left


def drivers(ray_tmp: str) -> list[Path]:
    """The Ray drivers that joined a cluster whose session files are under `ray_tmp` (one log each)."""
    return sorted(Path(ray_tmp).glob("ray/session_*/logs/python-core-driver-*.log"))


def comparable(root: Path) -> dict[str, bytes]:
    """Every output of the pipeline but its wall-clock figures."""
    files = snapshot(root, *OUTPUTS)
    for name in TIMING_FILES:
        files.pop(name, None)
    summary = json.loads(files.pop("metrics/train/metrics.json"))  # dvclive's last values
    files["metrics/train/metrics.json"] = json.dumps({k: v for k, v in summary.items() if k not in TIMING_KEYS})
    report = files.pop("metrics/report.md").decode()  # "... tokens, 1.6 s on cpu at 39% MFU)"
    files["metrics/report.md"] = re.sub(r"[\d.]+ s on (\w+)( at \d+% MFU)?", r"_ s on \1", report).encode()
    return files


def lock_outs(root: Path) -> dict[str, dict]:
    """dvc.lock's record of each output but the wall-clock ones: path -> hash."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {
        out["path"]: out.get("md5")
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] not in TIMING_FILES | {"metrics/train", "metrics/report.md"}  # these two hold timings
    }


@pytest.mark.network  # the tiny preset's default sources, from PyPI
def test_the_pipeline_under_slurm_writes_what_a_local_repro_writes(slurm, reproduced, tmp_path, job_env):
    """The same project as conftest's local `dvc repro` (its code, tiny params), its outputs gone,
    through the job: Ray for the data stages, torchrun for train, then evaluate. torchrun with one
    process is a world of one (no process group, no DDP), so its weights are the local run's, bit
    for bit; the job's environment keeps this one's OMP_NUM_THREADS, train's thread count."""
    folder = copy_project(reproduced, tmp_path / "lmpipe")
    for gone in (*OUTPUTS, "data/checkpoints", "dvc.lock", ".dvc/cache", ".dvc/tmp"):  # no run cache either
        path = folder / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    params = (folder / "params.yaml").read_bytes()
    start = time.monotonic()
    status, log = slurm.submit(folder, "--nodes=1", f"--cpus-per-task={slurm.cpus}", env=job_env)
    took = time.monotonic() - start
    assert status == 0, log[-5000:]
    steps = re.findall(r"^pipeline\.sbatch: step '([^']+)'$", log, re.M)
    assert steps == [
        "params check",
        "data_run.executor: ray",
        f"ray start (head on {slurm.name})",
        "ray start (workers)",
        "ray cluster (1 nodes)",
        "dvc repro (data stages)",
        "train (torchrun, 1 node(s) x 1)",
        "dvc commit train",
        "dvc repro (evaluate)",
    ], log[-5000:]
    assert f"ray: 1 node(s), {slurm.cpus} CPU(s)" in log
    assert "Running stage 'collect'" in log and "Running stage 'train'" not in log  # train ran by torchrun
    # The data stages joined the job's cluster: a Ray driver each that works through a Pool (clean's
    # shards at least), beside the script's own, which waited for the nodes
    assert len(drivers(job_env["RAY_TMPDIR"])) >= 2, drivers(job_env["RAY_TMPDIR"])
    assert not ray_left(job_env["RAY_PORT"])
    assert (folder / "params.yaml").read_bytes() == params  # data_run put back as it was

    # Every output, the weights among them, as the local run wrote it; DVC recorded the same
    # and finds nothing to do
    ours, theirs = comparable(folder), comparable(reproduced)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert lock_outs(folder) == lock_outs(reproduced)
    assert "Running stage" not in sh(folder, "dvc", "repro").stdout
    print(f"the job took {took:.0f} s")


def test_a_failing_step_fails_the_job_naming_the_step_and_stops_ray(slurm, tmp_path, job_env):
    """collect's only source is a file that is not there: the data stages fail on the job's Ray
    cluster, the job fails with one line naming the step, Ray is stopped and params.yaml put back."""
    folder = repository_copy(tmp_path / "lmpipe")
    write_params(folder, tiny_params({"sources": [text_source("gone", "corpus/gone.txt")], "max_documents": 0}))
    params = (folder / "params.yaml").read_bytes()
    status, log = slurm.submit(folder, "--nodes=1", f"--cpus-per-task={slurm.cpus}", env=job_env, timeout=300)
    assert status != 0, log
    last = log.strip().splitlines()
    failed = [line for line in last if "failed with exit" in line]
    assert failed == [f"pipeline.sbatch: step 'dvc repro (data stages)' failed with exit {status}"], log
    assert "corpus/gone.txt" in log  # collect's own one line says why
    assert "step 'train" not in log
    assert not ray_left(job_env["RAY_PORT"])
    assert (folder / "params.yaml").read_bytes() == params
