"""A full (or read-only, or over-quota) disk while saving: one line naming the file and the free
space, the previous checkpoint and results intact; a resumed run keeps the old results until the
new ones are written."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from metabin_layers.reid import checkpoint as ckpt
from metabin_layers.reid import report
from metabin_layers.reid.checkpoint import load_checkpoint, save_checkpoint
from metabin_layers.reid.cli import main
from metabin_layers.reid.errors import DiskError
from metabin_layers.reid.train import RESULT_FILES, Trainer

TINY = ["backbone=resnet10t", "height=32", "width=16", "pad=2", "syn_train_ids=16", "syn_test_ids=6"]


def _args(out: Path, *sets: str) -> list[str]:
    return ["train", "--quick", "--norm", "bn", "--no-progress", "--output", str(out), "--set", *TINY, *sets]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("metabin-reid: error: "), err
    return err


class _FullDisk:
    """A file whose ``write`` fails with ``code`` once ``budget`` bytes are written (a disk filling up)."""

    def __init__(self, f, code: int, budget: int) -> None:
        self._f, self._code, self._left = f, code, budget

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(self._code, os.strerror(self._code))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fill_disk_on_open(monkeypatch, module, code: int, budget: int = 1000, names=(".checkpoint.pt",)):
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and any(Path(path).name.startswith(n) for n in names):
            return _FullDisk(f, code, budget)
        return f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_checkpoint_save_on_a_full_disk_is_one_error_naming_file_and_free_space(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(10)}, path)
    _fill_disk_on_open(monkeypatch, ckpt, code)
    with pytest.raises(DiskError) as info:
        save_checkpoint({"iteration": 2, "w": torch.ones(100_000)}, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and os.strerror(code) in message, message
    free = shutil.disk_usage(tmp_path).free
    assert "free" in message and _size(free).split()[1] in message, message
    assert "unexpected pos" not in message and "enforce fail" not in message
    # the previous checkpoint is intact and no temporary file is left
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _size(n: int) -> str:
    from metabin_layers.reid.disk import format_size

    return format_size(n)


def test_format_size_is_human_readable():
    from metabin_layers.reid.disk import format_size

    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


def test_a_training_run_on_a_full_disk_exits_2_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = ckpt.save_checkpoint
    calls = []

    def save(state, path):
        calls.append(state["iteration"])
        if len(calls) == 2:  # the second save meets a full disk
            _fill_disk_on_open(monkeypatch, ckpt, errno.ENOSPC)
        real_save(state, path)

    monkeypatch.setattr("metabin_layers.reid.train.save_checkpoint", save)
    assert main(_args(out, "max_iters=2", "checkpoint_every=1")) == 2
    err = _one_line(capsys)
    assert str(out / "checkpoint.pt") in err and "No space left on device" in err and "free" in err, err
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 1
    assert not list(out.glob(".checkpoint.pt.*"))


def test_eval_on_a_full_disk_exits_2_and_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    assert main(_args(out, "max_iters=1")) == 0
    capsys.readouterr()
    _fill_disk_on_open(monkeypatch, report, errno.ENOSPC, budget=10, names=(".results",))
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 2
    err = _one_line(capsys)
    assert str(out / "eval" / "results.json") in err and "No space left on device" in err, err
    assert not (out / "eval").exists()


def test_resuming_a_finished_run_keeps_its_results_until_the_new_ones_are_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    assert main(_args(out, "max_iters=1")) == 0
    before = {name: (out / name).read_bytes() for name in RESULT_FILES if (out / name).exists()}
    assert {"results.json", "results.md", "ranked.png"} <= set(before)

    def fails(self, output, progress=True):
        assert {name for name in RESULT_FILES if (output / name).exists()} == set(before)
        raise OSError(errno.ENOSPC, "No space left on device", str(output / "log.txt"))

    monkeypatch.setattr(Trainer, "run", fails)
    assert main(["train", "--resume", str(out), "--no-progress", "--set", "max_iters=2"]) == 2
    assert "log.txt" in _one_line(capsys)
    assert {name: (out / name).read_bytes() for name in before} == before  # the old results, untouched
    monkeypatch.undo()
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    assert main(["train", "--resume", str(out), "--no-progress", "--set", "max_iters=2"]) == 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
