"""Layers by name: the factory, and timm models built with MetaBIN as their norm_layer."""

import functools

import pytest
import torch
from reference import reference_bin
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, SyncMetaBIN, create_norm_layer, get_norm_layer
from metabin_layers.layers import metabin_modules


@pytest.mark.parametrize(
    "name, cls",
    [
        ("MetaBIN", MetaBIN2d),
        ("metabin1d", MetaBIN1d),
        ("meta_bin_2d", MetaBIN2d),
        ("MetaBIN3d", MetaBIN3d),
        ("metabin-act2d", MetaBINAct2d),
        ("SyncMetaBIN", SyncMetaBIN),
    ],
)
def test_names_resolve_to_classes(name, cls):
    assert get_norm_layer(name) is cls
    layer = create_norm_layer(name, 6, rho_init=0.25)
    assert type(layer) is cls and layer.num_features == 6 and torch.equal(layer.rho, torch.full((6,), 0.25))


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown norm layer 'batchnorm'.*metabin"):
        create_norm_layer("batchnorm", 4)


def test_factory_layer_equals_the_directly_built_one_in_float64():
    torch.manual_seed(0)
    direct = MetaBIN2d(5, eps=1e-3, momentum=0.2, rho_init=0.3, dtype=torch.float64)
    built = create_norm_layer("metabin", 5, eps=1e-3, momentum=0.2, rho_init=0.3, dtype=torch.float64)
    partial = get_norm_layer("MetaBIN", eps=1e-3, momentum=0.2, rho_init=0.3)
    assert isinstance(partial, functools.partial)
    via_partial = partial(5, dtype=torch.float64)
    with torch.no_grad():
        for p in (direct.weight, direct.bias, direct.in_weight, direct.in_bias):
            p.uniform_(-1, 1)
    for layer in (built, via_partial):
        layer.load_state_dict(direct.state_dict())
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    ref = reference_bin(x, direct.rho, direct.weight, direct.bias, direct.in_weight, direct.in_bias, eps=1e-3)
    for layer in (direct, built, via_partial):
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, 0.2 * x.mean((0, 2, 3)))


def test_torchvision_resnet_takes_the_factory_as_norm_layer():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=3, norm_layer=get_norm_layer("metabin", rho_init=0.5))
    assert not any(isinstance(m, _BatchNorm) for m in net.modules())
    assert len(metabin_modules(net)) == 20


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    out.square().mean().backward()
    rho_grads = [m.rho.grad for m in metabin_modules(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in rho_grads)
    assert any(g.abs().sum() > 0 for g in rho_grads)


def test_timm_resnet18_with_metabin_norm_layer_trains():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=4, norm_layer=get_norm_layer("metabin", rho_init=0.5))
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    layers = metabin_modules(model)
    assert len(layers) == 20 and {type(m) for m in layers} == {MetaBIN2d}
    assert all(m.rho_init == 0.5 for m in layers)
    _train_step(model, torch.randn(2, 3, 64, 64))


def test_timm_efficientnet_b0_with_metabin_norm_layer_keeps_its_activations_and_trains():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", num_classes=4, norm_layer=get_norm_layer("metabin", rho_init=0.5))
    reference = timm.create_model("efficientnet_b0", num_classes=4)  # timm's own layers are unaffected
    assert {type(m).__name__ for m in reference.modules() if isinstance(m, _BatchNorm)} == {"BatchNormAct2d"}
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    ref_norms = [(n, m) for n, m in reference.named_modules() if isinstance(m, _BatchNorm)]
    ours = dict(model.named_modules())
    assert len(ref_norms) == len(metabin_modules(model)) > 40
    for name, bn in ref_norms:  # every norm + act layer has become MetaBINAct2d with the same activation
        layer = ours[name]
        assert isinstance(layer, MetaBINAct2d) and layer.rho_init == 0.5, name
        assert type(layer.act) is type(bn.act), name
    assert any(isinstance(m.act, nn.SiLU) for m in metabin_modules(model))
    assert any(isinstance(m.act, nn.Identity) for m in metabin_modules(model))  # apply_act=False layers
    _train_step(model, torch.randn(2, 3, 64, 64))
