"""One run per output folder: a lock file holding the owner's pid and host, refused while that
process lives, reported (with the command that clears it) when it is stale, removed at exit."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metabin_layers.reid.cli import main
from metabin_layers.reid.errors import OutputFolderError
from metabin_layers.reid.lock import LOCK_NAME, run_lock
from metabin_layers.reid.train import Trainer

TINY = ["backbone=resnet10t", "height=32", "width=16", "pad=2", "syn_train_ids=16", "syn_test_ids=6", "max_iters=1"]


def _args(out: Path) -> list[str]:
    return ["train", "--quick", "--norm", "bn", "--no-progress", "--output", str(out), "--set", *TINY]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def live_process():
    """Another process of this host, alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": "metabin-reid train"}))
    return path


def test_a_second_run_on_a_folder_in_use_exits_2_naming_the_folder_and_the_process(tmp_path, live_process, capsys):
    out = tmp_path / "run"
    lock = _write_lock(out, live_process.pid)
    (out / "notes.txt").write_text("mine")
    assert main(_args(out)) == 2
    err = _one_line(capsys)
    assert str(out) in err and f"pid {live_process.pid}" in err and "in use" in err, err
    # nothing of the running process is touched
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, "notes.txt"])
    assert json.loads(lock.read_text())["pid"] == live_process.pid


def test_a_run_holding_the_lock_in_this_process_refuses_a_second_one(tmp_path, capsys):
    out = tmp_path / "run"
    import os

    with run_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputFolderError, match=f"pid {os.getpid()}"):
            with run_lock(out):
                pass
        assert main(_args(out)) == 2
        assert f"pid {os.getpid()}" in _one_line(capsys)
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_reported_with_the_command_that_clears_it(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    out = tmp_path / "run"
    lock = _write_lock(out, dead.pid)
    assert main(_args(out)) == 2
    err = _one_line(capsys)
    assert "stale" in err and f"pid {dead.pid}" in err and f"rm {lock}" in err, err
    assert lock.exists()  # reported, not removed behind the user's back
    lock.unlink()  # what the message says to do
    assert main(_args(out)) == 0
    assert (out / "results.json").exists() and not lock.exists()


def test_a_lock_of_another_host_is_never_called_stale(tmp_path, capsys):
    out = tmp_path / "run"
    _write_lock(out, 1, host="elsewhere.example")
    assert main(_args(out)) == 2
    err = _one_line(capsys)
    assert "elsewhere.example" in err and "stale" not in err


@pytest.mark.parametrize("stop", ["error", "interrupt"])
def test_the_lock_is_removed_when_the_run_ends_with_an_error_or_ctrl_c(tmp_path, monkeypatch, capsys, stop):
    out = tmp_path / "run"
    seen = []

    def failing_run(self, output, progress=True):
        seen.append((output / LOCK_NAME).exists())
        if stop == "error":
            raise OSError(28, "No space left on device", str(output / "log.txt"))
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run", failing_run)
    assert main(_args(out)) == (2 if stop == "error" else 130)
    assert seen == [True]  # held while training
    assert not (out / LOCK_NAME).exists()


def test_only_rank_0_takes_the_lock(tmp_path):
    out = tmp_path / "run"
    with run_lock(out, rank=1):
        assert not (out / LOCK_NAME).exists()
    with run_lock(out, rank=0):
        assert (out / LOCK_NAME).exists()
