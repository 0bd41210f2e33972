"""The pieces of a meta episode: the domain split and the cyclic inner step size."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["DomainSplit", "split_domains", "CyclicInnerLR", "ConstantInnerLR", "InnerLR"]


class DomainSplit(NamedTuple):
    """Meta-train / meta-test domains of one episode, and which samples of the batch they hold.

    The masks and indices are None when ``split_domains`` was given a list of domains rather than
    the per-sample domain labels of a batch. Select a side with the index (``x[split.train_index]``
    is a gather: no host sync, where boolean masking must count the samples on the host first).

    Attributes:
        train_domains: the meta-train domain ids, in the order drawn.
        test_domains: the meta-test domain ids, in the order drawn.
        train_mask: boolean ``(N,)`` mask of the batch samples from meta-train domains, or None.
        test_mask: boolean ``(N,)`` mask of the batch samples from meta-test domains, or None.
        train_index: int64 positions of the meta-train samples in the batch (ascending), or None.
        test_index: int64 positions of the meta-test samples in the batch (ascending), or None.

    Examples:
        >>> import torch
        >>> from metabin_layers.episode import split_domains
        >>> s = split_domains(torch.tensor([0, 0, 1, 1, 2, 2]), num_meta_train=2, generator=torch.Generator().manual_seed(0))
        >>> int(s.train_mask.sum()), int(s.test_mask.sum())
        (4, 2)
        >>> torch.equal(s.train_index, s.train_mask.nonzero().flatten())
        True
    """

    train_domains: Tensor
    test_domains: Tensor
    train_mask: Optional[Tensor]
    test_mask: Optional[Tensor]
    train_index: Optional[Tensor] = None
    test_index: Optional[Tensor] = None


def _split_batch(labels: Tensor, train_domains: Tensor, test_domains: Tensor) -> DomainSplit:
    """The masks and indices of both sides, computed from the labels' host values.

    Host values of CPU labels (as a DataLoader yields them) cost no device sync; labels on a GPU
    are copied to the host once.
    """
    values = labels.tolist()
    train = set(train_domains.tolist())
    in_train = [v in train for v in values]
    train_index = [i for i, t in enumerate(in_train) if t]
    test_index = [i for i, t in enumerate(in_train) if not t]
    device = labels.device
    mask = torch.tensor(in_train, dtype=torch.bool).to(device, non_blocking=True)
    return DomainSplit(
        train_domains,
        test_domains,
        mask,
        ~mask,
        torch.tensor(train_index, dtype=torch.int64).to(device, non_blocking=True),
        torch.tensor(test_index, dtype=torch.int64).to(device, non_blocking=True),
    )


def _default_num_meta_train(num_domains: int) -> int:
    # The authors use 3 meta-train domains of 5; keep that proportion, leaving both sides non-empty.
    return min(num_domains - 1, max(1, round(num_domains * 3 / 5)))


def split_domains(
    domains: Union[Tensor, Sequence[int]],
    num_meta_train: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> DomainSplit:
    """Draw meta-train and meta-test domains for one episode.

    The distinct domains are shuffled with ``generator``; the first ``num_meta_train`` are the
    meta-train domains and the rest the meta-test domains (the authors' split: 3 of 5).

    Args:
        domains: the per-sample domain labels of a batch (a 1-D tensor: the masks of the two
            sides are returned too), or the domain ids to split (a list or tuple: no masks).
        num_meta_train: how many domains go to meta-train; default ``round(3/5 * D)`` clipped to
            ``[1, D - 1]`` (3 of 5, 1 of 2, 2 of 3, 2 of 4).
        generator: a seeded ``torch.Generator`` for reproducible splits.

    Returns:
        A ``DomainSplit``: the meta-train and meta-test domain ids (on the CPU), and, for labels,
        the boolean masks and the indices of their samples, on the labels' device (None for a list
        of domains).

    Raises:
        ValueError: ``domains`` is not a 1-D sequence of integer ids, holds fewer than two
            distinct domains, or ``num_meta_train`` is not an int in ``[1, D - 1]``.

    Examples:
        >>> import torch
        >>> from metabin_layers.episode import split_domains
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        >>> split = split_domains(labels, generator=torch.Generator().manual_seed(0))
        >>> len(split.train_domains), len(split.test_domains)
        (3, 2)
        >>> int(split.train_mask.sum())
        6
    """
    with_masks = isinstance(domains, Tensor)  # per-sample labels, not a list of ids
    labels = torch.as_tensor(domains)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"domains must be a 1-D sequence of integer domain ids, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    unique = torch.tensor(sorted(set(labels.tolist())), dtype=labels.dtype)  # host values: no op on the device
    d = unique.numel()
    if d < 2:
        raise ValueError(
            f"a meta split needs at least two domains, got {d} ({unique.tolist()}); with a single source "
            "dataset use cameras as domains"
        )
    k = _default_num_meta_train(d) if num_meta_train is None else num_meta_train
    if not isinstance(k, int) or not 1 <= k <= d - 1:
        raise ValueError(f"num_meta_train must be an int in [1, {d - 1}] for {d} domains, got {num_meta_train!r}")
    perm = torch.randperm(d, generator=generator)
    train_domains, test_domains = unique[perm[:k]], unique[perm[k:]]
    if not with_masks:
        return DomainSplit(train_domains, test_domains, None, None)
    return _split_batch(labels, train_domains, test_domains)


class InnerLR:
    """Base class of inner-step size schedules: ``step()`` advances, ``factor`` is the current value.

    ``relative`` says whether the value multiplies the current rho learning rate (the authors'
    ``beta = lr_rho * meta_ratio``) or is the step size itself.

    Subclasses implement ``step`` (and ``state_dict`` / ``load_state_dict`` when they hold state).

    Examples:
        >>> from metabin_layers.episode import InnerLR
        >>> class Halving(InnerLR):
        ...     def __init__(self):
        ...         self.value = 0.2
        ...     def step(self):
        ...         self.value /= 2
        ...         return self.value
        >>> sched = Halving()
        >>> sched.step(), sched.step()
        (0.1, 0.05)
    """

    relative: bool = False

    def step(self) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConstantInnerLR(InnerLR):
    """A fixed inner step size ``beta``.

    Args:
        value: ``beta``, a finite number >= 0 (used as given: ``relative`` is False).

    Raises:
        ValueError: ``value`` is not a finite number >= 0.

    Examples:
        >>> from metabin_layers.episode import ConstantInnerLR
        >>> ConstantInnerLR(0.01).step()
        0.01
    """

    def __init__(self, value: float) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"inner_lr must be a finite number >= 0, got {value!r}")
        self.value = float(value)

    def step(self) -> float:
        return self.value


class CyclicInnerLR(InnerLR):
    """The authors' cyclic inner step size: a triangular cycle, relative to the rho learning rate.

    ``beta_k = lr_rho * ratio_k`` where ``ratio_k`` follows ``torch.optim.lr_scheduler.CyclicLR``
    (mode ``triangular``) between ``middle_lr / ratio`` and ``middle_lr * ratio``, with a period of
    ``int(iters_per_epoch / period_per_epoch)`` meta steps, of which ``up_ratio`` go up. The
    schedule is stepped before each meta step, so the first value used is one step above the
    minimum. Defaults are the authors' (0.01, 10, one cycle per 5 epochs, half up).

    Args:
        iters_per_epoch: meta steps per epoch of your loader.
        middle_lr: geometric middle of the cycle.
        ratio: the cycle spans ``[middle_lr / ratio, middle_lr * ratio]``.
        period_per_epoch: cycles per epoch (0.2: one cycle every 5 epochs).
        up_ratio: share of the cycle spent increasing.

    Examples:
        >>> from metabin_layers.episode import CyclicInnerLR
        >>> sched = CyclicInnerLR(iters_per_epoch=10)     # period 50 meta steps
        >>> round(sched.step(), 6)                        # 0.001 + (0.1 - 0.001) / 25
        0.00496
    """

    relative = True

    def __init__(
        self,
        iters_per_epoch: int = 100,
        middle_lr: float = 0.01,
        ratio: float = 10.0,
        period_per_epoch: float = 0.2,
        up_ratio: float = 0.5,
    ) -> None:
        if not isinstance(iters_per_epoch, int) or iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be a positive int, got {iters_per_epoch!r}")
        if not middle_lr > 0 or not ratio >= 1:
            raise ValueError(f"middle_lr must be > 0 and ratio >= 1, got middle_lr={middle_lr}, ratio={ratio}")
        if not period_per_epoch > 0:
            raise ValueError(f"period_per_epoch must be > 0, got {period_per_epoch}")
        if not 0 < up_ratio < 1:
            raise ValueError(f"up_ratio must be in (0, 1), got {up_ratio}")
        self.low = middle_lr / ratio
        self.high = middle_lr * ratio
        self.period = max(2, int(iters_per_epoch / period_per_epoch))
        up = int(self.period * up_ratio)
        down = self.period - up
        if up <= 0:
            up = 1
        elif down <= 0:
            up = self.period - 1
        self.step_ratio = up / self.period
        self.num_steps = 0

    def value_at(self, k: int) -> float:
        """The ratio after ``k`` scheduler steps (torch's CyclicLR formula).

        Args:
            k: the number of steps taken.

        Returns:
            The ratio ``beta_k / lr_rho`` after ``k`` steps.
        """
        cycle = math.floor(1 + k / self.period)
        x = 1.0 + k / self.period - cycle
        scale = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        return self.low + (self.high - self.low) * scale

    def step(self) -> float:
        self.num_steps += 1
        return self.value_at(self.num_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
