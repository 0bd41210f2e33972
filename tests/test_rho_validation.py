"""rho outside [0, 1] or not finite is refused wherever it enters (the forward, folding, the
optimizer), naming the layer; a non-finite meta-test loss leaves rho untouched, naming the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metabin_layers import MetaBIN2d, MetaBINOptimizer, base_parameters, check_rho, convert_bn_to_metabin, rho_parameters
from metabin_layers.export import FoldedMetaBIN, fold_metabin_for_inference

BAD = [1.5, -0.5, float("nan"), float("inf")]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return convert_bn_to_metabin(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), rho_init=0.5
    )


def _set(param: torch.Tensor, value: float, channel: int = 1) -> None:
    with torch.no_grad():
        param[channel] = value


@pytest.mark.parametrize("value", BAD)
def test_the_forward_refuses_a_rho_set_out_of_range_naming_the_layer(value):
    layer = MetaBIN2d(4, rho_init=0.5)
    x = torch.randn(4, 4, 5, 5)
    layer(x)  # a valid rho: fine
    _set(layer.rho, value)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(ValueError, match=r"MetaBIN2d\(4\): rho must lie in \[0, 1\].*channel 1"):
            layer(x)
    _set(layer.rho, 0.25)  # set right again: accepted again
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("value", BAD)
def test_folding_refuses_an_invalid_rho_naming_the_layer_path(value):
    model = _net().eval()
    with torch.no_grad():
        model[4].rho.data[2] = value  # through .data: invisible to autograd, still seen when folding
    with pytest.raises(ValueError, match=r"layer '4' \(MetaBIN2d\(4\)\): rho must lie in \[0, 1\]"):
        fold_metabin_for_inference(model)
    with pytest.raises(ValueError, match=r"MetaBIN2d\(4\): rho must lie in \[0, 1\]"):
        FoldedMetaBIN.from_metabin(model[4])
    with pytest.raises(ValueError, match=r"layer '4'"):
        check_rho(model)


def _opt(model):
    return MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.5, inner_lr=0.1)


def _losses(model):
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return (lambda: model(x[:4]).square().mean()), (lambda: model(x[4:]).abs().mean())


@pytest.mark.parametrize("value", [2.0, float("nan")])
def test_meta_step_refuses_an_invalid_rho_naming_the_layer_and_leaves_it(value):
    model = _net()
    opt = _opt(model)
    _set(model[4].rho, value)
    before = [r.detach().clone() for r in rho_parameters(model)]
    mtr, mte = _losses(model)
    with pytest.raises(ValueError, match=r"layer '4' \(MetaBIN2d\(4\)\): rho must lie in \[0, 1\]"):
        opt.meta_step(mtr, mte)
    after = rho_parameters(model)
    for a, b in zip(after, before):  # untouched: not clamped, not stepped
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"layer '4'"):
        _opt(model)  # nor built around such a model


def test_a_non_finite_meta_test_loss_leaves_rho_untouched_and_says_so():
    model = _net()
    opt = _opt(model)
    mtr, mte = _losses(model)
    nan = torch.tensor(float("nan"))
    before = [r.detach().clone() for r in rho_parameters(model)]
    out = opt.meta_step(mtr, lambda: mte() + nan)  # a detached NaN: finite gradients, a NaN loss
    assert math.isnan(float(out["meta_test_loss"]))
    assert bool(out["skipped"]) and int(opt.skipped_meta_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(rho_parameters(model), before))
    assert opt.skip_reason(out) == "meta_test_loss is not finite (nan): the meta step was skipped, rho is unchanged"
    # the meta-train loss alike
    out = opt.meta_step(lambda: mtr() + torch.tensor(float("inf")), mte)
    assert bool(out["skipped"]) and int(opt.skipped_meta_steps) == 2
    assert opt.skip_reason(out).startswith("meta_train_loss is not finite (inf)")
    assert all(torch.equal(a, b) for a, b in zip(rho_parameters(model), before))
    # a finite episode steps rho and has no reason
    out = opt.meta_step(mtr, mte)
    assert not bool(out["skipped"]) and opt.skip_reason(out) is None
    assert any(not torch.equal(a, b) for a, b in zip(rho_parameters(model), before))
