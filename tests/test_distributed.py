"""SyncMetaBIN and MetaBINOptimizer under torch.distributed: 2 CPU processes on gloo, loopback only.

Every multi-process check runs inside the workers (a failed assertion there fails the test with
the worker's traceback); each test spawns its processes once.
"""

import copy
import os
import queue
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from metabin_layers import (
    MetaBIN1d,
    MetaBIN2d,
    MetaBIN3d,
    MetaBINAct2d,
    MetaBINOptimizer,
    base_parameters,
    convert_bn_to_metabin,
    metabin_modules,
    rho_parameters,
)
from metabin_layers._collectives import active_group
from metabin_layers.distributed import DistributedStepError, SyncMetaBIN, convert_sync_metabin
from metabin_layers.layers import _MetaBINBase

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, world: int = WORLD, timeout: float = 30.0) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(),) + args, nprocs=WORLD, join=True)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def _close(a, b, msg, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=msg)


# -- (a) the layer: 2 ranks on parts of the batch == the plain layer on the whole batch ---------

LAYER_CASES = [
    # cls, local batch sizes, spatial shape, backend, stats mode, momentum
    (MetaBIN2d, (4, 4), (5, 5), "fused", "update", 0.1),
    (MetaBIN2d, (3, 5), (4, 6), "composite", "update", None),
    (MetaBIN2d, (0, 6), (5, 5), "fused", "update", 0.1),  # an empty rank still takes part
    (MetaBIN2d, (2, 5), (5, 5), "fused", "hold", 0.1),
    (MetaBIN1d, (2, 3), (7,), "fused", "update", 0.1),
    (MetaBIN3d, (2, 2), (3, 3, 3), "composite", "update", 0.1),
    (MetaBINAct2d, (3, 3), (4, 4), "fused", "update", None),
]


def _random_layer(cls, c):
    kwargs = {"act_layer": nn.Tanh} if cls is MetaBINAct2d else {}
    layer = cls(c, **kwargs).double()
    with torch.no_grad():
        for name in ("weight", "in_weight"):
            getattr(layer, name).uniform_(0.5, 1.5)
        for name in ("bias", "in_bias"):
            getattr(layer, name).uniform_(-0.5, 0.5)
        layer.rho.uniform_(0.1, 0.9)
        layer.running_mean.uniform_(-0.1, 0.1)
        layer.running_var.uniform_(0.9, 1.1)
    return layer


def _layer_worker(rank, port):
    _init(rank, port)
    c = 3
    for case, (cls, sizes, spatial, backend, mode, momentum) in enumerate(LAYER_CASES):
        torch.manual_seed(case)  # same tensors on every rank
        plain = _random_layer(cls, c)
        plain.momentum, plain.backend, plain.stats_mode = momentum, backend, mode
        sync = convert_sync_metabin(copy.deepcopy(plain))
        assert type(sync) is SyncMetaBIN and ("act" in sync._modules) == (cls is MetaBINAct2d)
        start = sum(sizes[:rank])
        part = slice(start, start + sizes[rank])
        label = f"case {case} ({cls.__name__}, sizes {sizes}, {backend}, {mode})"
        for it in range(2):  # two steps: running statistics (cumulative average too)
            x = torch.randn((sum(sizes), c) + spatial, dtype=torch.float64)
            g = torch.randn_like(x)
            x_full = x.clone().requires_grad_()
            plain.zero_grad()
            y_full = plain(x_full)
            (y_full * g).sum().backward()
            x_loc = x[part].clone().requires_grad_()
            sync.zero_grad()
            y_loc = sync(x_loc)
            (y_loc * g[part]).sum().backward()  # the sum over ranks is the full-batch loss
            _close(y_loc, y_full[part], f"{label} it {it}: output")
            _close(x_loc.grad, x_full.grad[part], f"{label} it {it}: input grad")
            for name, p in plain.named_parameters():
                got = sync.get_parameter(name).grad
                _close(_sum_over_ranks(got), p.grad, f"{label} it {it}: grad of {name} (summed over ranks)")
            for name, b in plain.named_buffers():  # running statistics: global, on every rank
                _close(sync.get_buffer(name), b, f"{label} it {it}: {name}")
                assert _same_on_all_ranks(sync.get_buffer(name)), (label, name)
        if backend == "composite":  # double backward across ranks (second-order meta steps)
            x = torch.randn((sum(sizes), c) + spatial, dtype=torch.float64)
            v = torch.randn(c, dtype=torch.float64)
            plain.stats_mode = sync.stats_mode = "hold"
            x_full = x.clone().requires_grad_()
            (gr,) = torch.autograd.grad((plain(x_full) * x_full).sum(), plain.rho, create_graph=True)
            want = torch.autograd.grad((gr * v).sum(), [plain.weight, plain.in_weight, x_full])
            x_loc = x[part].clone().requires_grad_()
            (gr_loc,) = torch.autograd.grad((sync(x_loc) * x_loc).sum(), sync.rho, create_graph=True)
            _close(_sum_over_ranks(gr_loc), gr, f"{label}: rho grad (create_graph)")
            got = torch.autograd.grad((gr_loc * v).sum(), [sync.weight, sync.in_weight, x_loc])
            _close(_sum_over_ranks(got[0]), want[0], f"{label}: d2/drho dweight")
            _close(_sum_over_ranks(got[1]), want[1], f"{label}: d2/drho din_weight")
            _close(got[2], want[2][part], f"{label}: d2/drho dx")
    # Evaluation never communicates: rank 0 alone evaluates (a collective would time out).
    plain = _random_layer(MetaBIN2d, c).eval()
    layer = convert_sync_metabin(copy.deepcopy(plain))
    if rank == 0:
        x = torch.randn(2, c, 4, 4, dtype=torch.float64)
        assert torch.equal(layer(x), plain(x))
    dist.barrier()
    dist.destroy_process_group()


def test_sync_layer_on_two_ranks_equals_plain_layer_on_full_batch():
    _spawn(_layer_worker)


def _empty_batches_worker(rank, port):
    from metabin_layers.losses import triplet_loss

    _init(rank, port)
    for backend in ("fused", "composite"):
        for momentum in (0.1, None):
            torch.manual_seed(0)
            layer = convert_sync_metabin(_random_layer(MetaBIN2d, 3))
            layer.backend, layer.momentum = backend, momentum
            before = {name: b.clone() for name, b in layer.named_buffers()}
            x = torch.randn(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)  # every rank empty
            y = layer(x)
            y.sum().backward()
            assert y.shape == x.shape
            for name, b in layer.named_buffers():  # no statistics: nothing written, no NaN
                assert torch.equal(b, before[name]), (backend, momentum, name, b)
            layer(torch.randn(2, 3, 5, 5, dtype=torch.float64))  # a later real batch still counts
            assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
            assert torch.isfinite(layer.running_var).all() and _same_on_all_ranks(layer.running_var)
    # One rank without meta-test samples: the library's losses give it a zero loss in the graph,
    # so every rank takes the same meta step (that rank contributes a zero gradient to the mean).
    torch.manual_seed(1)
    model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(1)), rho_init=0.5, sync=True)
    model = model.double()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=0.5, inner_lr=0.1)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    test = slice(4, 8) if rank == 0 else slice(0, 0)
    out = opt.meta_step(lambda: triplet_loss(model(x[:4]), labels[:4]), lambda: triplet_loss(model(x[test]), labels[test]))
    rho = rho_parameters(model)[0].detach()
    assert torch.isfinite(out["meta_test_loss"]) and torch.isfinite(rho).all() and _same_on_all_ranks(rho)
    dist.barrier()  # no rank tears its group down while the other still talks to it
    dist.destroy_process_group()


def test_every_rank_empty_keeps_running_statistics_and_an_empty_meta_test_rank_steps():
    _spawn(_empty_batches_worker)


def test_the_recipe_sets_a_process_group_timeout(monkeypatch):
    from metabin_layers.reid import train as recipe

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(recipe.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(recipe.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(recipe.dist, "destroy_process_group", lambda: calls.append("destroyed"))
    with recipe.distributed_from_env():
        pass
    assert calls[0][1]["timeout"] == timedelta(minutes=10) and calls[1] == "destroyed"
    calls.clear()
    with recipe.distributed_from_env(timeout=timedelta(seconds=30)):
        pass
    assert calls[0][1]["timeout"] == timedelta(seconds=30)


# -- (b) DDP + MetaBINOptimizer on 2 ranks == one process on the full batch -------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.n1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.n2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        h = F.relu(self.n2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def _make_model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = convert_bn_to_metabin(Tiny(), rho_init=0.6, sync=sync).double()
    with torch.no_grad():
        for m in metabin_modules(model):
            m.weight.uniform_(0.5, 1.5)
            m.in_weight.uniform_(0.5, 1.5)
            m.in_bias.uniform_(-0.5, 0.5)
            m.rho.uniform_(0.2, 0.9)
    return model


def _batches(iters, n=16):
    g = torch.Generator().manual_seed(1)
    for _ in range(iters):
        x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
        # 4 domains, 2 of each in every half batch: every rank holds equal shares of any split, so
        # the mean of the ranks' mean losses is the full-batch mean loss (DDP averages).
        yield x, torch.arange(n) % 3, torch.arange(n) % 4


def _mtr_loss(logits):  # a mean over samples: decomposes over equal halves
    return logits.logsumexp(1).mean() + logits.square().mean()


def _run(net, forward, opt, iters, part):
    for x, y, d in _batches(iters):
        x, y, d = x[part], y[part], d[part]
        opt.zero_grad()
        opt.backward(F.cross_entropy(net(x), y))
        opt.step()
        split = opt.split(d)
        tr, te = split.train_mask, split.test_mask
        opt.meta_step(lambda: _mtr_loss(forward(x[tr])), lambda: F.cross_entropy(forward(x[te]), y[te]))


def _build_opt(model, second_order, **kwargs):
    base = torch.optim.SGD(
        base_parameters(model.module if hasattr(model, "module") else model), lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    return MetaBINOptimizer(model, base, rho_lr=0.5, inner_lr=0.3, second_order=second_order, seed=3, **kwargs)


def _ddp_worker(rank, port):
    _init(rank, port)
    iters = 3
    part = slice(8 * rank, 8 * rank + 8)
    for config in ("optimizer_then_ddp", "ddp_then_optimizer", "second_order"):
        second_order = config == "second_order"
        # the 1-process reference on the full batch (plain layers, no communication)
        ref = _make_model(sync=False)
        ref_opt = _build_opt(ref, second_order, distributed=False)
        _run(ref, ref, ref_opt, iters, slice(None))

        model = _make_model(sync=True)
        if config == "ddp_then_optimizer":
            ddp = nn.parallel.DistributedDataParallel(model)  # rho still requires grad here
            opt = _build_opt(ddp, second_order)  # unwraps ddp.module
            assert opt._rho_in_ddp and opt.model is model
            _run(ddp, ddp, opt, iters, part)  # closures call the DDP wrapper (under no_sync)
        else:
            opt = _build_opt(model, second_order)  # freezes rho, so DDP ignores it
            ddp = nn.parallel.DistributedDataParallel(model)
            assert not opt._rho_in_ddp
            _run(ddp, model, opt, iters, part)  # closures call the unwrapped module
        want = ref.state_dict()
        for k, v in model.state_dict().items():
            _close(v.double(), want[k].double(), f"{config}: {k}")
            assert _same_on_all_ranks(v), f"{config}: {k} differs between ranks"
        assert opt.num_meta_steps == iters
        assert any(not torch.equal(a, b) for a, b in zip(rho_parameters(model), rho_parameters(_make_model(False))))
    # A rank-dependent seed would draw different domain splits: every rank raises the same error.
    bad = _build_opt(_make_model(sync=False), False)
    bad.generator.manual_seed(rank)
    with pytest.raises(ValueError, match="same seed"):
        bad.split(torch.arange(8) % 4)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_metabin_optimizer_on_two_ranks_equals_one_process_on_full_batch():
    _spawn(_ddp_worker)


# -- (c) a rank that fails in a closure: the others get a clear error, not a hang ---------------

TIMEOUT_S = 3.0


def _failing_worker(rank, port, results, release, sync):
    try:
        _init(rank, port, timeout=TIMEOUT_S)
        model = _make_model(sync=sync)
        opt = _build_opt(model, False)
        x = torch.randn(8, 3, 6, 6, dtype=torch.float64)

        def closure(part, phase):
            def loss():
                # sync layers: fail in meta-train (rank 0 waits in a layer's all_gather); plain
                # layers: fail in meta-test (rank 0 waits in the outer rho all_reduce)
                if rank == 1 and phase == ("train" if sync else "test"):
                    raise RuntimeError("rank 1 closure failed")
                return _mtr_loss(model(x[part]))

            return loss

        start = time.monotonic()
        try:
            opt.meta_step(closure(slice(0, 4), "train"), closure(slice(4, 8), "test"))
            results.put((rank, "no error", "", time.monotonic() - start))
        except Exception as err:  # noqa: BLE001
            results.put((rank, type(err).__name__, f"{err} | cause: {err.__cause__}", time.monotonic() - start))
        # The failed rank stays alive (as a rank that skipped a step would): rank 0 must not rely
        # on the connection closing, only on the timeout.
        release.wait(30)
    except Exception as err:  # noqa: BLE001
        results.put((rank, "setup", repr(err), 0.0))
    os._exit(0)  # skip destroy_process_group on a broken group


@pytest.mark.parametrize(
    "sync, where",
    [
        (True, "SyncMetaBIN: all_gather of the batch statistics"),
        pytest.param(False, "MetaBINOptimizer.meta_step: all_reduce of rho's outer gradient", marks=pytest.mark.slow),
    ],
)
def test_failing_rank_gives_timeout_error_not_hang(sync, where):
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_failing_worker, args=(r, port, results, release, sync)) for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < WORLD and time.monotonic() - start < 45:
            try:
                rank, kind, msg, elapsed = results.get(timeout=1)
                got[rank] = (kind, msg, elapsed)
            except queue.Empty:
                pass
    finally:
        release.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    assert set(got) == {0, 1}, f"a rank hung or died: {got}"
    assert got[1][0] == "RuntimeError" and "rank 1 closure failed" in got[1][1]
    kind, msg, elapsed = got[0]
    assert kind == DistributedStepError.__name__, got[0]
    assert f"{where} failed on rank 0 of 2" in msg
    assert "timeout" in msg.lower() or "timed out" in msg.lower()
    assert TIMEOUT_S * 0.5 <= elapsed < TIMEOUT_S + 10, f"rank 0 waited {elapsed:.1f} s"


# -- single process: no process group, or a group of one, is the plain layer ------------------


def _pair(cls=MetaBIN2d, **kw):
    torch.manual_seed(0)
    plain = _random_layer(cls, 3)
    for k, v in kw.items():
        setattr(plain, k, v)
    return plain, convert_sync_metabin(copy.deepcopy(plain))


def _check_equal_to_plain(plain, sync, shape=(4, 3, 5, 5)):
    for train, backend, mode in [(True, "fused", "update"), (True, "composite", "hold"), (False, "fused", "update")]:
        plain.train(train), sync.train(train)
        plain.backend = sync.backend = backend
        plain.stats_mode = sync.stats_mode = mode
        x = torch.randn(shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), sync(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (name, p), q in zip(plain.named_parameters(), sync.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for (name, b), c in zip(plain.named_buffers(), sync.buffers()):
            assert torch.equal(b, c), name


def test_without_process_group_sync_layer_is_the_plain_layer():
    assert active_group() is None
    _check_equal_to_plain(*_pair())
    _check_equal_to_plain(*_pair(MetaBINAct2d))
    _check_equal_to_plain(*_pair(MetaBIN1d), shape=(4, 3, 7))


def test_group_of_one_is_the_plain_layer_and_optimizer_does_not_communicate():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert active_group() is None
        _check_equal_to_plain(*_pair())
        model = _make_model(sync=True)
        opt = _build_opt(model, False, distributed=True)
        assert opt._group() is None
        x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
        split = opt.split(torch.arange(8) % 4)
        assert split.train_mask.sum() == 4
        opt.meta_step(lambda: _mtr_loss(model(x[:4])), lambda: _mtr_loss(model(x[4:])))
    finally:
        dist.destroy_process_group()


def test_convert_shares_tensors_and_keeps_checks_and_keys():
    model = _make_model(sync=False)
    layers = metabin_modules(model)
    params = [dict(m.named_parameters()) for m in layers]
    buffers = [dict(m.named_buffers()) for m in layers]
    keys = list(model.state_dict())
    layers[1].stats_mode, layers[1].backend = "hold", "composite"
    layers[0].eval()
    converted = convert_sync_metabin(model)
    assert converted is model
    new = metabin_modules(model)
    assert [type(m) for m in new] == [SyncMetaBIN, SyncMetaBIN]
    for m, p, b in zip(new, params, buffers):
        assert all(v is p[k] for k, v in m.named_parameters())
        assert all(v is b[k] for k, v in m.named_buffers())
        assert m.process_group is None
    assert (new[1].stats_mode, new[1].backend, new[0].training) == ("hold", "composite", False)
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="expected 2D or 3D or 4D or 5D input"):  # any rank, like SyncBatchNorm
        new[0].train()(torch.randn(2, 4, 5, 5, 5, 5))
    # idempotent; a given group replaces the layers' group
    assert convert_sync_metabin(model) is model and metabin_modules(model)[0] is new[0]
    marker = object()
    convert_sync_metabin(model, process_group=marker)
    assert all(m.process_group is marker for m in metabin_modules(model))
    # the root itself, the act/drop of MetaBINAct2d, and unknown subclasses
    act = MetaBINAct2d(4, act_layer=nn.GELU, drop_layer=nn.Dropout(0.1))
    sync_act = convert_sync_metabin(act)
    assert type(sync_act) is SyncMetaBIN and sync_act.act is act.act and sync_act.drop is act.drop
    assert list(sync_act.state_dict()) == list(act.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(sync_act.eval()(x), act.eval()(x), rtol=0, atol=0)  # drop and act applied
    assert sync_act.rho is act.rho

    class Custom(_MetaBINBase):
        _input_dims = (4,)

    with pytest.warns(UserWarning, match="Custom"):
        convert_sync_metabin(nn.Sequential(Custom(3)))
    with pytest.raises(ValueError, match="sync=True"):
        convert_bn_to_metabin(Tiny(), process_group=marker)


def test_optimizer_picks_up_layers_converted_after_it():
    model = _make_model(sync=False)
    opt = _build_opt(model, False)
    convert_sync_metabin(model)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    seen = []

    def mtr():
        seen.extend(m.stats_mode for m in metabin_modules(model))
        return _mtr_loss(model(x[:4]))

    opt.meta_step(mtr, lambda: _mtr_loss(model(x[4:])))
    assert seen == ["hold", "hold"]
    assert all(isinstance(m, SyncMetaBIN) for m in opt.layers)


def test_distributed_option_is_checked():
    model = _make_model(sync=False)
    with pytest.raises(ValueError, match="initialised process group"):
        _build_opt(model, False, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        _build_opt(model, False, distributed="yes")


def _empty_rank_warning_worker(rank, port):
    _init(rank, port)
    warnings.resetwarnings()  # _init ignores every warning: record them here
    for backend in ("fused", "composite"):
        torch.manual_seed(0)
        layer = convert_sync_metabin(_random_layer(MetaBIN2d, 3))
        layer.backend = backend
        x = torch.randn(0 if rank == 0 else 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            layer(x).sum().backward()
        assert [str(w.message) for w in seen] == [], (rank, backend, [str(w.message) for w in seen])
    dist.barrier()
    dist.destroy_process_group()


def test_an_empty_local_batch_prints_no_degrees_of_freedom_warning():
    _spawn(_empty_rank_warning_worker)
