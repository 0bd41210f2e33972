"""Precise BatchNorm: recompute the running statistics of every BatchNorm and MetaBIN layer.

Training leaves running statistics that are an exponential average (momentum 0.1) over the last
batches, with the MetaBIN meta steps held out; ``update_bn_stats`` replaces them by the cumulative
average over many batches of the final model, as ``torch.optim.swa_utils.update_bn`` and
fast-reid's ``utils/precision_bn.py`` (from fvcore) do. Nothing else changes: no parameter (weights,
biases, IN affine, ``rho``), no gradient, and each layer's momentum, the MetaBIN statistics modes and
the model's train/eval mode are restored afterwards.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import _MetaBINBase

__all__ = ["update_bn_stats", "running_stats_layers"]


def running_stats_layers(model: nn.Module) -> list[nn.Module]:
    """The layers ``update_bn_stats`` recomputes: every torch BatchNorm (``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm`` and their subclasses such as timm's ``BatchNormAct2d``) and every MetaBIN
    layer that tracks running statistics, in ``model.modules()`` order.

    Args:
        model: any module.

    Returns:
        The layers (frozen BatchNorm, which has fixed statistics, is not one of them).

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d
        >>> from metabin_layers.precise_bn import running_stats_layers
        >>> net = nn.Sequential(MetaBIN2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
        >>> [type(m).__name__ for m in running_stats_layers(net)]
        ['MetaBIN2d', 'BatchNorm2d']
    """
    out: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (_BatchNorm, _MetaBINBase)) and m.track_running_stats and m.running_mean is not None:
            out.append(m)
    return out


def _model_input(batch: Any, device: Optional[torch.device]) -> Tensor:
    """The tensor a batch feeds the model: the batch itself, its first element, or its ``"img"`` entry."""
    if isinstance(batch, Mapping):
        if "img" not in batch:
            raise TypeError(f"batches: a dict batch needs an 'img' entry (the model input), got keys {sorted(batch)}")
        batch = batch["img"]
    elif isinstance(batch, (list, tuple)):
        if not batch:
            raise TypeError("batches: got an empty tuple/list batch; expected the model input first")
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"batches: expected tensors, (input, ...) tuples or dicts with 'img', got {type(batch).__name__}")
    return batch.to(device, non_blocking=True) if device is not None else batch


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_iters: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> int:
    """Recompute the running statistics of every BatchNorm and MetaBIN layer of ``model`` over ``batches``.

    Each layer's running statistics are reset and then accumulated with ``momentum=None`` (torch's
    cumulative average) while ``model`` runs in training mode (MetaBIN layers in ``"update"`` mode)
    over the first ``num_iters`` batches, without gradients. So, as with
    ``torch.optim.swa_utils.update_bn``, afterwards ``running_mean`` is the mean of the per-batch
    means and ``running_var`` the mean of the per-batch *unbiased* variances (what fast-reid's precise
    BN averages too), and ``num_batches_tracked`` counts the batches. Dropout and the like are active
    during the pass, as in training. Parameters (``weight``, ``bias``, ``in_weight``, ``in_bias``,
    ``rho``) are untouched; each layer's ``momentum``, the MetaBIN ``stats_mode`` and the model's
    train/eval mode are restored. If the pass fails (or ``batches`` runs out before ``num_iters``)
    the running statistics are restored too and the error is raised.

    Args:
        model: the model (its BatchNorm and MetaBIN layers at any depth are updated; see
            ``running_stats_layers``).
        batches: an iterable of model inputs: tensors, tuples/lists whose first element is the input
            (a ``DataLoader`` of ``(images, labels)``), or dicts with an ``"img"`` entry (the Re-ID
            recipe's batches).
        num_iters: how many batches to use (at least 1); None: all of ``batches``.
        device: where inputs are moved; default: the device of the model's first parameter or
            buffer (inputs stay where they are when the model has none).

    Returns:
        The number of batches the statistics average over.

    Raises:
        ValueError: ``num_iters`` < 1, ``batches`` yields fewer than ``num_iters`` batches (or none),
            or ``model`` has no layer with running statistics.
        TypeError: a batch is neither a tensor, nor a tuple/list, nor a dict with ``"img"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import convert_bn_to_metabin, update_bn_stats
        >>> model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
        >>> batches = [torch.randn(8, 3, 6, 6) for _ in range(5)]
        >>> update_bn_stats(model, batches, num_iters=4)
        4
        >>> int(model[1].num_batches_tracked), model[1].momentum, model.training
        (4, 0.1, False)
    """
    if num_iters is not None and (isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1):
        raise ValueError(f"num_iters must be an int >= 1 or None, got {num_iters!r}")
    layers: list[Any] = running_stats_layers(model)  # BatchNorm and MetaBIN: the same buffers and momentum
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm or MetaBIN layer with running statistics to update")
    if device is None:
        ref = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = ref.device if ref is not None else None
    device = torch.device(device) if device is not None else None
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    metabin = [m for m in layers if isinstance(m, _MetaBINBase)]
    modes = [m.stats_mode for m in metabin]
    was_training = model.training
    done = 0
    ok = False
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: factor 1 / num_batches_tracked
        for m in metabin:
            m.stats_mode = "update"
        model.train()
        for batch in itertools.islice(batches, num_iters):
            model(_model_input(batch, device))
            done += 1
        if done == 0:
            raise ValueError("batches: yielded no batch")
        if num_iters is not None and done < num_iters:
            raise ValueError(f"batches: yielded {done} batches, fewer than num_iters={num_iters}")
        ok = True
    finally:
        for m, (momentum, mean, var, tracked) in zip(layers, saved):
            m.momentum = momentum
            if not ok:  # leave the model as it was
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        for m, mode in zip(metabin, modes):
            m.stats_mode = mode
        model.train(was_training)
    return done
