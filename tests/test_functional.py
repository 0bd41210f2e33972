"""The BIN math (both backends) against torch's own BatchNorm and InstanceNorm in float64."""

import pytest
import torch
import torch.nn.functional as F
from reference import reference_bin, reference_bin_by_formula

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d
from metabin_layers.functional import batch_instance_norm

BACKENDS = ["fused", "composite"]
SHAPES = [(MetaBIN1d, (5, 3, 7)), (MetaBIN2d, (4, 3, 5, 6)), (MetaBIN3d, (3, 2, 3, 4, 5))]


def _randomize(m, rho_low=0.0):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "rho":
                p.uniform_(rho_low, 1.0)
            else:
                p.uniform_(-1.5, 1.5)


def _params(m):
    return [m.rho, m.weight, m.bias, m.in_weight, m.in_bias]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,shape", SHAPES)
def test_train_forward_backward_matches_float64_reference(backend, cls, shape):
    m = cls(shape[1], backend=backend)
    _randomize(m)
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    y = m(x)
    xd = x.detach().double().requires_grad_()
    ps = [p.detach().double().requires_grad_() for p in _params(m)]
    ref = reference_bin(xd, *ps)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(shape)
    got = torch.autograd.grad(y, [x, *_params(m)], dy)
    want = torch.autograd.grad(ref, [xd, *ps], dy.double())
    for name, g, w in zip(["x", "rho", "weight", "bias", "in_weight", "in_bias"], got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_uses_running_stats_for_bn_and_instance_stats_for_in(backend):
    m = MetaBIN2d(3, backend=backend)
    _randomize(m)
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(2, 3, 4, 4).requires_grad_()
    y = m(x)
    xd = x.detach().double().requires_grad_()
    ref = reference_bin(xd, *_params(m), m.running_mean, m.running_var)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    (gr,) = torch.autograd.grad(ref, xd, dy.double())
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4)
    # The IN branch has no running statistics: a batch of one sample still works in eval.
    assert m(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


def test_fused_backward_equals_composite_backward():
    x = torch.randn(6, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(4, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    dy = torch.randn(6, 4, 5, 3, dtype=torch.float64)
    grads = {}
    for backend in BACKENDS:
        y = batch_instance_norm(x, *params, backend=backend)
        grads[backend] = torch.autograd.grad(y, [x, *params], dy)
    for a, b in zip(grads["fused"], grads["composite"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_gradcheck_both_backends_and_double_backward_of_composite(use_batch_stats):
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(2, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    for backend in BACKENDS:
        fn = lambda x, *p: batch_instance_norm(  # noqa: E731
            x, *p, running_mean=rm, running_var=rv, use_batch_stats=use_batch_stats, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (x, *params))
    comp = lambda x, *p: batch_instance_norm(  # noqa: E731
        x, *p, running_mean=rm, running_var=rv, use_batch_stats=use_batch_stats, backend="composite"
    )
    assert torch.autograd.gradgradcheck(comp, (x, *params))


def test_fused_backend_refuses_double_backward():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    rho = torch.rand(2, requires_grad=True)
    y = batch_instance_norm(x, rho, backend="fused")
    (g,) = torch.autograd.grad(y.square().sum(), rho, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_update_like_batchnorm(backend):
    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    m = MetaBIN2d(3, momentum=0.3, backend=backend)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 3 + 1
        bn(x)
        m(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == 3


def test_cumulative_average_when_momentum_is_none():
    bn = torch.nn.BatchNorm2d(2, momentum=None)
    m = MetaBIN2d(2, momentum=None)
    xs = [torch.randn(3, 2, 4, 4) + i for i in range(4)]
    for x in xs:
        bn(x)
        m(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    # Direct formula: the plain mean of the batch means / unbiased variances.
    means = torch.stack([x.double().mean((0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(m.running_mean.double(), means, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hold", "eval"])
def test_hold_and_eval_modes_leave_running_stats_untouched(mode):
    m = MetaBIN2d(3, stats_mode=mode)
    _randomize(m)
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
    before = (m.running_mean.clone(), m.running_var.clone())
    x = torch.randn(4, 3, 4, 4)
    y = m(x)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert int(m.num_batches_tracked) == 0
    stats = (None, None) if mode == "hold" else (m.running_mean, m.running_var)
    torch.testing.assert_close(y.double(), reference_bin(x, *_params(m), *stats), rtol=1e-5, atol=1e-5)


def test_rho_one_is_batchnorm_and_rho_zero_is_instancenorm():
    x = torch.randn(4, 3, 6, 6)
    m = MetaBIN2d(3, rho_init=1.0)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    m = MetaBIN2d(3, rho_init=0.0)
    torch.testing.assert_close(m(x), F.instance_norm(x), rtol=1e-5, atol=1e-5)


def test_affine_false_and_no_running_stats():
    m = MetaBIN2d(3, affine=False, track_running_stats=False, rho_init=0.3)
    assert m.weight is None and m.in_weight is None and m.running_mean is None
    x = torch.randn(4, 3, 5, 5)
    ref = reference_bin(x, m.rho, None, None, None, None)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    m.eval()  # no running statistics: batch statistics in eval too, like nn.BatchNorm
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_statistics_are_stable_for_large_offsets():
    # var of x + 1e4 must stay the variance of x; E[x^2]-E[x]^2 in float32 would lose it.
    x = torch.randn(8, 2, 16, 16) * 0.1 + 1e4
    m = MetaBIN2d(2, rho_init=0.5)
    y = m(x)
    ref = reference_bin(x.double(), m.rho, m.weight, m.bias, m.in_weight, m.in_bias)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-2)
    unbiased = x.double().var((0, 2, 3))
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * unbiased, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_float32_statistics(dtype):
    m = MetaBIN2d(4, rho_init=0.5)
    _randomize(m)
    x = torch.randn(4, 4, 6, 6).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype
    ref = reference_bin(x.detach(), *_params(m))
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and m.rho.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 1, 1), (4, 3, 2, 1), (8, 7, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_input_gradient_with_few_spatial_values(backend, dtype, shape):
    # Few spatial values make a_I large (1 / sqrt(eps) at one value): the input gradient is then a
    # small difference of two terms of size a_I * dy, which must be formed before rounding to the
    # input's dtype. Reference: the float64 definition on the same (rounded) input.
    gen = torch.Generator().manual_seed(3)
    c = shape[1]
    params = [torch.rand(c, generator=gen)] + [torch.randn(c, generator=gen) for _ in range(4)]
    x = (torch.randn(shape, generator=gen) * 2 + 0.7).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    # the functional form: the full BIN map, also at one spatial value (the layers use BN alone there)
    (dx,) = torch.autograd.grad(batch_instance_norm(x, *params, backend=backend), x, dy)
    xd = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference_bin_by_formula(xd, *params), xd, dy.double())
    assert dx.dtype == dtype
    # the rounding of dx itself, relative to its largest entry (plus the statistics' rounding at M = 1)
    tol = (4e-3 if dtype == torch.float16 else 3e-2) * (10 if shape[2] * shape[3] == 1 else 1)
    err = (dx.double() - want).abs().max() / want.abs().max().clamp_min(1.0)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_input(backend):
    m = MetaBIN2d(5, backend=backend)
    _randomize(m)
    x = torch.randn(3, 5, 4, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xd = x.detach().double().requires_grad_()
    ref = reference_bin(xd, *_params(m))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    (gr,) = torch.autograd.grad(ref, xd, dy.double())
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4)


def test_functional_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    rho = torch.ones(3)
    with pytest.raises(ValueError, match="backend"):
        batch_instance_norm(x, rho, backend="cuda-magic")
    with pytest.raises(ValueError, match="spatial"):
        batch_instance_norm(torch.randn(2, 3), rho)
    with pytest.raises(ValueError, match="running_mean"):
        batch_instance_norm(x, rho, use_batch_stats=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_instance_norm(torch.randn(1, 3, 1, 1), rho)


def test_auto_backend_resolution_and_environment_override(monkeypatch):
    from metabin_layers.functional import resolve_backend

    x = torch.randn(3, 2, 4, 4)
    monkeypatch.delenv("METABIN_BACKEND", raising=False)
    assert resolve_backend(x) == "fused"  # CPU tensors never pick Triton automatically
    assert resolve_backend(x, "composite") == "composite"
    # Forcing the composite path is observable: only it is differentiable twice.
    monkeypatch.setenv("METABIN_BACKEND", "composite")
    m = MetaBIN2d(2, rho_init=0.5)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m(xr).square().sum(), m.rho, create_graph=True)
    g.sum().backward()
    assert xr.grad is not None
    monkeypatch.setenv("METABIN_BACKEND", "fused")
    (g,) = torch.autograd.grad(m(xr).square().sum(), m.rho, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    monkeypatch.setenv("METABIN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="METABIN_BACKEND"):
        m(x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(x, "magic")


def test_triton_backend_matches_reference_in_the_interpreter():
    pytest.importorskip("triton")
    from metabin_layers.kernels import is_available

    x = torch.randn(3, 4, 5, 3, requires_grad=True)
    if not is_available(x):
        pytest.skip("Triton's interpreter is not active (a GPU machine runs tests/test_triton_kernels.py)")
    m = MetaBIN2d(4, backend="triton")
    _randomize(m)
    y = m(x)
    xd = x.detach().double().requires_grad_()
    ps = [p.detach().double().requires_grad_() for p in _params(m)]
    ref = reference_bin(xd, *ps)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *_params(m)], dy)
    want = torch.autograd.grad(ref, [xd, *ps], dy.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    ref_bn = torch.nn.BatchNorm2d(4)
    ref_bn(x.detach())
    torch.testing.assert_close(m.running_var, ref_bn.running_var)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    import metabin_layers.kernels as kernels

    monkeypatch.setattr(kernels, "is_available", lambda x=None: False)
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA tensor"):
        batch_instance_norm(torch.randn(2, 3, 4, 4), torch.ones(3), backend="triton")
