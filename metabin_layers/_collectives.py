"""The ``torch.distributed`` collectives of the synchronised layers and of ``MetaBINOptimizer``.

Each one names what it was doing when it fails, so a rank that waits for a peer that raised or
took another branch gets a ``DistributedStepError`` that says where, instead of a bare timeout.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedStepError",
    "active_group",
    "all_gather_stacked",
    "all_gather_differentiable",
    "all_reduce_sum",
    "all_reduce_differentiable",
    "average_over_group",
    "global_domains",
]


class DistributedStepError(RuntimeError):
    """A collective of a synchronised MetaBIN layer or of the meta step failed or timed out.

    Usually another rank raised, skipped a step or took another branch, so the collectives no
    longer match; the original error of ``torch.distributed`` is chained (``__cause__``).

    Examples:
        >>> from metabin_layers.distributed import DistributedStepError
        >>> try:
        ...     try:
        ...         raise RuntimeError("Timed out waiting for all_reduce")
        ...     except RuntimeError as err:
        ...         raise DistributedStepError("rho all_reduce failed on rank 1") from err
        ... except DistributedStepError as err:
        ...     print(type(err.__cause__).__name__, isinstance(err, RuntimeError))
        RuntimeError True
    """


def active_group(process_group: Any = None) -> Optional[Any]:
    """The process group to synchronise over, or None when there is nothing to synchronise.

    None when ``torch.distributed`` is unavailable or not initialised, when the group has a single
    rank, or when this process is not a member of it. ``process_group=None`` is the default group.

    Examples:
        >>> active_group() is None   # no init_process_group in this process
        True
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:  # -1 when this rank is not a member
        return None
    return group


def _fail(what: str, group: Any, err: BaseException) -> DistributedStepError:
    try:
        where = f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except Exception:  # pragma: no cover - the group itself is broken
        where = "this rank"
    return DistributedStepError(
        f"{what} failed on {where}: {err}\nEvery rank must run the same forward and backward passes "
        "through synchronised MetaBIN layers and the same MetaBIN meta steps (same episode, same "
        "closures). A rank that raised, skipped a step or took another branch leaves the others "
        "waiting until the process group's timeout (init_process_group(timeout=...)); look for "
        "the first error in the other ranks' logs."
    )


def all_gather_stacked(t: Tensor, group: Any, what: str) -> Tensor:
    """``(world, *t.shape)``: every rank's ``t``, in rank order."""
    t = t.contiguous()
    world = dist.get_world_size(group)
    try:
        if hasattr(dist, "all_gather_into_tensor") and dist.get_backend(group) != "gloo":
            out = t.new_empty((world,) + tuple(t.shape))
            dist.all_gather_into_tensor(out, t, group=group)
            return out
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
    except RuntimeError as err:
        raise _fail(what, group, err) from err
    return torch.stack(parts)


def all_reduce_sum(t: Tensor, group: Any, what: str) -> Tensor:
    """Sum of ``t`` over the group, in place (``t`` is returned)."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise _fail(what, group, err) from err
    return t


class _DiffAllReduce(torch.autograd.Function):
    # Sum over the group; the adjoint of a sum over ranks is again a sum over ranks, so the
    # backward is the same Function and any order of derivatives works.
    @staticmethod
    def forward(ctx, t: Tensor, group: Any, what: str) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.what = group, what
        return all_reduce_sum(t.clone(memory_format=torch.contiguous_format), group, what)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return _DiffAllReduce.apply(g, ctx.group, ctx.what), None, None


def all_reduce_differentiable(t: Tensor, group: Any, what: str = "all_reduce") -> Tensor:
    """Sum of ``t`` over ``group`` with autograd support (backward: the same sum of gradients)."""
    return _DiffAllReduce.apply(t, group, what)


class _DiffAllGather(torch.autograd.Function):
    # Forward: stack every rank's tensor. Backward: each rank's slice of the stacked gradient,
    # summed over the ranks (a reduce-scatter, done as one all_reduce: the tensors are tiny).
    # The backward is made of differentiable ops, so double backward works.
    @staticmethod
    def forward(ctx, t: Tensor, group: Any, what: str) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.what = group, what
        ctx.rank = dist.get_rank(group)
        return all_gather_stacked(t, group, what)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return all_reduce_differentiable(g, ctx.group, ctx.what + " (backward)")[ctx.rank], None, None


def all_gather_differentiable(t: Tensor, group: Any, what: str) -> Tensor:
    """``all_gather_stacked`` with autograd support (any order of derivatives)."""
    return _DiffAllGather.apply(t, group, what)


def average_over_group(
    tensors: Sequence[Tensor], group: Any, differentiable: bool = False, what: str = "all_reduce"
) -> list[Tensor]:
    """The mean over the ranks of ``group`` of each tensor, with one collective for all of them.

    ``differentiable=True`` keeps autograd history (second-order meta steps). Returns one averaged
    tensor per input, of the same shape; raises ``DistributedStepError`` if the collective fails.
    """
    if not tensors:
        return []
    world = dist.get_world_size(group)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if differentiable:
        total = all_reduce_differentiable(flat, group, what)
    else:
        total = all_reduce_sum(flat.detach().clone(), group, what)
    total = total / world
    out, start = [], 0
    for t in tensors:
        out.append(total[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def global_domains(labels: Tensor, group: Any, device: Union[torch.device, str], fingerprint: int) -> Tensor:
    """The sorted union over the group of the domain ids in ``labels`` (two small all_reduces).

    ``fingerprint`` (e.g. a hash of a generator state) must be equal on every rank; a mismatch
    raises the same ``ValueError`` on every rank, as do domain ids spanning ``2**20`` values or
    more. Returns the sorted int64 ids present on any rank, on the CPU.
    """
    local = torch.unique(labels.cpu()).to(torch.int64)
    big = 2**62
    lo, hi = (int(local.min()), int(local.max())) if local.numel() else (big, -big)
    fp = int(fingerprint) % (2**61)
    head = torch.tensor([hi, -lo, fp, -fp], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        raise _fail("MetaBINOptimizer.split: all_reduce of the domain range", group, err) from err
    hi_g, lo_g, fp_max, fp_min = int(head[0]), -int(head[1]), int(head[2]), -int(head[3])
    if fp_max != fp_min:
        raise ValueError(
            "MetaBINOptimizer.split: the split generator differs between ranks, so the ranks would draw "
            "different meta-train / meta-test domains; build the optimizer with the same seed on every "
            "rank (seed=..., not seed + rank) and restore the same optimizer state everywhere"
        )
    if hi_g < lo_g:  # no labels anywhere
        return local
    if hi_g - lo_g > 2**20:
        raise ValueError(f"domain ids must span fewer than 2**20 values, got [{lo_g}, {hi_g}]")
    presence = torch.zeros(hi_g - lo_g + 1, dtype=torch.int32, device=device)
    presence[(local - lo_g).to(device)] = 1
    try:
        dist.all_reduce(presence, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        raise _fail("MetaBINOptimizer.split: all_reduce of the domain set", group, err) from err
    return presence.cpu().nonzero().flatten() + lo_g
