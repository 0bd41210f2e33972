"""``torch.compile`` keeps a converted model in one graph on every backend: the fused path turns
into the composite ops, the Triton kernels run as the custom ops ``metabin_layers::bin_forward``
/ ``bin_backward`` (their fake implementations give the shapes). The compiled training step
equals the eager one: outputs, gradients and running statistics."""

import copy

import pytest
import torch
from torch import nn

from metabin_layers import MetaBIN1d, MetaBIN2d, convert_bn_to_metabin

BACKENDS = ["fused", "composite", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:MetaBIN1d.*single value per channel")  # the BatchNorm1d's input


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16, momentum=None),  # the cumulative average: num_batches_tracked on the device
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(16),  # one value per channel and sample: the batch branch alone
        nn.Linear(16, 4),
    )


def _converted(backend: str) -> nn.Module:
    if backend == "triton":
        from metabin_layers.kernels import triton_bin as tb

        if not tb.INTERPRET and not torch.cuda.is_available():
            pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = convert_bn_to_metabin(_net(), rho_init=0.5)
    for layer in model.modules():
        if isinstance(layer, (MetaBIN1d, MetaBIN2d)):
            layer.backend = backend
            with torch.no_grad():
                layer.rho.uniform_()
    return model.double().train()  # float64: compiled and eager agree to rounding of 1e-16


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_break_in_a_converted_model(backend):
    torch._dynamo.reset()
    model = _converted(backend)
    explained = torch._dynamo.explain(model)(torch.randn(4, 3, 12, 10, dtype=torch.float64))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_equals_eager(backend):
    torch._dynamo.reset()
    model = _converted(backend)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 12, 10, dtype=torch.float64) + step
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
        compiled(x).square().sum().backward()
        eager(x).square().sum().backward()
        for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert all(int(b) == 2 for name, b in model.named_buffers() if name.endswith("num_batches_tracked"))
    model.eval()
    eager.eval()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-9, atol=1e-10)


def _meta_training(net: nn.Module, model: nn.Module, iterations: int, graphs_after: list) -> list[float]:
    """Base step + meta step per iteration through ``net`` (``model`` eager or compiled); the losses."""
    from torch._dynamo.utils import counters

    from metabin_layers import MetaBINOptimizer, base_parameters

    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.05, momentum=0.9), rho_lr=0.5, inner_lr=0.2)
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(8) % 4
    losses = []
    start = counters["stats"]["unique_graphs"]
    for _ in range(iterations):
        x = torch.randn(8, 3, 12, 10, dtype=torch.float64, generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        opt.backward(loss)
        opt.step()
        out = opt.meta_step(
            lambda: net(x[:4]).logsumexp(1).mean(),
            lambda: nn.functional.cross_entropy(net(x[4:]), y[4:]),
        )
        losses += [float(loss), float(out["meta_train_loss"]), float(out["meta_test_loss"])]
        graphs_after.append(counters["stats"]["unique_graphs"] - start)
    return losses


# The default backend: under compile the fused path runs the composite ops (one test covers both);
# the Triton custom ops under compile: above.
@pytest.mark.parametrize("backend", ["fused"])
def test_compiled_model_trains_with_meta_steps_like_the_eager_one(backend):
    # Three graphs (the base step, the held meta-train forward, the meta-test forward through rho'),
    # compiled in the first iteration and reused after it: no recompilation per step.
    torch._dynamo.reset()
    model = _converted(backend)
    eager = copy.deepcopy(model)
    graphs: list = []
    got = _meta_training(torch.compile(model, backend="aot_eager", fullgraph=True), model, 4, graphs)
    want = _meta_training(eager, eager, 4, [])
    assert got == pytest.approx(want, rel=1e-9)
    assert graphs[0] == graphs[-1] == 3, graphs
    for (name, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
