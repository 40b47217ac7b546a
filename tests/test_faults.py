"""A full disk and a read-only folder, for every stage: one line, a non-zero exit, no traceback (none
"ignored" at exit either), and every earlier output byte-identical, curves and metrics included.

The disk is a small tmpfs mounted for the test (CI runs as root); where mounting is refused the
test is skipped, saying why, and the fast test below covers the same path with a writer that
raises OSError(ENOSPC).
"""

import contextlib
import errno
import shutil
import subprocess

import pytest
from conftest import assert_clean_error, call_stage, copy_project, run_stage, set_params, snapshot

from pipeline.core.common import run_main

STAGES = ("collect", "clean", "tokenize", "train", "evaluate")
OUTPUTS = ("data", "metrics", "params.yaml")


def _size(folder) -> int:
    return sum(f.stat().st_size + 4096 for f in folder.rglob("*"))


@contextlib.contextmanager
def on_small_disk(src, at, fault: str):
    """A copy of `src` on a tmpfs mounted at `at`: full to the last byte, or read-only."""
    at.mkdir()
    size = _size(src) + (1 << 20)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        folder = shutil.copytree(src, at / "p", symlinks=True)
        if fault == "full":
            with contextlib.suppress(OSError), open(at / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(at)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read_only"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_full_or_read_only_disk_is_one_line_and_changes_nothing(finished, tmp_path, stage, fault):
    src = copy_project(finished, tmp_path / "src")
    if stage == "train":  # more steps: it must train and write checkpoints, curves and a model
        set_params(src, train={"max_steps": 30})
    with on_small_disk(src, tmp_path / "mnt", fault) as folder:
        before = snapshot(folder, *OUTPUTS)
        proc = run_stage(stage, folder, check=False)
        assert_clean_error(proc, "No space left on device" if fault == "full" else "Read-only file system")
        assert "Exception ignored" not in proc.stderr
        assert snapshot(folder, *OUTPUTS) == before
        assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_a_checkpoint_the_disk_cannot_hold_leaves_curves_and_model_as_they_were(
    finished, tmp_path, monkeypatch, capsys
):
    folder = copy_project(finished, tmp_path / "p")
    set_params(folder, train={"max_steps": 30})
    before = snapshot(folder, *OUTPUTS)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: call_stage("train", folder))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the weights" in err[0] and "No space left on device" in err[0], err
    assert snapshot(folder, *OUTPUTS) == before  # the curves of steps 20-29 were never published
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]
