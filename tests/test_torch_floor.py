"""The declared torch floor is true: newer torch APIs are guarded, and CI tests the floor itself."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from metabin_layers import MetaBIN2d

ROOT = Path(__file__).resolve().parents[1]


def test_layers_run_where_torch_lacks_the_compiler_flags(monkeypatch):
    # torch.compiler.is_exporting is torch 2.6+, is_compiling 2.3+.
    reference, layer = MetaBIN2d(3, rho_init=0.5), MetaBIN2d(3, rho_init=0.5)
    x = torch.randn(4, 3, 5, 5)
    expected_train, expected_eval = reference(x), reference.eval()(x)
    for name in ("is_exporting", "is_compiling"):
        monkeypatch.delattr(torch.compiler, name)
    torch.testing.assert_close(layer(x), expected_train, rtol=0, atol=0)
    torch.testing.assert_close(layer.eval()(x), expected_eval, rtol=0, atol=0)


def test_the_recipe_builds_its_grad_scaler_without_torch_amp_gradscaler(monkeypatch):
    from metabin_layers.reid.train import cuda_grad_scaler

    assert isinstance(cuda_grad_scaler(), torch.amp.GradScaler)  # torch 2.3+: the device-generic class
    legacy = torch.cuda.amp.GradScaler
    monkeypatch.delattr(torch.amp, "GradScaler")  # as before torch 2.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler is deprecated in newer torch
        assert type(cuda_grad_scaler()) is legacy


def test_the_declared_floor_is_the_torch_that_ci_tests():
    declared = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    tested = re.search(r'"torch==(\d+)\.(\d+)\.\d+"', (ROOT / ".ci" / "older_torch.sh").read_text())
    assert declared and tested and declared.groups() == tested.groups()
    readme = (ROOT / "README.md").read_text()
    assert f"torch>={'.'.join(declared.groups())}" in readme
