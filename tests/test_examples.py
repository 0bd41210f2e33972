"""The scripts of docs/examples run end to end (tiny settings) and print what they promise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _run(args, cwd):
    # One intra-op thread: these are tiny tensors, and a busy 2-core machine slows multi-threaded
    # CPU kernels down by 10x (OpenMP threads waiting for each other).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # -W error: an example that warns fails; nothing may be logged to stderr either.
    proc = subprocess.run(
        [sys.executable, "-W", "error", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def test_custom_loop_timm(tmp_path):
    pytest.importorskip("timm")
    out = _run([EXAMPLES / "custom_loop_timm.py", "--iters", "3"], tmp_path)
    lines = re.findall(r"^iter (\d+): base ([\d.]+)  meta-train ([\d.]+)  meta-test ([\d.]+)  mean rho ([\d.]+)$", out, re.M)
    assert [int(it) for it, *_ in lines] == [1, 2, 3], out
    rhos = [float(r) for *_, r in lines]
    assert all(0.0 <= r <= 1.0 for r in rhos) and rhos[-1] < 1.0  # rho is meta-learned (starts at 1)
    assert out.rstrip().endswith("done")


@pytest.mark.slow
def test_finetune_torchvision_folder(tmp_path):
    demo, saved = tmp_path / "demo", tmp_path / "folded.pt2"
    args = ["--make-demo-data", demo, "--epochs", "2", "--iters", "1", "--size", "48", "--save", saved]
    out = _run([EXAMPLES / "finetune_torchvision_folder.py", *args], tmp_path)
    assert sorted(p.name for p in demo.iterdir()) == ["night", "photo", "sketch"]
    assert len(list(demo.glob("*/*/*.jpg"))) == 3 * 3 * 8
    assert "domains ['night', 'photo', 'sketch'], classes ['circle', 'square', 'triangle']" in out
    assert re.findall(r"^epoch (\d) iter 1/1: loss [\d.]+  meta-train [\d.]+  meta-test [\d.]+  mean rho [\d.]+$", out, re.M) == [
        "1",
        "2",
    ]
    assert len(re.findall(r"^accuracy (night|photo|sketch): [\d.]+ \(24 images\)$", out, re.M)) == 3
    diff = float(re.search(r"folded model: max \|difference\| to the eval model (\S+)", out).group(1))
    assert diff < 1e-3
    assert f"saved the folded model (torch.export program) to {saved}" in out
    loaded = torch.export.load(str(saved)).module()  # any batch size
    assert loaded(torch.zeros(3, 3, 48, 48))[1].shape == (3, 3)

    # The same run on an existing folder (no generation), through --root.
    out = _run([EXAMPLES / "finetune_torchvision_folder.py", "--root", demo, "--iters", "1", "--size", "48"], tmp_path)
    assert "demo data" not in out and "epoch 1 iter 1/1" in out


def test_finetune_without_data_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_torchvision_folder.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--root" in proc.stderr
