"""The Triton kernels compile for sm_80 and sm_90 without a GPU, with registers to spare.

``benchmarks/kernel_registers.py`` compiles every variant the dispatcher can choose
(``triton_bin.launch_configs``: kernels x dtypes x layouts x tiles, with and without Triton's
16-byte row alignment) to PTX with Triton and runs Triton's bundled ``ptxas -v`` on it.
It runs in a subprocess: compiled mode needs TRITON_INTERPRET unset when Triton is imported,
and this test session imports Triton in interpreter mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_registers.py"


def _ptxas_present() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not spec.origin:
        return False
    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(spec.origin), "bin", "ptxas")
    return os.path.exists(path)


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="Triton's bundled ptxas (NVIDIA backend) is missing")


def _compile(tmp_path, *args):
    out = tmp_path / "regs.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *args], capture_output=True, text=True, timeout=1200, env=env
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_lean(data, expected_variants):
    """Every variant compiled, none near the register limit. ptxas may still cap a variant at 48
    or 64 registers for occupancy and park a value or two on the stack (a few bytes, L1-resident):
    allowed in a few variants, in small amounts."""
    rows = data["variants"]
    assert len(rows) == expected_variants
    spilling = []
    for r in rows:
        assert 0 < r["registers"] <= 128, r  # far below the 255 limit
        assert 0 < r["occupancy"] <= 1
        spilled = r["spill_store_bytes"] + r["spill_load_bytes"]
        if spilled or r["stack_bytes"]:
            assert spilled <= 96 and r["stack_bytes"] <= 32 and r["registers"] <= 64, r
            spilling.append(r)
    assert len(spilling) <= max(1, len(rows) // 25), spilling


def _expected(kinds, dtypes, archs):
    import torch

    from metabin_layers.kernels import triton_bin as tb

    n = sum(
        len(tb.launch_configs(k, cl, getattr(torch, d), aligned))
        for k in kinds
        for d in dtypes
        for cl in (False, True)
        for aligned in (True, False)  # rows at 16-byte multiples (vectorised) or not
    )
    return n * len(archs)


def test_reduction_kernels_compile_lean(tmp_path):
    kinds = ["fwd_stats", "bwd_sums"]
    data = _compile(tmp_path, "--arch", "90", "--kernels", ",".join(kinds), "--dtypes", "float32,float64")
    _assert_lean(data, _expected(kinds, ["float32", "float64"], [90]))
    assert {r["arch"] for r in data["variants"]} == {"sm_90a"}


@pytest.mark.slow
def test_every_dispatch_variant_compiles_for_sm80_and_sm90(tmp_path):
    kinds = ["fwd_stats", "fwd_apply", "bwd_sums", "bwd_apply"]
    dtypes = ["float16", "bfloat16", "float32", "float64"]
    data = _compile(tmp_path, "--arch", "80,90")
    _assert_lean(data, _expected(kinds, dtypes, [80, 90]))
    assert {r["arch"] for r in data["variants"]} == {"sm_80", "sm_90a"}
    assert {(r["kernel"], r["dtype"], r["layout"]) for r in data["variants"]} == {
        (k, d, l) for k in kinds for d in dtypes for l in ("nchw", "channels_last")
    }
