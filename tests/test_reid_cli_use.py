"""Daily use of ``metabin-reid``: the progress bar, Ctrl-C, checkpoint cadence, resuming from the
run's own config, and user errors that are one or two lines (exit status 2) instead of a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metabin_layers import metabin_modules
from metabin_layers.reid import checkpoint as ckpt
from metabin_layers.reid.checkpoint import load_checkpoint
from metabin_layers.reid.cli import _config, build_parser, main
from metabin_layers.reid.config import QUICK_PRESET, TrainConfig, load_config
from metabin_layers.reid.errors import RecipeError
from metabin_layers.reid.train import Trainer, checkpoint_due, progress_postfix

ROOT = Path(__file__).resolve().parents[1]

#: A --quick run small enough to take seconds: a tiny timm ResNet on 32x16 images.
TINY = ["backbone=resnet10t", "height=32", "width=16", "pad=2", "syn_train_ids=16", "syn_test_ids=6"]


def _train_args(out: Path, *sets: str) -> list[str]:
    return ["train", "--quick", "--norm", "metabin", "--no-progress", "--output", str(out), "--set", *TINY, *sets]


def _short_error(capsys) -> str:
    """stderr of a user error: at most two lines, no traceback."""
    err = capsys.readouterr().err.strip()
    assert 1 <= len(err.splitlines()) <= 2 and "Traceback" not in err, err
    return err


def _log_iterations(run: Path) -> list[int]:
    return [int(m) for m in re.findall(r"\bit=(\d+)\b", (run / "log.txt").read_text())]


# -- the progress bar -----------------------------------------------------------------------------


def test_progress_postfix_is_short_and_rounds_loss_and_rho():
    assert progress_postfix(1.23449, 0.93431) == "loss=1.234 rho=0.934"
    assert progress_postfix(1.2346, 0.99996) == "loss=1.235 rho=1.000"
    assert progress_postfix(0.5, None) == "loss=0.500"
    # beside tqdm's counts, rate and ETA (about 50 characters) it fits 80 columns whole
    assert len(progress_postfix(123.456, 0.5)) <= 25


def test_progress_bar_shows_the_models_mean_rho_rate_and_eta(tmp_path, capsys):
    cfg = load_config(overrides={**_tiny_overrides(), "max_iters": 2, "output": str(tmp_path)}, quick=True)
    trainer = Trainer(cfg)
    trainer.run(tmp_path, progress=True)
    bar = capsys.readouterr().err
    # the reference: every MetaBIN layer's rho, concatenated and averaged in float64
    rho = torch.cat([m.rho.detach().double().flatten() for m in metabin_modules(trainer.model)]).mean().item()
    shown = re.findall(r"rho=([0-9.]+)", bar)
    assert shown and shown[-1] == f"{rho:.3f}", bar
    assert re.search(r"loss=\d+\.\d{3}", bar) and re.search(r"(it/s|s/it)", bar) and "2/2" in bar, bar


def _tiny_overrides() -> dict[str, object]:
    return dict(pair.split("=") for pair in TINY)


# -- checkpoint cadence ---------------------------------------------------------------------------


def test_checkpoint_schedule_by_iterations_minutes_and_the_end():
    def saves(max_iters, every_iters, every_minutes, minutes_per_iter):
        done, since = [], 0.0
        for it in range(1, max_iters + 1):
            since += minutes_per_iter
            if checkpoint_due(it, max_iters, every_iters, every_minutes, since):
                done.append(it)
                since = 0.0
        return done

    assert saves(10, 4, None, 1.0) == [4, 8, 10]  # every 4 iterations, and the last
    assert saves(10, None, 3.0, 1.0) == [3, 6, 9, 10]  # every 3 minutes at a minute per iteration
    assert saves(10, None, 2.5, 1.0) == [3, 6, 9, 10]  # due once 2.5 minutes have passed
    assert saves(10, 4, 3.0, 1.0) == [3, 4, 7, 8, 10]  # whichever comes first, the clock restarting
    assert saves(10, None, None, 1.0) == [10]  # the quick preset: only at the end
    assert saves(1, None, 10.0, 0.01) == [1]


def test_defaults_save_every_ten_minutes_and_the_quick_preset_only_at_the_end():
    cfg = TrainConfig()
    assert (cfg.checkpoint_every, cfg.checkpoint_every_minutes) == (None, 10.0)
    quick = load_config(quick=True)
    assert quick.checkpoint_every is None and quick.checkpoint_every_minutes is None
    assert QUICK_PRESET["max_iters"] > 1  # so "only at the end" means fewer saves than iterations
    with pytest.raises(ValueError, match="checkpoint_every_minutes must be > 0"):
        TrainConfig(checkpoint_every_minutes=0)


# -- Ctrl-C ---------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, iteration: int, raise_it=None):
    """Make the base step of ``iteration`` (1-based) raise KeyboardInterrupt, as Ctrl-C would."""
    real = Trainer.base_step

    def base_step(self):
        if self.iteration + 1 == iteration:
            (raise_it or _ctrl_c)()
        return real(self)

    monkeypatch.setattr(Trainer, "base_step", base_step)


def _ctrl_c():
    raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_resume_command_and_the_resume_logs_each_iteration_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 4)
    assert main(_train_args(out, "max_iters=4", "checkpoint_every=2")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    assert "interrupted at iteration 3 of 4" in err
    assert f"the last checkpoint is from iteration 2 ({out / 'checkpoint.pt'})" in err
    assert f"resume with: metabin-reid train --resume {out}" in err
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2  # the last complete one, intact
    assert _log_iterations(out) == [1, 2, 3]  # iteration 3 was logged after the checkpoint

    # The printed command, verbatim: no flag repeated, the run's own config.
    monkeypatch.undo()
    (out / ".checkpoint.pt.99999.tmp").write_bytes(b"left by a process killed while saving")
    command = err.strip().splitlines()[-1].split("resume with: metabin-reid ")[1].split()
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"resumed from iteration 2 ({out / 'checkpoint.pt'})" in printed
    assert _log_iterations(out) == [1, 2, 3, 4]  # iteration 3 once, though it ran twice
    assert not (out / ".checkpoint.pt.99999.tmp").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 4 and results["config"]["syn_train_ids"] == 16


@pytest.mark.slow
def test_ctrl_c_while_a_checkpoint_is_written_leaves_the_previous_one_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def interrupted_save(obj, f, *args, **kwargs):
        calls.append(obj["state"]["iteration"])
        real_save(obj, f, *args, **kwargs)
        if len(calls) == 2:
            f.truncate(1000)  # half written when Ctrl-C comes;
            try:  # then torch's zip writer fails on the way out, as torch 2.x does
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29576768") from None

    monkeypatch.setattr(ckpt.torch, "save", interrupted_save)
    assert main(_train_args(out, "max_iters=3", "checkpoint_every=1")) == 130
    err = capsys.readouterr().err
    assert calls == [1, 2] and "Traceback" not in err
    assert "interrupted at iteration 2 of 3; the last checkpoint is from iteration 1" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "log.txt"]
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_stops_like_ctrl_c_with_status_143(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2, raise_it=lambda: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    assert main(_train_args(out, "max_iters=3")) == 143
    err = capsys.readouterr().err
    assert "interrupted at iteration 1 of 3; no checkpoint was saved yet" in err and "Traceback" not in err
    assert f"metabin-reid train --resume {out}" in err
    assert not (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the caller's again


# -- resume reads the run's own config --------------------------------------------------------


def _saved_run(tmp_path, **values) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(**{**load_config(quick=True).to_dict(), **values, "output": "elsewhere/run"})
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run


def test_resume_takes_the_runs_config_and_applies_what_is_set(tmp_path, capsys):
    run = _saved_run(tmp_path, lr=0.02, syn_train_ids=16, backbone="resnet10t", max_iters=4)
    cfg = _config(build_parser().parse_args(["train", "--resume", str(run), "--set", "max_iters=9"]))
    expected = {**json.loads((run / "config.json").read_text()), "max_iters": 9, "output": str(run)}
    assert cfg.to_dict() == expected
    assert capsys.readouterr().err == ""
    # flags of the original command may still be given: ignored, with a note
    again = _config(build_parser().parse_args(["train", "--quick", "--resume", str(run)]))
    assert again.syn_train_ids == 16 and again.max_iters == 4
    assert "--quick ignored" in capsys.readouterr().err


def test_resume_with_a_changed_key_is_refused_naming_it(tmp_path, capsys):
    run = _saved_run(tmp_path, lr=0.02)
    assert main(["train", "--resume", str(run), "--set", "lr=0.5"]) == 2
    err = _short_error(capsys)
    assert "lr: 0.02 -> 0.5" in err and "--allow-config-change" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


# -- user errors: one or two lines, exit status 2, nothing created -------------------------------


def _market_with_bad_names(root: Path) -> None:
    base = root / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
        (base / sub / "not_a_market_name.jpg").write_bytes(b"")


USER_ERRORS = ("all_missing", "missing_and_malformed", "no_data_root", "bad_set_value")
USER_ERRORS += ("bad_checkpoint", "missing_checkpoint", "pretrained")


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_are_short_exit_2_and_create_no_run_folder(tmp_path, capsys, case):
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    common = ["--output", str(out), "--no-progress"]
    if case == "all_missing":
        args = ["train", "--data-root", str(data), "--sources", "market1501", "cuhk02", "--targets", "grid", "viper", *common]
        expected = ["4 datasets", "market1501", "cuhk02", "grid", "viper", str(data)]
    elif case == "missing_and_malformed":
        _market_with_bad_names(data)
        args = ["train", "--data-root", str(data), "--sources", "market1501", "--targets", "prid", *common]
        expected = ["not found: prid", "unreadable: market1501", "not_a_market_name.jpg"]
    elif case == "no_data_root":
        args = ["train", "--data-root", str(tmp_path / "nowhere"), *common]
        expected = [f"--data-root {tmp_path / 'nowhere'}: no such folder"]
    elif case == "bad_set_value":
        args = ["train", "--quick", "--set", "lr=abc", *common]
        expected = ["lr expects a number, got 'abc'"]
    elif case == "bad_checkpoint":
        bad = tmp_path / "checkpoint.pt"
        ckpt.save_checkpoint({"iteration": 3, "weights": torch.ones(1000)}, bad)
        bad.write_bytes(bad.read_bytes()[:2000])  # truncated
        args = ["train", "--resume", str(bad), *common]
        expected = [str(bad), "corrupt"]
    elif case == "missing_checkpoint":
        args = ["train", "--resume", str(tmp_path / "gone.pt"), *common]
        expected = [str(tmp_path / "gone.pt"), "no such file"]
    else:
        args = ["train", "--quick", "--set", "pretrained=/no/such/weights.pth", *common]
        expected = ["pretrained /no/such/weights.pth: no such file"]
    assert main(args) == 2
    err = _short_error(capsys)
    assert err.startswith("metabin-reid: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


def test_a_bad_integer_names_the_key_and_the_type(tmp_path, capsys):
    assert main(["train", "--quick", "--output", str(tmp_path / "o"), "--set", "max_iters=4.5"]) == 2
    assert "max_iters expects an integer, got '4.5'" in _short_error(capsys)


def test_debug_raises_the_error_and_unexpected_errors_are_not_hidden(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="lr expects a number"):
        main(["--debug", "train", "--quick", "--set", "lr=abc", "--output", str(tmp_path / "o")])
    with pytest.raises(RecipeError, match="lr expects a number"):  # after the sub-command too
        main(["train", "--quick", "--set", "lr=abc", "--output", str(tmp_path / "o"), "--debug"])

    def bug(self, output, progress=True):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(Trainer, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(_train_args(tmp_path / "bug"))


@pytest.mark.slow
def test_debug_prints_the_traceback_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "metabin_layers.reid.cli", *f"train --quick --set lr=abc --output {tmp_path / 'o'}".split()]
    plain = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2 and plain.stderr.strip() == "metabin-reid: error: --set: lr expects a number, got 'abc'"
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "RecipeError: --set: lr expects a number, got 'abc'" in debug.stderr
