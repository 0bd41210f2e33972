"""Inputs with a single value per channel and sample ((N, C), spatial size 1): the layer is its BatchNorm.

Squeeze-excite blocks, auxiliary heads on 1x1 maps and BatchNorm1d over token features give a
MetaBIN layer inputs without instance statistics. The layer then uses its batch branch only, in
training, in eval, folded and exported, and warns once. The reference is ``nn.BatchNorm`` with the
same affine and running statistics, in float64.
"""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, MetaBINOptimizer, base_parameters, stats_mode
from metabin_layers.export import fold_metabin_for_inference, folded_eval_forward

MATCH = "single value per channel and sample"

CASES = [
    (MetaBIN1d, nn.BatchNorm1d, (6, 4)),
    (MetaBIN1d, nn.BatchNorm1d, (6, 4, 1)),
    (MetaBIN2d, nn.BatchNorm2d, (6, 4, 1, 1)),
    (MetaBIN3d, nn.BatchNorm3d, (6, 4, 1, 1, 1)),
]


def _pair(cls, bn_cls, momentum=0.1, track_running_stats=True, backend="fused"):
    """A MetaBIN layer (rho far from 1, IN affine unlike the BN one) and the BatchNorm it must equal."""
    torch.manual_seed(0)
    bn = bn_cls(4, momentum=momentum, track_running_stats=track_running_stats).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        if track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    layer = cls(4, momentum=momentum, track_running_stats=track_running_stats, rho_init=0.3, backend=backend).double()
    layer.load_state_dict(bn.state_dict(), strict=False)
    with torch.no_grad():
        layer.in_weight.uniform_(2, 3)
        layer.in_bias.uniform_(2, 3)
    return layer, bn


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _single_value_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and MATCH in str(w.message)]


@pytest.mark.parametrize("backend", ["fused", "composite"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,bn_cls,shape", CASES, ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_layer_equals_its_batchnorm_in_training_and_eval_and_warns_once(cls, bn_cls, shape, momentum, backend):
    layer, bn = _pair(cls, bn_cls, momentum, backend=backend)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):  # "update": batch statistics, running ones updated (cumulatively for momentum=None)
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_(True)
            y, y_ref = layer(x), bn(x_ref)
            _close(y, y_ref)
            dy = torch.randn_like(y)
            y.backward(dy)
            y_ref.backward(dy)
            _close(x.grad, x_ref.grad)
        _close(layer.weight.grad, bn.weight.grad)
        _close(layer.bias.grad, bn.bias.grad)
        assert layer.rho.grad is None  # rho did not take part
        _close(layer.running_mean, bn.running_mean)
        _close(layer.running_var, bn.running_var)
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 3

        running = layer.running_mean.clone(), layer.running_var.clone()
        x = torch.randn(shape, dtype=torch.float64)
        with stats_mode(layer, "hold"):  # batch statistics, running ones untouched
            _close(layer(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
        with stats_mode(layer, "eval"):  # the running statistics, in training mode
            _close(layer(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        _close(layer.running_mean, running[0])
        _close(layer.running_var, running[1])

        layer.eval(), bn.eval()
        x = torch.randn((1,) + shape[1:], dtype=torch.float64)  # batch 1 is fine in eval, as for BatchNorm
        _close(layer(x), bn(x))
        x = torch.randn(shape, dtype=torch.float64)
        _close(layer(x), bn(x))
    assert len(_single_value_warnings(record)) == 1  # once per layer, not per call
    assert "uses its batch branch only" in str(_single_value_warnings(record)[0].message)


@pytest.mark.parametrize("cls,bn_cls,shape", CASES[:1] + CASES[2:3])
def test_folded_traced_and_scripted_forms_equal_the_batchnorm(cls, bn_cls, shape):
    layer, bn = _pair(cls, bn_cls)
    layer.eval(), bn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    expected = bn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation, the layer's own warning
        _close(fold_metabin_for_inference(layer)(x), expected)
        _close(folded_eval_forward(layer, x), expected)  # the form that export captures
        _close(torch.jit.trace(layer, x)(x), expected)
        _close(torch.jit.script(fold_metabin_for_inference(layer))(x), expected)


def test_layers_without_running_statistics_use_the_batch_in_every_form():
    layer, bn = _pair(MetaBIN2d, nn.BatchNorm2d, track_running_stats=False)
    x = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(layer(x), bn(x))
        layer.eval(), bn.eval()
        _close(layer(x), bn(x))
        _close(fold_metabin_for_inference(layer)(x), bn(x))


def test_the_act_layer_and_the_legacy_onnx_export_of_a_folded_model():
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    # A squeeze-excite-like head: a MetaBIN layer on 1x1 maps behind global pooling.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        MetaBIN2d(4, rho_init=0.5),
        nn.AdaptiveAvgPool2d(1),
        MetaBINAct2d(4, act_layer=nn.ReLU, rho_init=0.5),
    )
    x = torch.randn(4, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x)  # one training step of statistics
        model.eval()
        folded = fold_metabin_for_inference(model)
        f = io.BytesIO()
        torch.onnx.export(folded, (x,), f, dynamo=False, opset_version=18)
    bn = nn.BatchNorm2d(4).eval()  # the last layer's BatchNorm: its affine and running statistics
    bn.load_state_dict(model[3].state_dict(), strict=False)
    with torch.no_grad():
        y_ref = torch.relu(bn(model[2](model[1](model[0](x)))))  # the first layer has 6x6 maps: it mixes
        torch.testing.assert_close(model(x), y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded(x), y_ref, rtol=1e-5, atol=1e-6)
    session = onnxruntime.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, y_ref, rtol=1e-5, atol=1e-5)


def test_meta_step_leaves_the_rho_of_single_value_layers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        MetaBIN2d(8, rho_init=0.5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        MetaBIN2d(8, rho_init=0.5),  # 1x1 maps
        nn.Flatten(),
        nn.Linear(8, 4),
        MetaBIN1d(4, rho_init=0.5),  # (N, C)
    )
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=1.0, inner_lr=0.5)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    with pytest.warns(UserWarning, match=MATCH) as record:
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        before = [m.rho.detach().clone() for m in (model[1], model[4], model[7])]
        out = opt.meta_step(lambda: F.cross_entropy(model(x[:4]), y[:4]), lambda: F.cross_entropy(model(x[4:]), y[4:]))
    assert len(_single_value_warnings(record)) == 2  # one per single-value layer, over 5 forward passes
    assert torch.isfinite(out["meta_test_loss"])
    assert not torch.equal(model[1].rho, before[0])  # the mixing layer is meta-learned
    assert torch.equal(model[4].rho, before[1]) and torch.equal(model[7].rho, before[2])
    assert model[4].weight.grad is not None and model[7].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1, 1)])
def test_triton_backend_equals_the_batchnorm_too(shape):
    pytest.importorskip("triton")
    from metabin_layers import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(shape, device=device, requires_grad=True)
    if not kernels.is_available(x.detach().reshape(*shape[:2], -1)):  # the layer passes (N, C) on as (N, C, 1)
        pytest.skip("no Triton kernels here (neither CUDA nor TRITON_INTERPRET=1)")
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(4).to(device)
    layer = (MetaBIN1d if len(shape) == 2 else MetaBIN2d)(4, rho_init=0.3, backend="triton").to(device)
    layer.load_state_dict(bn.state_dict(), strict=False)
    x_ref = x.detach().clone().requires_grad_(True)
    with pytest.warns(UserWarning, match=MATCH):
        y = layer(x)
    y_ref = bn(x_ref)
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    for got, want in ((y, y_ref), (x.grad, x_ref.grad), (layer.weight.grad, bn.weight.grad), (layer.running_var, bn.running_var)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
