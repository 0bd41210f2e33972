"""backend="auto": Triton on CUDA only after a recorded CUDA validation, one decision per forward,
and a failing Triton kernel falls back to the fused path once, with a warning, instead of raising.

Without a GPU the "CUDA" side is simulated: a stand-in tensor with ``is_cuda=True`` for the
choice, and (for the fallback) the choice forced to Triton on CPU tensors, which Triton's
interpreter runs (conftest sets TRITON_INTERPRET=1 before Triton is imported).
"""

import types
import warnings

import pytest
import torch
from reference import reference_bin
from torch import nn

import metabin_layers
from metabin_layers import MetaBIN2d, _registry, functional, kernels
from metabin_layers.functional import batch_instance_norm, reset_triton_fallback, resolve_backend, triton_fallback_reason

EPS = 1e-5


@pytest.fixture(autouse=True)
def _clean_fallback_state(monkeypatch):
    monkeypatch.delenv(functional.BACKEND_ENV, raising=False)
    reset_triton_fallback()
    yield
    reset_triton_fallback()


def _fake_cuda_tensor():
    return types.SimpleNamespace(is_cuda=True, dtype=torch.float32, dim=lambda: 4)


def test_auto_on_cuda_needs_a_validation_record_for_this_release(monkeypatch):
    monkeypatch.setattr(kernels, "is_available", lambda x=None: True)
    x = _fake_cuda_tensor()
    monkeypatch.setattr(kernels, "CUDA_VALIDATION", None)
    assert not kernels.cuda_validated()
    assert resolve_backend(x) == "fused"  # never ran on a GPU: the ATen path
    record = {"version": metabin_layers.__version__, "date": "2026-11-28", "gpu": "test", "torch": "x", "triton": "y"}
    monkeypatch.setattr(kernels, "CUDA_VALIDATION", record)
    assert kernels.cuda_validated()
    assert resolve_backend(x) == "triton"
    monkeypatch.setattr(kernels, "CUDA_VALIDATION", dict(record, version="0.0.0-older"))
    assert resolve_backend(x) == "fused"  # validated for another release only
    monkeypatch.setattr(kernels, "CUDA_VALIDATION", record)
    monkeypatch.setattr(kernels, "is_available", lambda x=None: False)
    assert resolve_backend(x) == "fused"  # Triton missing
    monkeypatch.setattr(kernels, "is_available", lambda x=None: True)
    monkeypatch.setenv(functional.BACKEND_ENV, "composite")
    assert resolve_backend(x) == "composite"  # the environment variable still wins
    monkeypatch.delenv(functional.BACKEND_ENV)
    with pytest.warns(RuntimeWarning):
        _registry.record_triton_failure("forward", RuntimeError("boom"))
    assert resolve_backend(x) == "fused"  # a failure in this process disables it
    assert resolve_backend(torch.zeros(2, 3, 4)) == "fused"  # CPU tensors never pick Triton


def test_one_backend_decision_per_forward(monkeypatch):
    calls = []
    real = functional._resolve

    def counting(x, backend):
        calls.append(backend)
        return real(x, backend)

    monkeypatch.setattr(functional, "_resolve", counting)
    layer = MetaBIN2d(3, rho_init=0.5).train()
    layer(torch.randn(4, 3, 5, 5)).sum().backward()
    assert calls == ["auto"]


triton = pytest.importorskip("triton")
from metabin_layers.kernels import triton_bin as tb  # noqa: E402

needs_interpreter = pytest.mark.skipif(not tb.INTERPRET, reason="Triton was imported without TRITON_INTERPRET=1")


def _choose_triton_until_failure(monkeypatch):
    """Make "auto" pick Triton for CPU tensors (as it would for CUDA tensors after validation)."""
    monkeypatch.setattr(functional, "_auto_prefers_triton", lambda x: not _registry._TRITON_FAILURE)


def _raise(what):
    def fail(*args, **kwargs):
        fail.calls += 1
        raise RuntimeError(f"{what} failed (simulated ptxas error)")

    fail.calls = 0
    return fail


@needs_interpreter
def test_forward_failure_falls_back_once_with_a_warning(monkeypatch):
    _choose_triton_until_failure(monkeypatch)
    failing = _raise("triton_bin_forward")
    monkeypatch.setattr(tb, "triton_bin_forward", failing)
    torch.manual_seed(1)
    layer = MetaBIN2d(4, rho_init=0.3).train()
    bn = nn.BatchNorm2d(4).double().train()  # reference for the running statistics
    x = torch.randn(3, 4, 5, 6) * 2 + 0.5
    with pytest.warns(RuntimeWarning, match="Triton kernels failed in the forward"):
        y = layer(x)
    bn(x.double())
    assert failing.calls == 1
    assert "simulated ptxas error" in triton_fallback_reason()
    expected = reference_bin(x, layer.rho, layer.weight, layer.bias, layer.in_weight, layer.in_bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # the running statistics were updated exactly once (by the fallback call)
    torch.testing.assert_close(layer.running_mean.double(), bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), bn.running_var, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        layer(x).sum().backward()
    assert failing.calls == 1  # later calls do not try Triton again
    assert resolve_backend(x) == "fused"


@needs_interpreter
def test_explicit_triton_backend_raises(monkeypatch):
    monkeypatch.setattr(tb, "triton_bin_forward", _raise("triton_bin_forward"))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="simulated"):
        batch_instance_norm(x, torch.full((3,), 0.5), backend="triton")
    assert triton_fallback_reason() is None


@needs_interpreter
@pytest.mark.parametrize("use_batch", [True, False], ids=["batch-stats", "running-stats"])
def test_backward_failure_recomputes_gradients(monkeypatch, use_batch):
    failing = _raise("triton_bin_backward")
    monkeypatch.setattr(tb, "triton_bin_backward", failing)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, 5, 3, generator=gen) * 1.5 + 0.2).requires_grad_()
    params = [torch.rand(4, generator=gen)] + [torch.randn(4, generator=gen) for _ in range(4)]
    params = [p.requires_grad_() for p in params]
    fixed = (None, None) if use_batch else (torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5)
    mode = "hold" if use_batch else "eval"
    dy = torch.randn(x.shape, generator=gen)
    y = tb.TritonBIN.apply(x, *params, *fixed, None, 0.1, EPS, mode, False, True)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed in the backward"):
        grads = torch.autograd.grad(y, [x, *params], dy)
    assert failing.calls == 1
    # float64 reference: the same function differentiated by autograd
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    f64 = [None if t is None else t.double() for t in fixed]
    y64 = reference_bin(x64, *p64, *f64, eps=EPS)
    expected = torch.autograd.grad(y64, [x64, *p64], dy.double())
    for name, g, e in zip(("dx", "drho", "dw_b", "db_b", "dw_i", "db_i"), grads, expected):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=name)
    # without fallback=True the error reaches the caller
    reset_triton_fallback()
    y = tb.TritonBIN.apply(x, *params, *fixed, None, 0.1, EPS, mode, False)
    with pytest.raises(RuntimeError, match="simulated"):
        torch.autograd.grad(y, [x], dy)


@needs_interpreter
def test_auto_layer_survives_a_failing_backward(monkeypatch):
    _choose_triton_until_failure(monkeypatch)
    monkeypatch.setattr(tb, "triton_bin_backward", _raise("triton_bin_backward"))
    torch.manual_seed(3)
    layer = MetaBIN2d(3, rho_init=0.6).train()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = layer(x)  # Triton forward (interpreter)
    with pytest.warns(RuntimeWarning, match="backward"):
        y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = MetaBIN2d(3, rho_init=0.6, backend="composite").train()
    ref.load_state_dict({k: v for k, v in layer.state_dict().items()}, strict=True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.rho.grad, ref.rho.grad, rtol=1e-4, atol=1e-5)
    assert resolve_backend(x) == "fused"
