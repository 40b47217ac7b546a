"""What killed runs leave behind, and what the next run does with it."""

import subprocess
import sys

from conftest import call_stage, copy_project

from pipeline.common import atomic_dir, remove_stale


def dead_pid() -> int:
    """The id of a process that has ended (and is not reused within the test)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_what_a_killed_run_left_and_spares_a_live_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = dead_pid()
        (tmp_path / f"raw.tmp-{gone}").mkdir()
        (tmp_path / f"raw.tmp-{gone}" / "half.jsonl").write_text("{")
        (tmp_path / f"raw.old-{gone}").mkdir()
        (tmp_path / f"raw.tmp-{live.pid}").mkdir()  # a concurrent run's
        (tmp_path / f"rawer.tmp-{gone}").mkdir()  # another output's
        (tmp_path / "raw.tmp-notapid").mkdir()
        with atomic_dir(tmp_path / "raw") as out:
            (out / "a.jsonl").write_text("{}\n")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["raw", f"raw.tmp-{live.pid}", f"rawer.tmp-{gone}", "raw.tmp-notapid"])
        remove_stale(tmp_path, "rawer")
        assert not (tmp_path / f"rawer.tmp-{gone}").exists()
    finally:
        live.kill()
        live.wait()


def test_a_killed_trainings_half_written_checkpoint_is_removed(prepared, tmp_path):
    folder = copy_project(prepared, tmp_path / "p")
    checkpoints = folder / "data" / "checkpoints"
    stale = checkpoints / f".step_0000010.tmp-{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    call_stage("train", folder)
    assert not stale.exists() and any(p.name.startswith("step_") for p in checkpoints.iterdir())
