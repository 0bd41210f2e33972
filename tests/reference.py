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
