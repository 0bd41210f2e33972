"""``metabin-reid train`` (BN and MetaBIN side by side) and ``metabin-reid eval`` (its own folder,
its own options) on tiny synthetic data."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metabin_layers.reid.report as report
from metabin_layers.reid.checkpoint import load_checkpoint
from metabin_layers.reid.cli import EVAL_KEYS, _config, build_parser, main
from metabin_layers.reid.visualize import TITLE_HEIGHT

TINY = ["syn_train_ids=16", "syn_test_ids=6", "syn_images_per_id=4", "max_iters=2"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the ``eval`` subfolder aside) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "eval" not in p.relative_to(folder).parts
    }


def rho_mean_of(checkpoint: Path) -> float:
    state = load_checkpoint(checkpoint)["model"]
    rhos = [v.double().flatten() for k, v in state.items() if k.startswith("backbone.") and k.endswith(".rho")]
    return float(torch.cat(rhos).mean())


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """``train --quick`` (both variants) and ``train --quick --norm bn``, in a fresh working folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    mp.setattr(report, "matplotlib_available", lambda: False)  # as on a machine without matplotlib
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as both:
        assert main(["train", "--quick", "--no-progress", "--set", *TINY]) == 0
    mp.undo()
    mp.chdir(cwd)
    with contextlib.redirect_stdout(io.StringIO()) as single:
        assert main(["train", "--quick", "--no-progress", "--norm", "bn", "--set", *TINY]) == 0
    mp.undo()
    return cwd, both.getvalue(), single.getvalue()


def test_train_without_a_variant_prints_the_captioned_comparison(quick_runs):
    cwd, printed, _ = quick_runs
    root = cwd / "runs" / "quick"  # --quick has its own default folder
    for run in ("bn", "metabin"):
        assert {"checkpoint.pt", "config.json", "log.txt", "results.json", "ranked.png"} <= {
            p.name for p in (root / run).iterdir()
        }
        assert json.loads((root / run / "config.json").read_text())["norm"] == run
    assert (root / "results.md").exists() and (root / "ranked.png").exists()
    # the notice when matplotlib is missing: one line, once
    assert printed.count(report.PLOTS_NOTICE) == 1 and not (root / "cmc.png").exists()
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Held-out style style4"))
    assert "metrics in %" in lines[start] and "seed 2020" in lines[start] and "2 iterations each" in lines[start]
    assert lines[start + 1] == "| model | R-1 | R-5 | mAP | mINP |"
    for row, run in ((3, "bn"), (4, "metabin")):
        m = json.loads((root / run / "results.json").read_text())["targets"]["style4"]
        expected = [f"{100 * m[k]:.1f}" for k in ("rank1", "rank5", "mAP", "mINP")]
        assert lines[start + row] == f"| {'BN' if run == 'bn' else 'MetaBIN'} | " + " | ".join(expected) + " |"
    rho = float(re.match(r"MetaBIN mean rho: ([0-9.]+) ", lines[start + 5]).group(1))
    assert rho == pytest.approx(rho_mean_of(root / "metabin" / "checkpoint.pt"), abs=5e-4)
    assert lines[start + 6].startswith("Results, plots and checkpoints") and lines[start + 6].endswith(str(Path("runs/quick")))
    # the top picture: BN's picture above MetaBIN's, same size each
    bn_pic = np.asarray(Image.open(root / "bn" / "ranked.png").convert("RGB"))
    top = np.asarray(Image.open(root / "ranked.png").convert("RGB"))
    assert top.shape[0] > 2 * bn_pic.shape[0] - 1 and np.array_equal(top[: bn_pic.shape[0]], bn_pic)


def test_a_chosen_variant_trains_alone(quick_runs):
    cwd, _, printed = quick_runs
    run = cwd / "runs" / "quick-bn"
    assert (run / "checkpoint.pt").exists() and (run / "ranked.png").exists()
    assert "| model |" not in printed and re.search(r"^BN \(seed 2020, 2 iterations\) on style4, metrics in %:$", printed, re.M)
    assert f"Results, plots and checkpoint: {Path('runs/quick-bn')}" in printed
    assert build_parser().parse_args(["train"]).norm is None
    assert _config(build_parser().parse_args(["train"])).output == str(Path("runs/synthetic"))
    assert _config(build_parser().parse_args(["train", "--norm", "metabin"])).output == "runs/synthetic-metabin"
    assert _config(build_parser().parse_args(["train", "--quick", "--set", "norm=in"])).output == "runs/quick-in"


def test_eval_writes_beside_the_run_and_never_over_it(quick_runs, capsys):
    cwd, _, _ = quick_runs
    run = cwd / "runs" / "quick" / "metabin"
    before = snapshot(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--set", "eval_batch_size=5", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert snapshot(run) == before and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    results = json.loads((run / "eval" / "results.json").read_text())
    trained = json.loads((run / "results.json").read_text())
    assert results["targets"]["style4"]["mAP"] == pytest.approx(trained["targets"]["style4"]["mAP"], abs=1e-6)
    assert results["config"]["eval_batch_size"] == 5 and results["checkpoint"] == str(run / "checkpoint.pt")
    assert results["mean_rho"] == pytest.approx(rho_mean_of(run / "checkpoint.pt"), abs=1e-6)
    assert (run / "eval" / "ranked.png").exists() and f"Results and plots: {run / 'eval'}" in out
    picture = np.asarray(Image.open(run / "eval" / "ranked.png"))
    assert picture.shape[0] == TITLE_HEIGHT + 2 * 4 + 6 * 136 + 5 * 4  # 6 queries, 128 x 64 images framed by 4
    # a second evaluation into the same folder needs --overwrite; the run's own folder is refused even with it
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--set", "metric=euclidean", "--overwrite"]) == 0
    assert json.loads((run / "eval" / "results.json").read_text())["config"]["metric"] == "euclidean"
    for output in (run, run.parent / "bn"):
        assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(output), "--overwrite"]) == 2
        assert "holds a training run" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("key", ["lr=0.5", "backbone=resnet50", "height=128", "max_iters=9", "seed=1"])
def test_eval_refuses_set_keys_it_cannot_honour(key, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pt"  # refused before the checkpoint is read
    assert main(["eval", "--checkpoint", str(ckpt), "--set", key]) == 2
    err = capsys.readouterr().err.strip()
    name = key.split("=")[0]
    assert err.count("\n") == 0 and f"--set {name}: eval cannot change this key" in err
    assert all(k in err for k in EVAL_KEYS) and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    "option", [["--quick"], ["--no-progress"], ["--sources", "market1501"], ["--config", "c.yaml"], ["--norm", "bn"]]
)
def test_eval_refuses_options_it_does_not_use(option, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["eval", "--checkpoint", "c.pt", *option])
    assert stop.value.code == 2 and f"unrecognized arguments: {option[0]}" in capsys.readouterr().err
    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--set", *[f"{k}=1" for k in ("workers", "num_splits")]])
    assert args.set == ["workers=1", "num_splits=1"] and args.output is None


def test_the_main_job_runs_half_the_synthetic_schedule_unless_told_otherwise():
    """``train`` alone: 3 epochs x 48 iterations each (``MAIN_JOB_PRESET``); a single variant, or an
    explicit ``epochs``, keeps the synthetic preset's 6 epochs or the value given."""

    def cfg(*argv):
        return _config(build_parser().parse_args(["train", *argv]))

    main_job = cfg()
    assert (main_job.epochs, main_job.milestones, main_job.iters_per_epoch) == (3, [2], 48)
    assert main_job.epochs * main_job.iters_per_epoch == 144
    assert cfg("--norm", "metabin").epochs == 6
    assert cfg("--set", "epochs=5").epochs == 5
    assert cfg("--quick").max_iters == 4
