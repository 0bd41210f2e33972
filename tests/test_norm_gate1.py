"""The gate1 (Nam & Kim BIN) variants: one shared affine, checked against a float64 reference."""

import pytest
import torch
from torch import nn

from metabin_layers import MetaBIN2d, base_parameters, convert_bn_to_metabin, metabin_modules, rho_parameters
from metabin_layers.reid.model import apply_norm_variant, build_backbone, tie_branch_affines


def nam_kim_bin(x, rho, gamma, beta, running=None, eps=1e-5):
    """Nam & Kim (NeurIPS 2018), written out: gamma * (rho * x_hat_B + (1 - rho) * x_hat_I) + beta."""
    if running is None:
        mu_b = x.mean(dim=(0, 2, 3), keepdim=True)
        var_b = ((x - mu_b) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mu_b, var_b = (t.view(1, -1, 1, 1) for t in running)
    mu_i = x.mean(dim=(2, 3), keepdim=True)
    var_i = ((x - mu_i) ** 2).mean(dim=(2, 3), keepdim=True)
    x_hat_b = (x - mu_b) / torch.sqrt(var_b + eps)
    x_hat_i = (x - mu_i) / torch.sqrt(var_i + eps)
    r, g, b = (t.view(1, -1, 1, 1) for t in (rho, gamma, beta))
    return g * (r * x_hat_b + (1 - r) * x_hat_i) + b


def gate1_layer(channels=5):
    m = MetaBIN2d(channels).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.rho.uniform_(0.0, 1.0)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    return tie_branch_affines(m)


@pytest.mark.parametrize("backend", ["fused", "composite"])
def test_gate1_layer_equals_nam_kim_formula_in_train_and_eval(backend):
    torch.manual_seed(3)
    m = gate1_layer()
    m.backend = backend
    x = (torch.randn(4, 5, 6, 3, dtype=torch.float64) * 2 + 0.7).requires_grad_()
    y = m(x)
    ref = nam_kim_bin(x, m.rho, m.weight, m.bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    # the gradients of the shared gamma / beta sum the two branches' contributions
    probe = torch.randn_like(y)
    got = torch.autograd.grad((y * probe).sum(), [x, m.weight, m.bias, m.rho])
    want = torch.autograd.grad((ref * probe).sum(), [x, m.weight, m.bias, m.rho])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    m.eval()
    running = (m.running_mean, m.running_var)
    torch.testing.assert_close(m(x), nam_kim_bin(x, m.rho, m.weight, m.bias, running), rtol=0, atol=1e-12)


def test_gate1_is_not_the_two_affine_layer():
    # a layer whose IN affine differs from its BN affine is not gate1: the test above can tell them apart
    torch.manual_seed(4)
    m = gate1_layer()
    untied = MetaBIN2d(5).double()
    untied.load_state_dict(m.state_dict())
    with torch.no_grad():
        untied.in_weight.fill_(1.0)
        untied.in_bias.zero_()
    x = torch.randn(4, 5, 6, 3, dtype=torch.float64)
    assert not torch.allclose(untied(x), nam_kim_bin(x, m.rho, m.weight, m.bias), atol=1e-6)


@pytest.mark.parametrize("variant", ["bin-gate1", "metabin-gate1"])
def test_gate1_variants_share_one_affine_per_layer_and_save_load(variant):
    net, _ = build_backbone("resnet18")
    net = apply_norm_variant(net, variant)
    layers = metabin_modules(net)
    assert len(layers) == 20 and all(m.in_weight is m.weight and m.in_bias is m.bias for m in layers)
    params = list(net.parameters())
    assert len({id(p) for p in params}) == len(params)  # each shared Parameter once
    assert len(base_parameters(net)) == len(params) - len(rho_parameters(net))
    with torch.no_grad():
        layers[0].weight.mul_(3.0)
    fresh = apply_norm_variant(build_backbone("resnet18")[0], variant)
    fresh.load_state_dict(net.state_dict())
    first = metabin_modules(fresh)[0]
    assert first.in_weight is first.weight and torch.equal(first.weight, layers[0].weight)


def test_tie_rejects_layers_without_affine():
    net = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    with pytest.raises(ValueError, match="affine=False"):
        tie_branch_affines(net)
