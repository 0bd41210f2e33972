"""What every backend of the layer receives and owes: one argument tuple, one registration.

A backend is a function ``BINArgs -> y`` registered under its name. It normalises ``x`` and,
in ``"update"`` mode, also counts the batch in ``num_batches_tracked`` and blends the batch
statistics into the running buffers (``update_running_stats`` for the ones written with torch
ops; the Triton kernels do it on the device themselves).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__: list[str] = []


class BINArgs(NamedTuple):
    """One call of a MetaBIN layer, as its backends see it.

    ``mode``: ``"update"`` (batch statistics, running ones updated), ``"hold"`` (batch
    statistics, running ones untouched) or ``"eval"`` (running statistics in the BN branch).
    ``batch_only``: the input has one value per channel and sample, so the layer is its batch
    branch alone (``rho`` taken as 1, no gradient for it). ``group``: the statistics provider of
    a synchronised layer (its batch statistics are those of the process group), or None.
    """

    x: Tensor
    rho: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    in_weight: Optional[Tensor]
    in_bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    mode: str
    batch_only: bool = False
    group: Any = None


Backend = Callable[[BINArgs], Tensor]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Decorator: ``fn`` computes the layer for backend ``name``."""

    def add(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn

    return add


def registered_backend(name: str) -> Optional[Backend]:
    return _BACKENDS.get(name)


def update_running_stats(a: BINArgs, mu_b: Tensor, var_b: Tensor, count: Union[int, Tensor]) -> None:
    """``nn.BatchNorm``'s update in ``"update"`` mode from the (biased) batch statistics of
    ``count`` values per channel; a tensor ``count`` (a process group's) of 0 leaves the
    buffers as they were, without a host read."""
    if a.mode != "update":
        return
    rm, rv, tracked = a.running_mean, a.running_var, a.num_batches_tracked
    assert rm is not None and rv is not None
    if tracked is not None:
        tracked.add_(1)
    if a.momentum is None:
        assert tracked is not None
        factor: Union[float, Tensor] = tracked.to(rm.dtype).reciprocal_()
    else:
        factor = a.momentum
    empty = count.reshape(()) == 0 if isinstance(count, Tensor) else None
    before = (rm.clone(), rv.clone()) if empty is not None else None
    rm.lerp_(mu_b.to(rm.dtype), factor)
    rv.lerp_((var_b * (count / (count - 1))).to(rv.dtype), factor)
    if empty is not None and before is not None:
        rm.copy_(torch.where(empty, before[0], rm))
        rv.copy_(torch.where(empty, before[1], rv))
        if tracked is not None:
            tracked.sub_(empty.to(tracked.dtype))


# The first Triton failure of this process under backend="auto" (compile or launch error): from
# then on "auto" runs the fused path.
_TRITON_FAILURE: list[str] = []


def triton_failure() -> Optional[str]:
    return _TRITON_FAILURE[0] if _TRITON_FAILURE else None


def clear_triton_failure() -> None:
    _TRITON_FAILURE.clear()


def record_triton_failure(where: str, err: BaseException) -> None:
    """Remember the first failure and warn once; later calls of "auto" choose "fused"."""
    if _TRITON_FAILURE:
        return
    reason = f"{where}: {type(err).__name__}: {err}"
    _TRITON_FAILURE.append(reason)
    warnings.warn(
        f"metabin_layers: the Triton kernels failed in the {reason}. This call and every later "
        "backend='auto' call of this process use the 'fused' backend instead (same results). "
        "Pass backend='triton' to get the error raised.",
        RuntimeWarning,
        stacklevel=3,
    )
