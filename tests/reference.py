"""Independent float64 references shared by the tests."""

import torch


def reference_bin(x, rho, weight, bias, in_weight, in_bias, running_mean=None, running_var=None, eps=1e-5):
    """Independent float64 reference: rho * BN(x) + (1 - rho) * IN(x) with torch's own norms."""
    x = x.double()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    if running_mean is None:
        bn = torch.nn.functional.batch_norm(x, None, None, d(weight), d(bias), True, 0.0, eps)
    else:
        bn = torch.nn.functional.batch_norm(x, d(running_mean), d(running_var), d(weight), d(bias), False, 0.0, eps)
    inorm = torch.nn.functional.instance_norm(x, None, None, d(in_weight), d(in_bias), True, 0.0, eps)
    r = rho.double().reshape(shape)
    return r * bn + (1 - r) * inorm


def reference_bin_by_formula(x, rho, w_b, b_b, w_i, b_i, running=None, eps=1e-5):
    """rho * BN(x) + (1 - rho) * IN(x) in float64, written out: unlike torch's instance_norm it
    accepts one spatial value per channel. ``running``: ``(mean, var)`` for the BN branch."""
    x = x.double()
    dims = tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * len(dims)
    if running is None:
        var_b, mu_b = torch.var_mean(x, dim=(0,) + dims, keepdim=True, correction=0)
    else:
        mu_b, var_b = running[0].double().view(view), running[1].double().view(view)
    var_i, mu_i = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    bn = (x - mu_b) / torch.sqrt(var_b + eps) * w_b.double().view(view) + b_b.double().view(view)
    inorm = (x - mu_i) / torch.sqrt(var_i + eps) * w_i.double().view(view) + b_i.double().view(view)
    r = rho.double().view(view)
    return r * bn + (1 - r) * inorm
