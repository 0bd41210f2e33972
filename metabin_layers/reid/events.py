"""Tensorboard events of a recipe run (``--set tensorboard=true``): ``<output>/tensorboard``.

Scalars, at each logged iteration (``log_every``) and after the evaluation:

| tag | value |
|---|---|
| ``loss/ce``, ``loss/tri`` | the base step's cross-entropy and triplet losses |
| ``loss/mtr``, ``loss/mte`` | the meta step's meta-train and meta-test losses (meta-learned variants) |
| ``lr/base`` | the base learning rate (first parameter group) |
| ``lr/inner`` | the meta step's inner step size (meta-learned variants) |
| ``rho/mean`` | the mean rho over every MetaBIN channel |
| ``rho/<stage>`` | the mean rho of one stage of the backbone (``rho_per_stage``) |
| ``train/degenerate_losses`` | losses so far that had no triplet |
| ``eval/<target>/<metric>`` | ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` in [0, 1], at the last iteration |

Tensorboard is optional: ``pip install 'metabin-layers[tensorboard]'``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .. import metabin_modules
from .errors import RecipeError

__all__ = [
    "TENSORBOARD_MISSING",
    "EVAL_METRICS",
    "require_tensorboard",
    "tensorboard_writer",
    "rho_per_stage",
    "log_iteration",
    "log_metrics",
]

#: The one-line error of ``tensorboard=true`` without the tensorboard package.
TENSORBOARD_MISSING = "tensorboard=true needs the tensorboard package: pip install 'metabin-layers[tensorboard]'"
#: The evaluation metrics written as ``eval/<target>/<metric>``.
EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
#: Tags of the logged values that are not losses.
_TAGS = {"lr": "lr/base", "inner_lr": "lr/inner", "rho": "rho/mean", "degenerate": "train/degenerate_losses"}


def require_tensorboard() -> None:
    """Raise the one-line ``RecipeError`` ``TENSORBOARD_MISSING`` unless tensorboard can be imported.

    Examples:
        >>> from metabin_layers.reid.events import TENSORBOARD_MISSING
        >>> print(TENSORBOARD_MISSING)
        tensorboard=true needs the tensorboard package: pip install 'metabin-layers[tensorboard]'
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise RecipeError(TENSORBOARD_MISSING)


def tensorboard_writer(output: Path, purge_step: Optional[int] = None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``<output>/tensorboard``.

    Args:
        output: the run folder.
        purge_step: a resumed run's first iteration: tensorboard hides the events of the earlier
            run from this step on (those iterations run again).

    Returns:
        The writer (close it after the run).

    Raises:
        RecipeError: tensorboard is not installed (``TENSORBOARD_MISSING``).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.events import tensorboard_writer
        >>> writer = tensorboard_writer(Path(tempfile.mkdtemp()))  # doctest: +SKIP
        >>> writer.add_scalar("loss/ce", 2.5, 1); writer.close()  # doctest: +SKIP
    """
    require_tensorboard()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # installed but unusable (a version torch refuses)
        raise RecipeError(f"{TENSORBOARD_MISSING} ({err})") from err
    return SummaryWriter(str(Path(output) / "tensorboard"), purge_step=purge_step)


def rho_per_stage(backbone: nn.Module) -> dict[str, float]:
    """The mean rho (over channels, float64) of each stage of ``backbone``, in module order.

    A stage is a top-level child of ``backbone`` holding MetaBIN layers (``bn1``, ``layer1`` ...
    ``layer4`` of a ResNet); when all of them sit in one child (torchvision's ``features``), its
    children are the stages (``features.0``, ...).

    Args:
        backbone: the model, or its backbone.

    Returns:
        Stage name -> mean rho; empty without MetaBIN layers.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d
        >>> from metabin_layers.reid.events import rho_per_stage
        >>> net = nn.Sequential(MetaBIN2d(2, rho_init=0.5), nn.Sequential(MetaBIN2d(2), MetaBIN2d(2, rho_init=0.0)))
        >>> rho_per_stage(net)
        {'0': 0.5, '1': 0.5}
    """
    layers = {id(m) for m in metabin_modules(backbone)}
    named = [(name, m) for name, m in backbone.named_modules() if id(m) in layers]
    depth = 2 if len(named) > 1 and len({n.split(".")[0] for n, _ in named}) == 1 else 1
    groups: dict[str, list[torch.Tensor]] = {}
    for name, m in named:
        key = ".".join(name.split(".")[:depth]) or "root"
        groups.setdefault(key, []).append(m.rho.detach().double().flatten())
    return {k: float(torch.cat(v).mean()) for k, v in groups.items()}


def log_iteration(writer: Any, logs: Mapping[str, Any], backbone: Optional[nn.Module] = None) -> None:
    """Write one logged iteration (a ``Trainer.history`` entry, step ``logs["it"]``) and the rho per stage.

    Args:
        writer: a ``SummaryWriter``.
        logs: the iteration's values (``it`` is the step; every other key a scalar).
        backbone: the model whose ``rho_per_stage`` is written; None: none.

    Examples:
        >>> from metabin_layers.reid.events import log_iteration
        >>> class Recorder:  # what a SummaryWriter gets
        ...     def __init__(self):
        ...         self.scalars = []
        ...     def add_scalar(self, tag, value, step):
        ...         self.scalars.append((tag, value, step))
        >>> writer = Recorder()
        >>> log_iteration(writer, {"ce": 1.5, "lr": 0.01, "it": 3})
        >>> writer.scalars
        [('loss/ce', 1.5, 3), ('lr/base', 0.01, 3)]
    """
    step = int(logs["it"])
    for key, value in logs.items():
        if key != "it":
            writer.add_scalar(_TAGS.get(key, f"loss/{key}"), float(value), step)
    if backbone is not None:
        for stage, value in rho_per_stage(backbone).items():
            writer.add_scalar(f"rho/{stage}", value, step)


def log_metrics(writer: Any, metrics: Mapping[str, Mapping[str, Any]], step: int) -> None:
    """Write the evaluation metrics (``evaluate_model``'s result) as ``eval/<target>/<metric>`` at ``step``.

    Args:
        writer: a ``SummaryWriter``.
        metrics: per target, its metrics (``EVAL_METRICS`` are written, fractions in [0, 1]).
        step: the iteration the model was trained for.

    Examples:
        >>> from metabin_layers.reid.events import log_metrics
        >>> class Recorder:
        ...     def __init__(self):
        ...         self.scalars = []
        ...     def add_scalar(self, tag, value, step):
        ...         self.scalars.append((tag, value, step))
        ...     def flush(self):
        ...         pass
        >>> writer = Recorder()
        >>> log_metrics(writer, {"style4": {"rank1": 0.5, "rank5": 0.75, "rank10": 1.0, "mAP": 0.4, "mINP": 0.2}}, 8)
        >>> writer.scalars[0], writer.scalars[3]
        (('eval/style4/rank1', 0.5, 8), ('eval/style4/mAP', 0.4, 8))
    """
    for target, entry in metrics.items():
        for key in EVAL_METRICS:
            writer.add_scalar(f"eval/{target}/{key}", float(entry[key]), step)
    writer.flush()
