"""The prepared GPU scripts: without CUDA they stop at once with a clear message, and their CPU
dry runs (tiny settings) go through every step and write every table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _run(script, *args, timeout=600):
    cmd = ["bash", str(ROOT / "benchmarks" / script), *map(str, args)]
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@needs_no_cuda
@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_training.sh"])
def test_fails_fast_without_cuda(tmp_path, script):
    run = _run(script, tmp_path / "out", timeout=120)
    assert run.returncode == 2
    assert "CUDA is not available" in run.stderr and "--dry-run" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_training.sh"])
def test_refuses_a_non_empty_output_folder(tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("committed results")
    run = _run(script, out, "--dry-run", timeout=120)
    assert run.returncode == 2 and "not empty" in run.stderr
    assert (out / "results.md").read_text() == "committed results"


def test_usage_error_without_outdir():
    run = _run("gpu_suite.sh", "--dry-run", timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [("--speed-iters", 20, "--speed-iters must be at least 30"), ("--long-iters", 100, "a positive multiple of 6")],
)
def test_gpu_training_checks_its_iteration_counts(tmp_path, flag, value, message):
    run = _run("gpu_training.sh", tmp_path / "out", "--dry-run", flag, value, timeout=120)
    assert run.returncode == 2 and message in run.stderr and f"got {value}" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "suite"
    run = _run("gpu_suite.sh", out, "--dry-run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert steps == {
        "pytest -m gpu": "passed",
        "layer benchmark (nchw)": "passed",
        "layer benchmark (channels_last)": "passed",
        "layer benchmark (batch 256, layer1)": "passed",
        "iteration benchmark": "passed",
        "metabin-reid train --quick": "passed",
    }
    assert "Kernel launches per fwd+bwd" in (out / "layer_nchw.md").read_text()
    for name in ("layer_nchw.md", "layer_channels_last.md", "iteration.md", "summary.md", "environment.json"):
        assert (out / name).stat().st_size > 0, name
    layer = json.loads((out / "layer_nchw.json").read_text())
    candidates = {r["candidate"] for r in layer["results"]}
    assert {
        "BatchNorm2d",
        "InstanceNorm2d(affine)",
        "naive BN+IN mix",
        "naive BN+IN mix (torch.compile)",
        "copy (floor)",
    } <= candidates
    assert {"MetaBIN2d[fused]", "MetaBIN2d[composite]"} <= candidates
    assert json.loads((out / "layer_channels_last.json").read_text())["config"]["channels_last"] is True
    iteration = json.loads((out / "iteration.json").read_text())
    eager = {"a_plain", "b_naive_split", "c_ours_split"}
    assert set(iteration["results"]) == eager | {f"{c}:graph" for c in eager}
    assert set(iteration["results"]["c_ours_split"]["timing"]) == {"base", "meta-train", "meta-test", "total"}
    assert iteration["results"]["c_ours_split:graph"]["status"] == "failed: RuntimeError: CUDA graphs need a CUDA device"
    # every performance target is evaluated (figures are meaningless on a CPU at these sizes)
    kinds = {t["target"] for t in summary["targets"]}
    assert any("1.3x BatchNorm2d" in k for k in kinds) and (out / "layer_batch256.json").exists()
    assert any("torch.compile" in k for k in kinds) and any("0.5x the authors' structure" in k for k in kinds)
    assert any("3.0x plain (a), eager" in k for k in kinds)
    assert (out / "train_quick" / "results.json").exists()
    assert "passed" in (out / "pytest_gpu.txt").read_text() or "skipped" in (out / "pytest_gpu.txt").read_text()


@pytest.mark.slow
def test_gpu_training_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "training"
    run = _run("gpu_training.sh", out, "--dry-run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "training.json").read_text())
    speed = report["speed"]
    assert set(speed) == {"bn-fp16", "metabin-bf16", "metabin-bf16-compile"}
    for key, r in speed.items():
        assert r["status"] == "passed" and r["finite"] is True, key
        assert r["it_per_s"] > 0 and r["first_mark"][0] == 1, key
    for key in ("metabin-bf16", "metabin-bf16-compile"):
        assert 0.0 <= speed[key]["rho_min"] <= speed[key]["rho_max"] <= 1.0
        assert set(speed[key]["rho_groups"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert "rho_min" not in speed["bn-fp16"]  # plain BN has no rho
    long = report["long"]
    assert set(long) == {"bn", "bin", "bin-half", "metabin"}
    for norm, runs in long.items():
        r = runs["0"]
        assert r["status"] == "passed" and r["iterations"] == 2, norm
        t = next(iter(r["targets"].values()))
        assert 0.0 <= t["rank1"] <= 1.0 and 0.0 <= t["mAP"] <= 1.0
    assert all(v == 0.5 for v in long["bin-half"]["0"]["rho_groups"].values())  # fixed rho
    text = (out / "training.md").read_text()
    assert "## Speed" in text and "## Long runs" in text and "torch.compile: compile time" in text
    # the images were rendered once into the cache and reused by the runs
    assert list((out / "cache").glob("synthetic-*.npy"))
