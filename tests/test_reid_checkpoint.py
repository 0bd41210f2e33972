"""Recipe checkpoints and run folders: safe loading, checksums, honest resume, no silent overwrite, --set."""

from __future__ import annotations

import json
import os
import pathlib
import random
import zipfile

import numpy as np
import pytest
import torch

from metabin_layers.reid import checkpoint as ckpt
from metabin_layers.reid import report
from metabin_layers.reid.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from metabin_layers.reid.cli import _config, build_parser, main
from metabin_layers.reid.config import load_config
from metabin_layers.reid.errors import CheckpointError, OutputFolderError
from metabin_layers.reid.train import Trainer, train


def tiny_config(tmp_path, **kw):
    overrides = {
        "output": str(tmp_path / "run"),
        "syn_train_ids": 16,
        "syn_test_ids": 6,
        "syn_images_per_id": 4,
        "max_iters": 1,
        "checkpoint_every": 1,
        "backbone": "resnet10t",  # a small timm ResNet on small images: a run takes seconds
        "height": 32,
        "width": 16,
        "pad": 2,
    }
    overrides.update(kw)
    return load_config(overrides=overrides, quick=True)


class _RunsCode:
    """Unpickling this object touches a file: what a crafted checkpoint could do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _plain_or_tensor(value, where="state"):
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, int, float, bool)):
        return []
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _plain_or_tensor(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in _plain_or_tensor(v, f"{where}[{i}]")]
    return [f"{where}: {type(value).__name__}"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- 1. checkpoints never unpickle arbitrary objects ---------------------------------------------


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": {}, "iteration": 0, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused, it holds objects other than tensors"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file inside a well-formed header is refused too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"format": ckpt.FORMAT, "format_version": 1, "checksum": "", "state": {"x": _RunsCode(marker)}}, wrapped)
    with pytest.raises(CheckpointError, match="wrapped.pt: refused"):
        load_checkpoint(wrapped)
    assert not marker.exists()
    # the CLI: one line naming the file, no code run
    assert main(["eval", "--checkpoint", str(evil)]) == 2
    assert "evil.pt" in _one_error_line(capsys)
    assert main(["train", "--quick", "--output", str(tmp_path / "o"), "--resume", str(evil)]) == 2
    assert "evil.pt" in _one_error_line(capsys)
    assert not marker.exists()


def test_trainer_state_is_tensors_and_plain_values_and_loads_with_weights_only(tmp_path):
    cfg = tiny_config(tmp_path)
    t = Trainer(cfg)
    state = t.state_dict()
    assert _plain_or_tensor(state) == []
    path = tmp_path / "c.pt"
    t.save(path)
    raw = torch.load(path, weights_only=True)  # torch's own safe loader accepts the whole file
    assert raw["format"] == ckpt.FORMAT and raw["format_version"] == ckpt.FORMAT_VERSION
    assert len(raw["checksum"]) == 64 and raw["state"]["iteration"] == 0
    t2 = Trainer(cfg)
    t2.load_state_dict(load_checkpoint(path))
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert got == expected


def _flip_byte_in_tensor_data(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_or_another_version_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    weights = torch.linspace(-1, 1, 4096)
    save_checkpoint({"weights": weights, "iteration": 7}, path)
    assert torch.equal(load_checkpoint(path)["weights"], weights)
    _flip_byte_in_tensor_data(path)
    assert not torch.equal(torch.load(path, weights_only=True)["state"]["weights"], weights)  # torch loads it silently
    with pytest.raises(CheckpointError, match="checkpoint.pt: checksum mismatch"):
        load_checkpoint(path)
    payload = {"format": ckpt.FORMAT, "format_version": 99, "checksum": ckpt.checksum({"a": 1}), "state": {"a": 1}}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    torch.save({"model": {}, "iteration": 1}, path)  # a plain, headerless file
    with pytest.raises(CheckpointError, match="not a metabin-reid checkpoint"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match="only tensors and plain values, got ndarray at state.rng"):
        save_checkpoint({"rng": np.zeros(3)}, path)


# -- 2. resume is honest -------------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused_and_keeps_config_json(tmp_path):
    cfg = tiny_config(tmp_path)
    train(cfg, progress=False)
    run = pathlib.Path(cfg.output)
    before = (run / "config.json").read_text()
    changed = tiny_config(tmp_path, lr=0.05, margin=0.5, max_iters=2)
    with pytest.raises(CheckpointError) as err:
        train(changed, resume=str(run / "checkpoint.pt"), progress=False)
    msg = str(err.value)
    assert "lr: 0.01 -> 0.05" in msg and "margin: 0.3 -> 0.5" in msg and "max_iters" not in msg
    assert "--allow-config-change" in msg
    assert (run / "config.json").read_text() == before
    result = train(changed, resume=str(run), progress=False, allow_config_change=True)
    assert result["iterations"] == 2
    assert json.loads((run / "config.json").read_text())["lr"] == 0.05


@pytest.mark.parametrize("problem", ["missing", "empty", "corrupt", "folder"])
def test_a_bad_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, problem):
    bad = tmp_path / "checkpoint.pt"
    if problem == "empty":
        bad.write_bytes(b"")
    elif problem == "corrupt":
        bad.write_bytes(os.urandom(300))
    elif problem == "folder":
        bad = tmp_path / "empty_run"
        bad.mkdir()
    out = tmp_path / "out"
    assert main(["train", "--quick", "--no-progress", "--output", str(out), "--resume", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line
    assert not (out / "config.json").exists()  # nothing written before the checkpoint was opened


@pytest.mark.slow
def test_an_interrupted_first_save_still_resumes_from_the_run_folder(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, max_iters=2, checkpoint_every=1)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # a partial file on disk, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    run = pathlib.Path(cfg.output)
    assert not (run / "checkpoint.pt").exists() and (run / "config.json").exists()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    result = train(cfg, resume=str(run), progress=False)  # starts again from iteration 0
    assert result["iterations"] == 2 and load_checkpoint(run / "checkpoint.pt")["iteration"] == 2


# -- 3. no silent overwrite, atomic results ----------------------------------------------------


@pytest.mark.slow
def test_an_output_holding_an_earlier_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"stale": true}')
    (run / "rho.png").write_bytes(b"old")
    cfg = tiny_config(tmp_path)
    with pytest.raises(OutputFolderError, match="holds an earlier run \\(results.json, rho.png\\).*--overwrite"):
        train(cfg, progress=False)
    assert main(["train", "--quick", "--no-progress", "--output", str(run)]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert (run / "results.json").read_text() == '{"stale": true}'

    # --overwrite, and the run fails: nothing of the earlier run is left beside the new files
    def fails(self, output, progress=True):
        raise RuntimeError("out of memory")

    original = Trainer.run
    Trainer.run = fails  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            train(cfg, progress=False, overwrite=True)
    finally:
        Trainer.run = original  # type: ignore[method-assign]
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    result = train(cfg, progress=False, overwrite=True)
    assert json.loads((run / "results.json").read_text())["iterations"] == result["iterations"] == 1


def test_results_are_replaced_atomically(tmp_path, monkeypatch):
    results = {
        "targets": {"t": {**{k: 0.5 for k in report.METRICS}, "cmc": [0.5, 1.0]}},
        "norm": "bn",
        "seed": 0,
        "iterations": 3,
    }
    report.write_results({**results, "iterations": 1}, tmp_path)
    old_json, old_md = (tmp_path / "results.json").read_text(), (tmp_path / "results.md").read_text()

    def crash(src, dst):  # the process dies just before the rename
        raise OSError("disk gone")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        report.write_results(results, tmp_path)
    assert (tmp_path / "results.json").read_text() == old_json and (tmp_path / "results.md").read_text() == old_md
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    monkeypatch.undo()
    report.write_results(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["iterations"] == 3


# -- 4. --set ------------------------------------------------------------------------------------


def test_set_may_be_repeated_and_unknown_keys_list_the_valid_ones(tmp_path, capsys):
    args = build_parser().parse_args(
        ["train", "--quick", "--set", "lr=0.02", "margin=0.4", "--set", "max_iters=3", "--set", "lr=0.03"]
    )
    cfg = _config(args)
    assert (cfg.lr, cfg.margin, cfg.max_iters) == (0.03, 0.4, 3)
    assert main(["train", "--quick", "--output", str(tmp_path / "o"), "--set", "lrr=1"]) == 2
    line = _one_error_line(capsys)
    assert "unknown config key 'lrr'" in line
    known = line.split("known keys:")[1]
    assert all(key in known for key in ("lr", "margin", "max_iters", "rho_lr_factor", "num_instances"))
    assert not (tmp_path / "o").exists()


# -- damaged files are told from unsafe ones ------------------------------------------------------


def _zip_with_bad_crc(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "bad_crc.pt"
    ckpt.save_checkpoint({"iteration": 3, "weights": torch.arange(4096, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF  # one byte of the tensor data: its CRC no longer matches
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("problem", ["random_bytes", "text", "pickle_garbage", "bad_crc"])
def test_a_damaged_file_is_called_damaged_not_unsafe_and_without_ansi_codes(tmp_path, problem):
    path = tmp_path / "checkpoint.pt"
    if problem == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4000))
    elif problem == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif problem == "pickle_garbage":
        path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(500))
    else:
        path = _zip_with_bad_crc(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ") and "damaged" in message, message
    assert "could run code" not in message and "weights_only" not in message, message
    assert "\x1b" not in message and "\n" not in message, message


def test_an_unsafe_file_is_called_unsafe_naming_the_object_without_torchs_advice(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert "could run code" in message and "damaged" not in message, message
    assert "\x1b" not in message and "\n" not in message and "weights_only" not in message, message
    assert "Unsupported global" in message, message
    assert not marker.exists()
