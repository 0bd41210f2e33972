"""The benchmarks run end to end (smoke runs at tiny sizes: timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    run = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_layer_benchmark_smoke(tmp_path):
    out = _run(
        "bench_layer.py",
        "--shapes",
        "small",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "l.json"),
    )
    assert "MetaBIN2d[fused]" in out and "BatchNorm2d" in out and "naive" in out and "xBN" in out
    assert json.loads((tmp_path / "l.json").read_text())


@pytest.mark.slow
def test_iteration_benchmark_smoke(tmp_path):
    out = _run(
        "bench_iteration.py",
        "--batch",
        "40",
        "--ids-per-domain",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--configs",
        "a_plain,b_naive_split,c_ours_split",
        "--no-memory",
        "--json",
        str(tmp_path / "i.json"),
    )
    assert "a_plain" in out or "plain" in out
    assert json.loads((tmp_path / "i.json").read_text())
