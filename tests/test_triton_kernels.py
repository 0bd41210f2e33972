"""The Triton BIN kernels against the float64 definition and against the fused backend.

Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here, before
Triton is imported (Triton fixes the mode at import). With CUDA the ``gpu`` tests run the same
checks with compiled kernels, and the interpreter tests skip (unless TRITON_INTERPRET=1 was set
by the user, in which case it is the other way round).
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

pytest.importorskip("triton")

from reference import reference_bin_by_formula  # noqa: E402

from metabin_layers import kernels  # noqa: E402
from metabin_layers.functional import batch_instance_norm  # noqa: E402
from metabin_layers.kernels import triton_bin as tb  # noqa: E402

EPS = 1e-5
needs_interpreter = pytest.mark.skipif(not tb.INTERPRET, reason="Triton was imported without TRITON_INTERPRET=1 (compiled mode)")
needs_compiled_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or tb.INTERPRET, reason="needs CUDA and Triton in compiled mode"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MODES = ["update", "hold", "eval"]
dtype_id = lambda d: str(d).split(".")[-1]  # noqa: E731

# (shape, layout): "nchw" contiguous, "cl" channels-last; "sliced" a spatial slice whose
# spatial axes still collapse into one stride (read in place), "cropped" one whose do not (copied),
# "channels" every other channel of a wider tensor
CASES = [
    ((2, 3, 4, 5), "nchw"),
    ((3, 4, 7), "nchw"),
    ((3, 4, 7), "cl"),
    ((2, 5, 1, 1), "nchw"),  # M = 1 with both branches: the IN branch is its bias alone
    ((4, 8, 3, 3), "cl"),
    ((1, 67, 5, 3), "nchw"),  # N = 1, C = 67: partial channel blocks
    ((2, 67, 3, 3), "cl"),
    ((2, 3, 2, 3, 4), "nchw"),
    ((2, 3, 2, 3, 4), "cl"),
    ((2, 3, 4, 5), "sliced"),
    ((2, 3, 4, 5), "cropped"),
    ((2, 3, 4, 5), "channels"),
]
case_id = lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}"  # noqa: E731


def _make_x(shape, layout, dtype, device, gen, scale=1.5, offset=0.0):
    n, c, *spatial = shape
    if layout == "sliced":
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen)[..., ::2]
    elif layout == "cropped":
        x = torch.randn(shape[:-1] + (shape[-1] + 1,), generator=gen)[..., 1:]
    elif layout == "channels":
        x = torch.randn((n, 2 * c, *spatial), generator=gen)[:, ::2]
    elif layout == "cl":
        x = torch.randn((n, *spatial, c), generator=gen).movedim(-1, 1)
    else:
        x = torch.randn(shape, generator=gen)
    return (x * scale + offset).to(device=device, dtype=dtype)  # elementwise ops keep the strides


class Problem:
    """Inputs of one kernel call and the float64 truth for them."""

    def __init__(self, shape, layout, dtype, mode, device="cpu", seed=0, momentum=0.1, scale=1.5, offset=0.0, affine=True):
        gen = torch.Generator().manual_seed(seed)
        c = shape[1]
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.x = _make_x(shape, layout, dtype, device, gen, scale, offset)
        self.params = [
            t.to(device=device, dtype=pdtype)
            for t in (torch.rand(c, generator=gen), *(torch.randn(c, generator=gen) for _ in range(4)))
        ]
        if not affine:
            self.params[1:] = [None] * 4
        self.running = [
            (torch.randn(c, generator=gen) * scale + offset).to(device, pdtype),
            (torch.rand(c, generator=gen) + 0.5).to(device, pdtype) * scale**2,
        ]
        self.tracked = torch.tensor(3, device=device)
        self.dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        self.mode, self.momentum = mode, momentum

    def run(self, batch_only=False, needs=(True,) * 6):
        """``y``, the gradients (None where not asked for) and the buffers, through TritonBIN."""
        x = self.x.detach().clone().requires_grad_(needs[0])  # clone keeps the strides of a dense x
        ps = [None if p is None else p.clone().requires_grad_(k) for p, k in zip(self.params, needs[1:])]
        rm, rv, nbt = self.running[0].clone(), self.running[1].clone(), self.tracked.clone()
        y = tb.TritonBIN.apply(x, *ps, rm, rv, nbt, self.momentum, EPS, self.mode, batch_only)
        leaves = [t for t in (x, *ps) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, leaves, self.dy, allow_unused=True))
        out = [next(grads) if t is not None and t.requires_grad else None for t in (x, *ps)]
        return y, out, (rm, rv, nbt)

    def truth(self, batch_only=False):
        """float64 ``y``, gradients and buffers, from the definition by autograd."""
        x = self.x.detach().double().requires_grad_()
        c = x.shape[1]
        fill = (torch.ones(c), torch.zeros(c), torch.ones(c), torch.zeros(c))
        ps = [(p if p is not None else f).detach().double().requires_grad_() for p, f in zip(self.params, (None, *fill))]
        rho = torch.ones_like(ps[0]) if batch_only else ps[0]
        running = self.running if self.mode == "eval" else None
        y = reference_bin_by_formula(x, rho, *ps[1:], running=running, eps=EPS)
        grads = torch.autograd.grad(y, [x, *ps], self.dy.double(), allow_unused=True)
        rm, rv, nbt = (t.clone() for t in self.running + [self.tracked])
        if self.mode == "update":
            dims = (0,) + tuple(range(2, x.dim()))
            nbt = nbt + 1
            f = 1.0 / float(nbt) if self.momentum is None else self.momentum
            rm = (1 - f) * rm.double() + f * x.detach().mean(dims)
            rv = (1 - f) * rv.double() + f * x.detach().var(dims, correction=1)
        return y.detach(), grads, (rm, rv, nbt)


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def _close(actual, expected, tol, what):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    bound = tol * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def _same_layout(a, b):
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def check(problem, batch_only=False, io_tol=None):
    """The kernels' outputs, gradients and buffers against the float64 truth."""
    y, grads, buffers = problem.run(batch_only)
    y_ref, g_ref, b_ref = problem.truth(batch_only)
    dtype = problem.x.dtype
    acc_tol = _tol(torch.float64 if dtype == torch.float64 else torch.float32)
    io_tol = io_tol or _tol(dtype)
    assert y.dtype == dtype and grads[0].dtype == dtype
    if problem.x.is_contiguous() or problem.x.movedim(1, -1).is_contiguous():
        assert _same_layout(y, problem.x) and _same_layout(grads[0], problem.x), (y.stride(), problem.x.stride())
    _close(y, y_ref, io_tol, "y")
    _close(grads[0], g_ref[0], io_tol, "dx")
    names = ("drho", "dw_b", "db_b", "dw_i", "db_i")
    for name, g, e, p in zip(names, grads[1:], g_ref[1:], problem.params):
        if p is None:
            assert g is None, name
        elif batch_only and name == "drho":
            assert g is None, "rho gets no gradient when only the batch branch exists"
        else:
            assert g.dtype == p.dtype, name
            _close(g, e, acc_tol, name)
    for name, t, e in zip(("running_mean", "running_var"), buffers[:2], b_ref[:2]):
        if problem.mode == "update":
            _close(t, e, acc_tol, name)
        else:
            assert torch.equal(t, e), f"{name} changed in mode {problem.mode!r}"
    assert int(buffers[2]) == int(b_ref[2]), "num_batches_tracked"
    return y, grads, buffers


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, mode, dtype):
    shape = case[0]
    io_tol = None
    if math.prod(shape[2:]) == 1 and dtype != torch.float64:
        # M = 1: dx = a_I (dy - mean dy) + ... cancels terms of size a_I ~ 1 / sqrt(eps) in fp32
        io_tol = max(_tol(dtype), 1e-3)
    check(Problem(*case, dtype, mode), io_tol=io_tol)


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,layout", [((4, 67, 1), "nchw"), ((3, 5, 1, 1), "cl")])
def test_batch_branch_only(shape, layout, mode):
    """One spatial value: the layer is its batch branch; rho gets no gradient, the IN affine 0."""
    _, grads, _ = check(Problem(shape, layout, torch.float32, mode), batch_only=True)
    assert torch.equal(grads[4], torch.zeros_like(grads[4])) and torch.equal(grads[5], torch.zeros_like(grads[5]))


@needs_interpreter
@pytest.mark.parametrize("mode", ["update", "eval"])
def test_without_affine(mode):
    check(Problem((3, 6, 4, 4), "cl", torch.float32, mode, affine=False))


@needs_interpreter
def test_large_feature_map():
    """A 256x300 map: many reduction tiles and spatial splits per (n, c)."""
    problem = Problem((1, 2, 256, 300), "nchw", torch.float32, "update", offset=3.0)
    p = tb.plan(1, 2, 256 * 300, False, 4, True, tb.INTERPRETER_SMS)
    assert p.splits > 1 and p.apply_splits > 1
    check(problem)


@needs_interpreter
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fp16_large_mean_small_variance(layout):
    """Mean 100, spread 0.1 in fp16: E[x^2] - E[x]^2 loses every digit of the variance (in fp32
    too); the shifted Welford sums keep it. ``momentum=1`` puts the batch variance itself into
    ``running_var``."""
    problem = Problem((4, 8, 12, 10), layout, torch.float16, "update", momentum=1.0, scale=0.1, offset=100.0)
    _, _, (_, rv, _) = check(problem)
    dims = (0, 2, 3)
    var = problem.x.double().var(dims)
    assert (rv.double() - var).abs().max() <= 1e-5 * var.max()


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_fp16_beyond_256(mode):
    """|x| of 300 +- 50: x^2 overflows fp16 (the kernels accumulate in fp32)."""
    check(Problem((2, 8, 6, 5), "cl", torch.float16, mode, scale=50.0, offset=300.0))


@needs_interpreter
def test_cumulative_average_over_steps():
    """``momentum=None``: the running statistics are the plain average of the batches so far,
    from ``num_batches_tracked`` on the device."""
    gen = torch.Generator().manual_seed(5)
    c = 5
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.tensor(0)
    means, variances = [], []
    for step in range(3):
        x = torch.randn(3, c, 4, 4, generator=gen) * (step + 1) + step
        rho = torch.rand(c, generator=gen)
        tb.TritonBIN.apply(x, rho, None, None, None, None, rm, rv, nbt, None, EPS, "update", False)
        means.append(x.double().mean((0, 2, 3)))
        variances.append(x.double().var((0, 2, 3)))
        assert int(nbt) == step + 1
        _close(rm, torch.stack(means).mean(0), 1e-5, f"running_mean after {step + 1}")
        _close(rv, torch.stack(variances).mean(0), 1e-5, f"running_var after {step + 1}")


# Tiny tiles and a wide (pretend) GPU: the plans split the spatial axis, group samples, tile
# the batch statistics and block the channels, so every merge path runs on small inputs.
SMALL_PLANS = {
    "nchw": ((5, 2, 16, 16), {"WORK_PER_STAT": 16, "INTERPRETER_SMS": 16}),
    "cl": ((4, 40, 3, 5), {"WORK_PER_STAT": 1, "INTERPRETER_SMS": 8, "CL_ROW_BYTES": 64}),
}


@pytest.fixture
def small_plans(monkeypatch):
    def shrink(layout):
        for name, value in {"REDUCE_TILE": 64, "APPLY_WARPS": 1, "STAT_TILE": 4, **SMALL_PLANS[layout][1]}.items():
            monkeypatch.setattr(tb, name, value)
        tb.plan.cache_clear()
        return SMALL_PLANS[layout][0]

    yield shrink
    tb.plan.cache_clear()


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_split_and_grouped_plans(small_plans, layout, mode):
    shape = small_plans(layout)
    n, c, m = shape[0], shape[1], shape[2] * shape[3]
    aligned = layout == "nchw" and m % 16 == 0  # channels-last rows of 40 fp32 are not 16-byte multiples
    p = tb.plan(n, c, m, layout == "cl", 4, aligned, tb.INTERPRETER_SMS)
    assert p.splits > 1 and p.apply_splits > 1, p
    assert 1 < p.group < n and p.block_n < n, p
    assert p.reduce_block[0] < c and p.apply_block[0] < c, p  # several channel blocks
    check(Problem(shape, layout, torch.float32, mode, momentum=None, offset=50.0))


@needs_interpreter
def test_bitwise_repeatable(small_plans):
    """Fixed-order reductions, no atomics: two runs give the same bits."""
    problem = Problem(small_plans("nchw"), "nchw", torch.float32, "update")
    first, second = problem.run(), problem.run()
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@needs_interpreter
def test_only_rho_grad_and_expanded_dy():
    """The meta step: a gradient for rho alone (no dx), through ``y.sum()`` (an expanded dy)."""
    problem = Problem((3, 4, 5, 2), "cl", torch.float32, "hold")
    problem.dy = torch.ones(()).expand(problem.x.shape)
    _, grads, _ = problem.run(needs=(False, True, False, False, False, False))
    assert grads[0] is None and all(g is None for g in grads[2:])
    _close(grads[1], problem.truth()[1][1], 1e-4, "drho")


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_agrees_with_fused_backend(mode, dtype):
    problem = Problem((4, 6, 5, 5), "cl", dtype, mode)
    rho, w_b, b_b, w_i, b_i = problem.params
    outs = []
    for backend in ("triton", "fused"):
        rm, rv = (t.clone() for t in problem.running)
        y = batch_instance_norm(
            problem.x, rho, w_b, b_b, w_i, b_i, rm, rv, use_batch_stats=mode != "eval",
            update_running_stats=mode == "update", backend=backend,
        )  # fmt: skip
        outs.append((y, rm, rv))
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for what, a, b in zip(("y", "running_mean", "running_var"), *outs):
        _close(a, b, tol if what == "y" else 1e-5, what)


@needs_interpreter
def test_forward_contract():
    problem = Problem((2, 3, 4, 5), "cl", torch.float16, "update")
    rm, rv, nbt = problem.running[0].clone(), problem.running[1].clone(), problem.tracked.clone()
    y, ws = tb.triton_bin_forward(problem.x, *problem.params, rm, rv, nbt, 0.1, EPS, "update")
    assert y.dtype == torch.float16 and _same_layout(y, problem.x)
    p = tb.plan(2, 3, 20, True, 2, False, tb.INTERPRETER_SMS)
    assert ws.dtype == torch.float32 and ws.numel() == p.workspace
    assert tb.triton_bin_forward(problem.x.double(), *problem.params, rm, rv, nbt, 0.1, EPS, "hold")[1].dtype == torch.float64
    with pytest.raises(ValueError, match="mode"):
        tb.triton_bin_forward(problem.x, *problem.params, rm, rv, nbt, 0.1, EPS, "train")
    with pytest.raises(ValueError, match="running_mean"):
        tb.triton_bin_forward(problem.x, *problem.params, None, None, None, 0.1, EPS, "eval")
    with pytest.raises(ValueError, match="num_batches_tracked"):
        tb.triton_bin_forward(problem.x, *problem.params, rm, rv, None, None, EPS, "update")
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        tb.triton_bin_forward(problem.x[:, :, 0, 0], *problem.params, rm, rv, nbt, 0.1, EPS, "hold")
    with pytest.raises(TypeError, match="supports"):
        tb.triton_bin_forward(problem.x.int(), *problem.params, rm, rv, nbt, 0.1, EPS, "hold")


def test_plans_are_cached_per_problem():
    a = tb.plan(8, 64, 256, False, 4, True, 132)
    assert tb.plan(8, 64, 256, False, 4, True, 132) is a
    assert a.workspace == (2 * a.splits + 2) * 8 * 64 + 2 * 64 + 1
    assert a.per_split % a.reduce_block[1] == 0 and a.splits * a.per_split >= 256
    assert a.apply_per_split % a.apply_block[1] == 0 and a.apply_splits * a.apply_per_split >= 256


def test_is_available():
    x = torch.randn(2, 3, 4)
    assert kernels.is_available()
    assert kernels.is_available(x) == tb.INTERPRET  # CPU tensors need the interpreter
    assert not kernels.is_available(torch.randn(2, 3))
    assert not kernels.is_available(x.int())
    assert kernels.TritonBIN is tb.TritonBIN and kernels.plan is tb.plan and tb.is_available is kernels.is_available


GPU_CASES = CASES + [((8, 64, 28, 28), "nchw"), ((8, 64, 28, 28), "cl"), ((2, 4, 4096, 8), "nchw"), ((64, 256, 7, 7), "cl")]


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_matches_reference_cuda(case, mode, dtype):
    check(Problem(*case, dtype, mode, device="cuda"))


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_mean_and_repeat_cuda(layout):
    problem = Problem((4, 16, 64, 64), layout, torch.float16, "update", device="cuda", scale=0.1, offset=100.0)
    first = check(problem)
    second = problem.run()
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.gpu
@needs_compiled_cuda
def test_batch_branch_only_cuda():
    check(Problem((32, 512, 1, 1), "nchw", torch.float32, "update", device="cuda"), batch_only=True)
