"""The BIN math module against a float64 autograd reference, and a guard that the formulas have
exactly two homes: ``_bin_math`` (the reference and the CPU math) and the Triton kernels."""

import ast
from pathlib import Path

import pytest
import torch
from reference import reference_bin_by_formula

from metabin_layers import _bin_math as bm

PACKAGE = Path(__file__).resolve().parents[1] / "metabin_layers"
# The modules that run the normalization on torch ops: they call _bin_math for every coefficient.
BACKEND_FILES = ["functional.py", "_registry.py", "_fused.py", "_composite.py", "distributed.py", "export.py", "layers.py"]
# The two implementations of the formulas (the kernels are tested against the first and float64).
HOMES = {"_bin_math.py", "kernels/triton_bin.py"}
# rho arithmetic that is not the normalization: the meta step's inner update of rho.
META_STEP = {"optim.py"}
# Operands whose arithmetic is the BIN math itself (mixing weight, inverse deviations, branch
# weights, gradient sums).
MATH_NAMES = {"rho", "rho_", "inv_b", "inv_nc", "a_b", "a_i", "t_i", "t_b", "s1_c", "ti_c", "g_i", "beta"}
ARITHMETIC = {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "lerp", "lerp_", "addcmul", "addcmul_", "rsub"}


def _is_math_name(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in MATH_NAMES
    return isinstance(node, ast.Attribute) and node.attr == "rho"


def formula_sites(source: str) -> list[int]:
    """Lines where arithmetic (operators or torch arithmetic calls) takes a BIN-math operand."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and (_is_math_name(node.left) or _is_math_name(node.right)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ARITHMETIC:
            operands = [node.func.value, *node.args]
            if any(_is_math_name(a) for a in operands):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_formula_check_finds_a_second_copy():
    planted = "a_i = (1 - rho) * w_i * inv_nc\nshift = torch.addcmul(beta, a_b, dev)\ny = x.mul(layer.rho)\nok = x * w + b\n"
    assert formula_sites(planted) == [1, 1, 2, 3]


@pytest.mark.parametrize("name", BACKEND_FILES)
def test_backends_hold_no_copy_of_the_coefficient_formulas(name):
    sites = formula_sites((PACKAGE / name).read_text())
    assert not sites, f"{name}: BIN arithmetic outside _bin_math at lines {sites}"


def test_the_formulas_live_in_exactly_two_modules():
    with_sites = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if formula_sites(path.read_text())}
    assert with_sites - META_STEP == HOMES, f"BIN arithmetic in {sorted(with_sites - META_STEP)}"


@pytest.mark.parametrize("use_batch", [True, False])
def test_coefficients_and_gradients_match_the_float64_definition(use_batch):
    g = torch.Generator().manual_seed(0)
    n, c, h, w, eps = 3, 4, 5, 2, 1e-3
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    params = [torch.rand(c, generator=g, dtype=torch.float64)] + [
        torch.randn(c, generator=g, dtype=torch.float64) for _ in range(4)
    ]
    params = [p.requires_grad_() for p in params]
    fixed = (
        None
        if use_batch
        else (torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.5)
    )
    dy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    y_ref = reference_bin_by_formula(x, *params, running=fixed, eps=eps)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], dy)

    xd, (rho, w_b, b_b, w_i, b_i) = x.detach(), [p.detach() for p in params]
    var_nc, mu_nc = torch.var_mean(xd, dim=(2, 3), correction=0)
    if use_batch:
        mu_b, var_b, dev = bm.batch_stats(var_nc, mu_nc)
    else:
        mu_b, var_b = fixed
        dev = mu_nc - mu_b
    inv_b, inv_nc = torch.rsqrt(var_b + eps), torch.rsqrt(var_nc + eps)
    scale, shift, a_b, a_i = bm.coefficients(rho, w_b, b_b, w_i, b_i, inv_b, inv_nc, dev)
    xc = xd - mu_nc[..., None, None]
    torch.testing.assert_close(scale[..., None, None] * xc + shift[..., None, None], y_ref.detach(), rtol=1e-12, atol=1e-12)
    s1, dot = dy.sum((2, 3)), (xc * dy).sum((2, 3))
    t_i, t_b = bm.gradient_sums(dot, s1, dev, inv_b, inv_nc)
    s1_c = s1.sum(0)
    pgrads = bm.parameter_grads(rho, w_b, b_b, w_i, b_i, t_b, s1_c, t_i.sum(0), [True] * 5, [torch.float64] * 5)
    batch = (t_b, s1_c, dev, n * h * w) if use_batch else None
    cx, c0 = bm.dx_coefficients(a_b, a_i, inv_b, inv_nc, t_i, s1, h * w, batch)
    dx = scale[..., None, None] * dy + cx[..., None, None] * xc + c0[..., None, None]
    for got, want in zip([dx, *pgrads], grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:var_mean")  # the empty part
def test_group_moments_combine_to_the_batch_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 2
    parts = [x[:2], x[2:2], x[2:]]  # uneven, one empty
    stacked = torch.stack([bm.local_moments(*torch.var_mean(p, dim=(2, 3), correction=0), 20) for p in parts])
    mean, var, count = bm.combine_moments(stacked, 3)
    var_ref, mean_ref = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, var_ref, rtol=1e-12, atol=1e-12)
    assert count.item() == 7 * 20
    mu_b, var_b, _ = bm.batch_stats(*torch.var_mean(x, dim=(2, 3), correction=0))
    torch.testing.assert_close(var_b, var_ref, rtol=1e-12, atol=1e-12)
