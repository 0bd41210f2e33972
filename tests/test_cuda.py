"""CUDA correctness: every backend against float64 references on the GPU (``pytest -m gpu``).

Every test here is marked ``gpu`` and skips without CUDA. Covered: the three backends in
fp32 / fp16 / bf16, NCHW and channels_last, odd shapes (C not a multiple of any tile, one
spatial position, a large spatial extent), the statistics modes update / hold / eval with the
running statistics, SyncMetaBIN's collective path on a one-rank NCCL group, ``torch.compile`` of
a converted model on each backend, CUDA-graph capture of a layer on the Triton kernels, and
``backend="auto"``'s choice on CUDA.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import reference_bin_by_formula as reference64
from torch import nn

import metabin_layers
from metabin_layers import MetaBIN2d, convert_bn_to_metabin, kernels
from metabin_layers.functional import BACKENDS, batch_instance_norm, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W): C = 67 is no multiple of any tile; 1x1 spatial; a large spatial extent; ResNet-50 layer3
SHAPES = [(8, 67, 5, 7), (6, 5, 1, 1), (2, 4, 256, 300), (16, 256, 16, 8)]


def _backends():
    out = ["fused", "composite"]
    if kernels.is_available():
        out.append("triton")
    return out


def _err(actual, expected):
    """max |actual - expected| relative to max(1, max |expected|)."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def _io_tol(dtype):
    return {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use_batch", [True, False], ids=["batch", "running"])
def test_backend_matches_float64(backend, dtype, layout, shape, use_batch):
    gen = torch.Generator().manual_seed(sum(shape) * 7 + len(layout))
    n, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + 0.7).to("cuda", dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = [torch.rand(c, generator=gen)] + [torch.randn(c, generator=gen) for _ in range(4)]
    params = [p.cuda().requires_grad_() for p in params]
    running = (torch.randn(c, generator=gen).cuda() + 0.7, torch.rand(c, generator=gen).cuda() * 4 + 0.5)
    dy = torch.randn(shape, generator=gen).to("cuda", dtype)
    xg = x.detach().requires_grad_()
    y = batch_instance_norm(
        xg, *params, running_mean=running[0], running_var=running[1], use_batch_stats=use_batch, backend=backend
    )
    grads = torch.autograd.grad(y, [xg, *params], dy)
    assert y.dtype == dtype and grads[0].dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = reference64(x64, *p64, running=None if use_batch else running)
    g64 = torch.autograd.grad(y64, [x64, *p64], dy.double())
    assert _err(y, y64) <= _io_tol(dtype), "y"
    dx_tol = _io_tol(dtype) * (10 if shape[2] * shape[3] == 1 else 1)  # M = 1: a_I ~ 1/sqrt(eps) amplifies rounding
    assert _err(grads[0], g64[0]) <= dx_tol, "dx"
    for name, g, e in zip(("drho", "dw_b", "db_b", "dw_i", "db_i"), grads[1:], g64[1:]):
        assert _err(g, e) <= 1e-3, name


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_statistics_modes_and_running_stats(backend, layout):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layer = MetaBIN2d(24, rho_init=0.4, backend=backend).cuda().train()
    bn = nn.BatchNorm2d(24).double().train()  # running-statistics reference
    xs = [(torch.randn(8, 24, 9, 7) * 3 + 1).cuda().contiguous(memory_format=fmt) for _ in range(3)]
    for x in xs:  # "update"
        y = layer(x)
        bn(x.double().cpu())
        assert _err(y, reference64(x, layer.rho, layer.weight, layer.bias, layer.in_weight, layer.in_bias)) <= 2e-4
    assert _err(layer.running_mean.cpu(), bn.running_mean) <= 1e-5  # the reference ran on the CPU
    assert _err(layer.running_var.cpu(), bn.running_var) <= 1e-5
    assert int(layer.num_batches_tracked) == 3
    saved = (layer.running_mean.clone(), layer.running_var.clone())
    layer.stats_mode = "hold"  # batch statistics, running ones untouched
    y = layer(xs[0])
    assert _err(y, reference64(xs[0], layer.rho, layer.weight, layer.bias, layer.in_weight, layer.in_bias)) <= 2e-4
    assert torch.equal(layer.running_mean, saved[0]) and torch.equal(layer.running_var, saved[1])
    layer.eval()  # BN branch with the running statistics
    y = layer(xs[1])
    ref = reference64(xs[1], layer.rho, layer.weight, layer.bias, layer.in_weight, layer.in_bias, running=saved)
    assert _err(y, ref) <= 2e-4


def _free_file(tmp_path):
    return f"file://{tmp_path / 'pg_store'}"


@pytest.mark.parametrize("backend", ["fused", "composite"])
def test_sync_metabin_collective_path_on_one_rank(tmp_path, backend):
    """The all-gather path of SyncMetaBIN (NCCL, one rank) equals the plain layer."""
    import torch.distributed as dist

    from metabin_layers._composite import composite_bin
    from metabin_layers._fused import _FusedBIN
    from metabin_layers.distributed import _GroupBatch

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    dist.init_process_group("nccl", init_method=_free_file(tmp_path), rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        group = dist.group.WORLD
        x = (torch.randn(6, 12, 8, 4, device="cuda") * 2 + 0.5).requires_grad_()
        p = [torch.rand(12, device="cuda")] + [torch.randn(12, device="cuda") for _ in range(4)]
        p = [t.requires_grad_() for t in p]
        batch = _GroupBatch(group)
        if backend == "composite":
            y, mu_b, var_b = composite_bin(x, *p, None, None, EPS, batch)
        else:
            y, mu_b, var_b = _FusedBIN.apply(x, *p, None, None, EPS, batch)
        count = batch.count
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *p], dy)
        x64 = x.detach().double().requires_grad_()
        p64 = [t.detach().double().requires_grad_() for t in p]
        y64 = reference64(x64, *p64)
        g64 = torch.autograd.grad(y64, [x64, *p64], dy.double())
        assert count == 6 * 8 * 4
        assert _err(mu_b, x64.detach().mean((0, 2, 3))) <= 1e-5
        assert _err(var_b, x64.detach().var((0, 2, 3), correction=0)) <= 1e-5
        assert _err(y, y64) <= 2e-4
        for name, g, e in zip(("dx", "drho", "dw_b", "db_b", "dw_i", "db_i"), grads, g64):
            assert _err(g, e) <= 1e-3, name
    finally:
        dist.destroy_process_group()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_torch_compile_of_a_converted_model(monkeypatch, dtype, backend):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions in both runs
    torch.manual_seed(2)
    model = convert_bn_to_metabin(_Net(), rho_init=0.5).cuda().train()
    for layer in model.modules():
        if isinstance(layer, MetaBIN2d):
            layer.backend = backend  # triton: the kernels run as custom ops inside the graph
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 16, device="cuda")
    target = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out_c = compiled(x)
        out_e = eager(x)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    assert _err(out_c.float(), out_e.float()) <= tol
    F.cross_entropy(out_c.float(), target).backward()
    F.cross_entropy(out_e.float(), target).backward()
    for (name, pc), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        assert _err(pc.grad, pe.grad) <= 10 * tol, name
    for (name, bc), (_, be) in zip(model.named_buffers(), eager.named_buffers()):
        assert _err(bc.float(), be.float()) <= tol, name
    model.eval()
    eager.eval()
    assert _err(compiled(x), eager(x)) <= 2e-3


@pytest.mark.skipif(not kernels.is_available(), reason="needs Triton")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_graph_capture_of_the_triton_layer(layout):
    """fwd + bwd of a training-mode layer on the kernels, captured once and replayed: the same
    outputs, gradients and running statistics (``num_batches_tracked`` counted on the device)."""
    torch.manual_seed(4)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layer = MetaBIN2d(48, rho_init=0.4, backend="triton").cuda().train()
    eager = copy.deepcopy(layer)
    static_x = torch.randn(8, 48, 14, 10, device="cuda").contiguous(memory_format=fmt).requires_grad_()
    static_dy = torch.randn_like(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caching allocator
        for _ in range(2):
            layer(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    layer.load_state_dict(eager.state_dict())  # in place: the captured addresses stay
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(static_dy)
    for step in range(3):
        x = (torch.randn(8, 48, 14, 10, device="cuda") * (step + 1) + step).contiguous(memory_format=fmt)
        static_x.data.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        xe = x.detach().requires_grad_()
        ye = eager(xe)
        ye.backward(static_dy)
        assert torch.equal(static_y, ye), f"y at step {step}"
        assert _err(static_x.grad, xe.grad) <= 1e-6, f"dx at step {step}"
        for (name, pg), (_, pe) in zip(layer.named_parameters(), eager.named_parameters()):
            assert _err(pg.grad, pe.grad) <= 1e-6, f"{name} at step {step}"
        for (name, bg), (_, be) in zip(layer.named_buffers(), eager.named_buffers()):
            assert torch.equal(bg, be), f"{name} at step {step}"
    assert int(layer.num_batches_tracked) == 3


def test_auto_backend_on_cuda_follows_the_validation_record():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    expected = "triton" if (kernels.cuda_validated() and kernels.is_available(x)) else "fused"
    assert resolve_backend(x) == expected
    assert set(BACKENDS) >= {resolve_backend(x)}
    record = kernels.CUDA_VALIDATION
    if record is not None:  # a record names the GPU and date of the run and this library version
        assert {"version", "date", "gpu"} <= set(record)
        assert record["version"] == metabin_layers.__version__ or not kernels.cuda_validated()
