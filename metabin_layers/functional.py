"""Batch-Instance Normalization as a function, and the dispatch to the backend that computes it.

``batch_instance_norm`` computes ``rho * BN(x) + (1 - rho) * IN(x)`` as one affine map per sample
and channel, ``y = scale[n, c] * (x - mu_nc) + shift[n, c]``. Three backends compute it, each
one module registered for the same argument tuple (``metabin_layers._registry.BINArgs``):

* ``"fused"`` (``_fused``): a custom ``torch.autograd.Function`` with a hand-written backward and
  the memory traffic of BatchNorm, on plain ATen kernels; the CPU path.
* ``"composite"`` (``_composite``): the same formulas as ordinary differentiable torch ops, so
  double backward works (second-order meta steps use it).
* ``"triton"`` (``kernels.triton_bin``): Triton kernels that own the whole layer, two launches
  forward and two backward (CUDA, or CPU under ``TRITON_INTERPRET=1`` for testing).

The coefficients and gradient formulas live in ``metabin_layers._bin_math`` (the reference) and,
once more, in the Triton kernels.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import _composite, _fused  # noqa: F401  (register the "composite" and "fused" backends)
from ._registry import BINArgs, clear_triton_failure, record_triton_failure, registered_backend, triton_failure

__all__ = [
    "batch_instance_norm",
    "BACKENDS",
    "BACKEND_ENV",
    "resolve_backend",
    "triton_fallback_reason",
    "reset_triton_fallback",
]

BACKENDS = ("fused", "composite", "triton")
"""Names accepted by ``batch_instance_norm(..., backend=...)``: ``"fused"`` (plain PyTorch with a
hand-written backward; the CPU path), ``"composite"`` (differentiable twice; the reference) and
``"triton"`` (Triton kernels; CUDA, or CPU under ``TRITON_INTERPRET=1`` for testing)."""

BACKEND_ENV = "METABIN_BACKEND"
"""Environment variable that forces the backend chosen by ``"auto"`` (e.g. ``METABIN_BACKEND=fused``)."""


def resolve_backend(x: Tensor, backend: str = "auto") -> str:
    """The backend that ``backend`` means for input ``x``.

    ``"auto"`` picks ``$METABIN_BACKEND`` when set; else ``"triton"`` for CUDA tensors when the
    compiled kernels passed the library's CUDA tests for this release
    (``metabin_layers.kernels.cuda_validated``), Triton imports and the kernels have not
    failed in this process (``triton_fallback_reason``); else ``"fused"``, whose CUDA path
    is plain ATen ops. Any other value is returned as it is (validated).

    Args:
        x: the input the layer is about to normalise (its device decides ``"auto"``).
        backend: ``"auto"`` or one of ``BACKENDS``.

    Returns:
        One of ``BACKENDS``.

    Raises:
        ValueError: ``backend`` is neither ``"auto"`` nor one of ``BACKENDS``.

    Examples:
        >>> resolve_backend(torch.zeros(2, 3, 4))
        'fused'
    """
    return _resolve(x, backend)[0]


def _resolve(x: Tensor, backend: str) -> tuple[str, bool]:
    """``(backend, may_fall_back)``: the concrete backend, and whether ``"auto"`` chose Triton
    itself (then a Triton failure falls back to ``"fused"`` instead of raising)."""
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip().lower()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{BACKEND_ENV} must be 'auto' or one of {BACKENDS}, got {forced!r}")
            return forced, False
        if _auto_prefers_triton(x):
            return "triton", True
        return "fused", False
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend, False


def _auto_prefers_triton(x: Tensor) -> bool:
    if not x.is_cuda or triton_failure() is not None:
        return False
    from . import kernels

    return kernels.cuda_validated() and kernels.is_available(x)


def triton_fallback_reason() -> Optional[str]:
    """Why ``backend="auto"`` stopped using the Triton kernels in this process, or None.

    Returns:
        The first Triton failure of this process (where it happened, the exception type and
        message), or None when there was none since the start or the last
        ``reset_triton_fallback``.

    Examples:
        >>> triton_fallback_reason() is None
        True
    """
    return triton_failure()


def reset_triton_fallback() -> None:
    """Let ``backend="auto"`` try the Triton kernels again (after ``triton_fallback_reason``).

    After a Triton failure, ``backend="auto"`` uses the ``fused`` backend for the rest of the
    process; this forgets the failure (for instance after fixing the Triton install).

    Examples:
        >>> from metabin_layers.functional import reset_triton_fallback, triton_fallback_reason
        >>> reset_triton_fallback()
        >>> triton_fallback_reason() is None
        True
    """
    clear_triton_failure()


def _compiler_flag(name: str) -> bool:
    # torch.compiler.is_compiling (torch 2.3+) and is_exporting (2.6+): False where torch lacks them.
    flag = getattr(getattr(torch, "compiler", None), name, None)
    return bool(flag()) if flag is not None else False


def _exporting_graph() -> bool:
    """True while torch.export, torch.jit.trace or an ONNX exporter traces a forward (the legacy
    ONNX exporter traces with torch.jit.trace; the default one uses torch.export)."""
    return torch.jit.is_tracing() or _compiler_flag("is_exporting")


def _load_backend(name: str):
    """The registered function of backend ``name``; the first ``"triton"`` imports the kernels
    (and Triton) where Triton is installed."""
    impl = registered_backend(name)
    if impl is None and name == "triton":
        from . import kernels

        if kernels.triton_importable():
            from .kernels import triton_bin  # noqa: F401  (registers "triton")

            impl = registered_backend(name)
    return impl


def _backend(name: str):
    impl = _load_backend(name)
    if impl is None:
        raise RuntimeError(f"backend {name!r} needs Triton (pip install metabin-layers[triton])")
    return impl


def _run(a: BINArgs, backend: str) -> Tensor:
    """The layer's output from the backend that ``backend`` means for ``a.x``: the one dispatch
    of a forward.

    Graph capture gets traceable forms: the composite ops under ``torch.export``, ONNX and
    ``torch.jit.trace`` (and in place of the fused path's Function under ``torch.compile``); the
    Triton kernels stay, as custom ops, under ``torch.compile``. Synchronised layers and empty
    inputs run on the fused path when Triton was chosen.
    """
    name, may_fall_back = _resolve(a.x, backend)
    if _exporting_graph():
        name = "composite"
    elif name == "fused" and _compiler_flag("is_compiling"):
        name = "composite"
    if name == "triton":
        if a.group is not None or a.x.numel() == 0:
            name = "fused"
        elif may_fall_back:
            try:
                return _backend("triton")(a, True)  # type: ignore[call-arg]
            except Exception as err:  # noqa: BLE001  (Triton compile / launch errors have no common base class)
                record_triton_failure("forward", err)
                name = "fused"
        elif not _compiler_flag("is_compiling"):  # (a compiled graph checked it when it was traced)
            from .kernels import is_available

            if not is_available(a.x):
                raise RuntimeError(
                    "backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for testing on CPU); "
                    f"got a {a.x.device.type} tensor"
                )
    return _backend(name)(a)


def batch_instance_norm(
    x: Tensor,
    rho: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    in_weight: Optional[Tensor] = None,
    in_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    use_batch_stats: bool = True,
    update_running_stats: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "fused",
) -> Tensor:
    """Batch-Instance Normalization: ``rho * BN(x) + (1 - rho) * IN(x)`` in one affine map.

    Args:
        x: input of shape ``(N, C, *spatial)`` with at least one spatial dimension.
        rho: per-channel mixing weight, shape ``(C,)``; 1 is pure BatchNorm, 0 pure InstanceNorm.
        weight: weight of the BN branch, ``(C,)`` or None (1).
        bias: bias of the BN branch, ``(C,)`` or None (0).
        in_weight: weight of the IN branch, ``(C,)`` or None (1).
        in_bias: bias of the IN branch, ``(C,)`` or None (0).
        running_mean: BN running mean, used when ``use_batch_stats`` is False and updated in place
            when ``update_running_stats`` is True.
        running_var: BN running variance, used and updated like ``running_mean``.
        use_batch_stats: normalise the BN branch with the statistics of this batch.
        update_running_stats: blend the batch statistics into the running buffers with
            ``momentum`` (nn.BatchNorm semantics: unbiased variance is stored).
        momentum: weight of the new batch statistics in the running average.
        eps: added to the variances.
        backend: ``"fused"`` (custom backward, fast), ``"composite"`` (plain autograd ops,
            supports double backward), ``"triton"`` (CUDA kernels; see ``BACKENDS``) or
            ``"auto"`` (``resolve_backend``; a Triton failure then falls back to ``"fused"``
            with a warning instead of raising).

    Returns:
        A tensor like ``x``.

    Examples:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> y = batch_instance_norm(x, rho=torch.full((3,), 0.5))
        >>> y.shape
        torch.Size([4, 3, 5, 5])
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if x.dim() < 3:
        raise ValueError(f"x must have shape (N, C, *spatial) with at least one spatial dimension, got {tuple(x.shape)}")
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("use_batch_stats=False needs running_mean and running_var")
    if update_running_stats and (running_mean is None or running_var is None):
        raise ValueError("update_running_stats=True needs running_mean and running_var")
    spatial = math.prod(x.shape[2:])
    count = x.shape[0] * spatial
    if use_batch_stats and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel for batch statistics, got input of shape {tuple(x.shape)}")
    mode = "eval" if not use_batch_stats else "update" if update_running_stats else "hold"
    args = BINArgs(x, rho, weight, bias, in_weight, in_bias, running_mean, running_var, None, momentum, eps, mode)
    return _run(args, backend)
