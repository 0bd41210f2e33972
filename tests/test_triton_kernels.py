"""Triton BIN kernels against a float64 reference and against functional._FusedBIN.

Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here, before
Triton is imported (Triton fixes the mode at import). With CUDA the ``gpu`` tests run the same
checks with compiled kernels, and the interpreter tests skip (unless TRITON_INTERPRET=1 was set
by the user, in which case it is the other way round).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from metabin_layers import kernels  # noqa: E402
from metabin_layers.functional import _FusedBIN  # noqa: E402
from metabin_layers.kernels import triton_bin as tb  # noqa: E402

EPS = 1e-5
needs_interpreter = pytest.mark.skipif(not tb.INTERPRET, reason="Triton was imported without TRITON_INTERPRET=1 (compiled mode)")
needs_compiled_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or tb.INTERPRET, reason="needs CUDA and Triton in compiled mode"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, layout): "nchw" contiguous, "cl" channels-last (N, *spatial, C contiguous),
# "strided" a non-dense view (made contiguous by the kernels' wrapper)
CASES = [
    ((2, 3, 4, 5), "nchw"),
    ((3, 4, 7), "nchw"),
    ((3, 4, 7), "cl"),
    ((2, 5, 1, 1), "nchw"),  # M = 1: the IN branch degenerates (var 0, x - mean 0)
    ((4, 8, 3, 3), "cl"),
    ((2, 3, 2, 3, 4), "nchw"),
    ((2, 3, 2, 3, 4), "cl"),
    ((2, 3, 4, 5), "strided"),
]


def _make_x(shape, layout, dtype, device, offset=0.0, gen=None):
    if layout == "strided":
        base = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen)
        x = base[..., ::2]
    elif layout == "cl":
        x = torch.randn((shape[0],) + shape[2:] + (shape[1],), generator=gen).movedim(-1, 1)
    else:
        x = torch.randn(shape, generator=gen)
    x = (x * 1.5 + offset).to(device=device, dtype=dtype)  # elementwise ops keep the strides
    return x


def _params(c, device, gen):
    rho = torch.rand(c, generator=gen)
    w_b = torch.randn(c, generator=gen)
    b_b = torch.randn(c, generator=gen)
    w_i = torch.randn(c, generator=gen)
    b_i = torch.randn(c, generator=gen)
    return [t.to(device) for t in (rho, w_b, b_b, w_i, b_i)]


def _reference(x, params, fixed, use_batch, dy):
    """float64: rho * F.batch_norm + (1 - rho) * F.instance_norm, gradients by autograd."""
    x64 = x.detach().double().requires_grad_()
    rho, w_b, b_b, w_i, b_i = [p.detach().double().requires_grad_() for p in params]
    nd = x.dim()
    view = (1, -1) + (1,) * (nd - 2)
    if use_batch:
        bn = F.batch_norm(x64, None, None, w_b, b_b, training=True, eps=EPS)
    else:
        bn = F.batch_norm(x64, fixed[0].double(), fixed[1].double(), w_b, b_b, training=False, eps=EPS)
    if x[0, 0].numel() > 1:
        inn = F.instance_norm(x64, weight=w_i, bias=b_i, eps=EPS)
    else:  # F.instance_norm refuses one spatial element; same formula by hand
        dims = tuple(range(2, nd))
        var, mean = torch.var_mean(x64, dim=dims, keepdim=True, correction=0)
        inn = (x64 - mean) * torch.rsqrt(var + EPS) * w_i.view(view) + b_i.view(view)
    y = rho.view(view) * bn + (1 - rho.view(view)) * inn
    grads = torch.autograd.grad(y, [x64, rho, w_b, b_b, w_i, b_i], dy.double())
    dims = (0,) + tuple(range(2, nd))
    stats = (x64.detach().mean(dims), x64.detach().var(dims, correction=0))
    return y.detach(), stats, grads


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def _close(actual, expected, tol, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    bound = tol * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def _same_layout(a, b):
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _check(shape, layout, use_batch, dtype, device, offset=0.0, seed=0, compare_fused=True):
    gen = torch.Generator().manual_seed(seed)
    x = _make_x(shape, layout, dtype, device, offset, gen)
    c = shape[1]
    params = _params(c, device, gen)
    fixed = (None, None)
    if not use_batch:
        fixed = ((torch.randn(c, generator=gen) + offset).to(device), (torch.rand(c, generator=gen) + 0.5).to(device))
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if dtype == torch.float64:
        params = [p.double() for p in params]

    xt = x.detach().clone().requires_grad_()  # clone keeps the strides of a dense x
    pt = [p.clone().requires_grad_() for p in params]
    y, mu_b, var_b = tb.TritonBIN.apply(xt, *pt, *fixed, EPS)
    gt = torch.autograd.grad(y, [xt, *pt], dy)

    assert y.dtype == dtype and gt[0].dtype == dtype
    if layout != "strided":
        assert _same_layout(y, x), (y.stride(), x.stride())
        assert _same_layout(gt[0], x), (gt[0].stride(), x.stride())
    for g, p in zip(gt[1:], params):
        assert g.dtype == p.dtype

    y_ref, (mu_ref, var_ref), g_ref = _reference(x, params, fixed, use_batch, dy)
    tol_io = _tol(dtype)
    tol_acc = _tol(torch.float32) if dtype != torch.float64 else _tol(dtype)
    _close(y, y_ref, tol_io, "y")
    if use_batch:
        assert mu_b.dtype == torch.float32 or dtype == torch.float64
        _close(mu_b, mu_ref, tol_acc, "mu_b")
        _close(var_b, var_ref, tol_acc, "var_b")
    else:
        assert mu_b.numel() == 0 and var_b.numel() == 0
    _close(gt[0], g_ref[0], tol_io, "dx")
    for name, a, e in zip(("drho", "dw_b", "db_b", "dw_i", "db_i"), gt[1:], g_ref[1:]):
        _close(a, e, tol_acc, name)

    if compare_fused:
        xf = x.detach().clone().requires_grad_()
        pf = [p.clone().requires_grad_() for p in params]
        yf, muf, varf = _FusedBIN.apply(xf, *pf, *fixed, EPS)
        gf = torch.autograd.grad(yf, [xf, *pf], dy)
        tol_f = 1e-5 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps
        if x[0, 0].numel() == 1 and dtype != torch.float64:
            # M = 1: a_i * x - a_i * mu_nc cancels (a_i ~ 1/sqrt(eps)); both round differently
            tol_f = max(tol_f, 1e-4)
        _close(y, yf, tol_f, "y vs fused")
        if use_batch:
            _close(mu_b, muf, 1e-5, "mu_b vs fused")
            _close(var_b, varf, 1e-5, "var_b vs fused")
        _close(gt[0], gf[0], tol_f, "dx vs fused")
        for name, a, e in zip(("drho", "dw_b", "db_b", "dw_i", "db_i"), gt[1:], gf[1:]):
            _close(a, e, 1e-5, name + " vs fused")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("use_batch", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in CASES])
def test_matches_reference(shape, layout, use_batch, dtype):
    _check(shape, layout, use_batch, dtype, "cpu")


@needs_interpreter
@pytest.mark.parametrize("shape,layout", [((2, 3, 4, 5), "nchw"), ((4, 8, 3, 3), "cl")])
def test_float64(shape, layout):
    _check(shape, layout, True, torch.float64, "cpu")


@needs_interpreter
@pytest.mark.parametrize("split", [None, 2, 3])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_multi_tile_split_and_large_mean(monkeypatch, layout, split):
    """Small tiles force the in-kernel tile loop (Chan combine) and the split-M partials;
    a mean of 1e4 with unit spread breaks E[x^2] - E[x]^2 in fp32 but not Welford/Chan."""
    monkeypatch.setattr(tb, "MAX_TILE", 16)
    if split is not None:
        monkeypatch.setattr(tb, "_split_count", lambda *args: split)
    shape = (2, 3, 9, 11)  # M = 99: 7 tiles of 16 (nchw) / 99 tiles of one position (cl)
    x = _make_x(shape, layout, torch.float32, "cpu", offset=1e4, gen=torch.Generator().manual_seed(1))
    mu, var = tb.instance_stats(x)
    var_ref, mu_ref = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    assert (mu.double() - mu_ref).abs().max() <= 1e-3  # ~ one fp32 ulp at 1e4
    assert (var.double() - var_ref).abs().max() <= 1e-6 * var_ref.abs().max()
    for use_batch in (True, False):
        _check(shape, layout, use_batch, torch.float32, "cpu", offset=100.0, compare_fused=False)


@needs_interpreter
def test_only_rho_grad_and_expanded_dy():
    """Meta step: gradient to rho only (dx not computed); dy from .sum() is an expanded view."""
    gen = torch.Generator().manual_seed(3)
    x = _make_x((3, 4, 5, 2), "cl", torch.float32, "cpu", gen=gen)
    params = _params(4, "cpu", gen)
    rho = params[0].clone().requires_grad_()
    y, _, _ = tb.TritonBIN.apply(x, rho, *params[1:], None, None, EPS)
    (g,) = torch.autograd.grad((y * 1.0).sum() + 0 * y.sum(), [rho])
    _, _, g_ref = _reference(x, params, (None, None), True, torch.ones(x.shape))
    _close(g, g_ref[1], 1e-4, "drho")
    out = tb.triton_bin_backward(
        torch.ones(()).expand(x.shape), x, *params, *tb.triton_bin_forward(x, *params, None, None, EPS)[1:],
        EPS, True, (False, True, False, False, False, False),
    )  # fmt: skip
    assert out[0] is None and out[2] is None and out[5] is None
    _close(out[1], g_ref[1], 1e-4, "drho (direct)")


@needs_interpreter
def test_forward_entry_point_contract():
    gen = torch.Generator().manual_seed(4)
    x = _make_x((2, 3, 4, 5), "nchw", torch.float16, "cpu", gen=gen)
    params = _params(3, "cpu", gen)
    y, mu_b, var_b, mu_nc, inv_nc, scale = tb.triton_bin_forward(x, *params, None, None, EPS)
    assert y.shape == x.shape and y.dtype == torch.float16
    assert mu_b.shape == var_b.shape == (3,)
    assert mu_nc.shape == inv_nc.shape == scale.shape == (2, 3)
    assert all(t.dtype == torch.float32 for t in (mu_b, var_b, mu_nc, inv_nc, scale))
    var_ref, mu_ref = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    _close(mu_nc, mu_ref, 1e-6, "mu_nc")
    _close(inv_nc, torch.rsqrt(var_ref + EPS), 1e-5, "inv_nc")
    rm, rv = torch.zeros(3), torch.ones(3)
    _, mu_f, var_f, *_ = tb.triton_bin_forward(x, *params, rm, rv, EPS)
    assert torch.equal(mu_f, rm) and torch.equal(var_f, rv)


def test_is_available():
    x = torch.randn(2, 3, 4)
    assert kernels.is_available()
    assert kernels.is_available(x) == tb.INTERPRET  # CPU tensors need the interpreter
    assert not kernels.is_available(torch.randn(2, 3))
    assert not kernels.is_available(x.int())
    assert kernels.TritonBIN is tb.TritonBIN and tb.is_available is kernels.is_available
    if not tb.INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tb.triton_bin_forward(x, *[torch.ones(3)] * 5, None, None, EPS)


GPU_CASES = CASES + [((8, 64, 28, 28), "nchw"), ((8, 64, 28, 28), "cl"), ((2, 4, 4096, 8), "nchw")]


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("use_batch", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("shape,layout", GPU_CASES, ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in GPU_CASES])
def test_matches_reference_cuda(shape, layout, use_batch, dtype):
    _check(shape, layout, use_batch, dtype, "cuda")


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("split", [None, 3])
def test_large_mean_cuda(monkeypatch, split):
    if split is not None:
        monkeypatch.setattr(tb, "_split_count", lambda *args: split)
    _check((4, 16, 64, 64), "cl", True, torch.float32, "cuda", offset=1e3, compare_fused=False)
    _check((4, 16, 64, 64), "nchw", True, torch.float32, "cuda", offset=1e3, compare_fused=False)
