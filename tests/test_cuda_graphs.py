"""A MetaBIN iteration in one CUDA graph: the captured meta step's math (runnable on the CPU by
pretending to capture), what capture refuses, ``CapturedIteration``'s checks, and on a GPU a
replayed training run equal to the eager one."""

import copy

import pytest
import torch
from torch import nn

import metabin_layers.optim as optim_module
from metabin_layers import CapturedIteration, MetaBINOptimizer, base_parameters, convert_bn_to_metabin
from metabin_layers.episode import CyclicInnerLR
from metabin_layers.graphs import _check_inputs


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(1), nn.Linear(8 * 6 * 6, 4))
    return convert_bn_to_metabin(net, rho_init=0.5).double()


def _optimizer(model: nn.Module, **kwargs) -> MetaBINOptimizer:
    base = torch.optim.SGD(base_parameters(model), lr=0.05, momentum=0.9)
    inner = CyclicInnerLR(iters_per_epoch=4, period_per_epoch=1.0)  # relative: beta = ratio * rho lr
    return MetaBINOptimizer(model, base, rho_lr=0.3, inner_lr=inner, **kwargs)


def _meta_step(model: nn.Module, opt: MetaBINOptimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    return opt.meta_step(
        lambda: model(x[:4]).logsumexp(1).mean(),
        lambda: nn.functional.cross_entropy(model(x[4:]), y[4:]),
    )


def test_the_captured_meta_step_reads_the_schedule_from_the_device(monkeypatch):
    # Under capture the step size comes from the tensor before_replay() writes; replaying
    # before_replay() + the captured step gives the eager steps of the cyclic schedule.
    eager_model, graph_model = _model(), _model()
    eager, graph = _optimizer(eager_model), _optimizer(graph_model)
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(8) % 4
    for _ in range(5):
        x = torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=gen)
        want = _meta_step(eager_model, eager, x, y)
        graph.before_replay()
        monkeypatch.setattr(optim_module, "_capturing", lambda device: True)
        got = _meta_step(graph_model, graph, x, y)
        monkeypatch.setattr(optim_module, "_capturing", lambda device: False)
        assert isinstance(got["inner_lr"], torch.Tensor)
        assert float(got["inner_lr"]) == pytest.approx(want["inner_lr"], rel=1e-6)  # float32 on the device
        torch.testing.assert_close(got["meta_test_loss"], want["meta_test_loss"], rtol=1e-6, atol=1e-9)
        for a, b in zip(graph.rhos, eager.rhos):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert graph.num_meta_steps == eager.num_meta_steps == 5
    assert graph.inner_lr.state_dict() == eager.inner_lr.state_dict()
    assert len({round(float(s), 6) for s in [eager.inner_lr.step() for _ in range(4)]}) > 1  # it did cycle


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"second_order": True}, "second_order=True"),
        ({"grad_scaler": torch.amp.GradScaler("cpu")}, "a GradScaler"),
        ({"rho_optimizer": "plain"}, "a rho optimizer that is not fused"),
    ],
)
def test_capture_refuses_what_a_graph_cannot_hold(monkeypatch, kwargs, reason):
    model = _model()
    if kwargs.get("rho_optimizer") == "plain":
        kwargs = {"rho_optimizer": torch.optim.SGD(optim_module.rho_parameters(model), lr=0.1)}
    opt = _optimizer(model, **kwargs)
    rho = [r.detach().clone() for r in opt.rhos]
    monkeypatch.setattr(optim_module, "_capturing", lambda device: True)
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 4
    with pytest.raises(RuntimeError, match=f"cannot be captured in a CUDA graph with {reason}"):
        _meta_step(model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(opt.rhos, rho))


def test_captured_inputs_must_keep_their_shapes_and_dtypes():
    static = [torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)]
    _check_inputs([torch.ones(4, 3), torch.ones(4, dtype=torch.int64)], static)  # matches
    with pytest.raises(ValueError, match=r"input 1 has shape \(5,\) .* captured with \(4,\)"):
        _check_inputs([torch.ones(4, 3), torch.ones(5, dtype=torch.int64)], static)
    with pytest.raises(ValueError, match="input 0 has shape .* torch.float64"):
        _check_inputs([torch.ones(4, 3, dtype=torch.float64), static[1]], static)
    with pytest.raises(ValueError, match="captured with 2 inputs, got 1"):
        _check_inputs([static[0]], static)
    with pytest.raises(TypeError, match="input 1 must be a Tensor, got list"):
        _check_inputs([static[0], [1, 2]], static)


def test_captured_iteration_checks_its_arguments():
    model = _model()
    opt = _optimizer(model)
    with pytest.raises(TypeError, match="optimizer must be a MetaBINOptimizer or None, got SGD"):
        CapturedIteration(opt.base_optimizer, lambda: None)
    with pytest.raises(TypeError, match="iteration must be callable"):
        CapturedIteration(opt, 3)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        CapturedIteration(opt, lambda: None, warmup=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CapturedIteration needs a CUDA device"):
            CapturedIteration(opt, lambda: None)


def _train_step(model: nn.Module, opt: MetaBINOptimizer):
    def iteration(x, y, train_index, test_index):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.backward(loss)
            opt.step()

            def meta_train():
                return model(x[train_index]).float().logsumexp(1).mean()

            def meta_test():
                return nn.functional.cross_entropy(model(x[test_index]).float(), y[test_index])

            out = opt.meta_step(meta_train, meta_test)
        return loss.detach(), out["meta_test_loss"], out["inner_lr"]

    return iteration


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_replayed_iteration_trains_like_the_eager_one():
    eager_model = _model().float().cuda()
    graph_model = copy.deepcopy(eager_model)
    base_lr = torch.tensor(0.05, device="cuda")  # a tensor lr: the scheduler writes it in place

    def optimizer(model):
        base = torch.optim.SGD(base_parameters(model), lr=base_lr.clone(), momentum=0.9, fused=True)
        return MetaBINOptimizer(model, base, rho_lr=0.3, inner_lr=CyclicInnerLR(iters_per_epoch=4))

    eager_opt, graph_opt = optimizer(eager_model), optimizer(graph_model)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda it: 0.9**it) for o in (eager_opt, graph_opt)]
    eager_step, graph_step = _train_step(eager_model, eager_opt), _train_step(graph_model, graph_opt)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(6):
        x = torch.randn(8, 3, 8, 8, generator=gen).cuda()
        perm = torch.randperm(8, generator=gen).cuda()
        batches.append((x, torch.arange(8, device="cuda") % 4, perm[:4], perm[4:]))
    for batch in batches:
        eager_loss, eager_mte, eager_inner_lr = eager_step(*batch)
        schedulers[0].step()
    captured = CapturedIteration(graph_opt, graph_step, *batches[0], warmup=1)  # warmup: iteration 1
    schedulers[1].step()
    for batch in batches[1:]:
        loss, mte, inner_lr = captured(*batch)
        schedulers[1].step()
    torch.cuda.synchronize()
    assert graph_opt.num_meta_steps == eager_opt.num_meta_steps == 6
    assert float(inner_lr) == pytest.approx(eager_inner_lr, rel=1e-6)  # the schedule advanced at each replay
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-2) and float(mte) == pytest.approx(float(eager_mte), rel=1e-2)
    torch.testing.assert_close(base_lr * 0.9**6, graph_opt.param_groups[0]["lr"])  # the scheduled tensor lr
    for (name, a), (_, b) in zip(graph_model.state_dict().items(), eager_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(graph_opt.rhos, eager_opt.rhos):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="a CUDA graph replays fixed shapes"):
        captured(batches[0][0][:4], *batches[0][1:])
