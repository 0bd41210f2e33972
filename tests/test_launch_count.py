"""Kernel launches of one MetaBIN2d fwd+bwd, counted on the CPU: ATen ops (each at most one CUDA
launch) plus Triton launches (``benchmarks/launches.py``). The Triton backend stays within 2x
``nn.BatchNorm2d``'s count; the counter itself is checked on code with a known count."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import launches  # noqa: E402

triton = pytest.importorskip("triton")
from metabin_layers.kernels import triton_bin as tb  # noqa: E402

needs_interpreter = pytest.mark.skipif(not tb.INTERPRET, reason="Triton was imported without TRITON_INTERPRET=1")


def test_counter_counts_ops_not_views():
    x = torch.randn(4, 5)
    with launches.LaunchCounter() as c:
        y = x + 1  # aten.add
        y.view(-1)  # a view: no launch
        torch.empty(3)  # an allocation: counted apart
        y.sum()  # aten.sum
    assert c.aten == 3 and c.allocations == 1 and c.launches == 0, c.ops
    assert set(c.ops) == {"aten.add.Tensor", "aten.empty.memory_format", "aten.sum.default"}


@needs_interpreter
def test_counter_counts_triton_launches():
    x = torch.randn(2, 3, 4, 4)
    rho = torch.full((3,), 0.5)
    with launches.LaunchCounter() as c:
        tb.triton_bin_forward(x, rho, None, None, None, None, None, None, None, 0.1, 1e-5, "hold")
    assert dict(c.triton) == {"_fwd_stats": 1, "_fwd_apply": 1}
    assert c.aten == c.allocations == 2  # y and the workspace; the interpreter's own ops are not counted


@needs_interpreter
def test_triton_layer_within_twice_batchnorm():
    counts = launches.layer_counts("cpu", (4, 8, 4, 4))["rows"]  # the counts do not depend on the size
    bn = counts[launches.BN]
    assert bn["total"] == 4  # cuDNN-style BatchNorm: one op forward, one backward, plus their allocations
    tri = counts["MetaBIN2d[triton]"]
    assert tri["fwd"]["triton"] == 2 and tri["bwd"]["triton"] == 2
    assert tri["total"] <= 2 * bn["total"], tri
    # every ATen op left around the kernels is an allocation (y, workspace, dx, parameter gradients)
    assert tri["fwd"]["aten"] == tri["fwd"]["allocations"] and tri["bwd"]["aten"] == tri["bwd"]["allocations"], tri
    assert tri["total"] < counts["MetaBIN2d[fused]"]["total"] < counts["MetaBIN2d[composite]"]["total"]


def test_render_lists_every_candidate():
    counts = launches.layer_counts("cpu", (2, 4, 3, 3))
    table = launches.render(counts)
    for name in counts["rows"]:
        assert f"| {name} |" in table
    assert "1.00x" in table  # BatchNorm against itself
