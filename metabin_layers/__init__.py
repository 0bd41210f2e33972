"""metabin-layers: Meta Batch-Instance Normalization (MetaBIN, CVPR 2021) for any PyTorch CNN.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin
    >>> model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    >>> base = torch.optim.SGD(base_parameters(model), lr=0.01, momentum=0.9)
    >>> opt = MetaBINOptimizer(model, base, rho_lr=0.1)
"""

from . import losses
from .convert import convert_bn_to_metabin
from .distributed import SyncMetaBIN, convert_sync_metabin
from .export import fold_metabin_for_inference
from .factory import create_norm_layer, get_norm_layer
from .graphs import CapturedIteration
from .layers import (
    MetaBIN1d,
    MetaBIN2d,
    MetaBIN3d,
    MetaBINAct2d,
    base_parameters,
    check_rho,
    clamp_rho_,
    metabin_modules,
    rho_parameters,
    stats_mode,
)
from .optim import MetaBINOptimizer
from .precise_bn import update_bn_stats

__version__ = "0.1.0"

__all__ = [
    "MetaBIN1d",
    "MetaBIN2d",
    "MetaBIN3d",
    "MetaBINAct2d",
    "SyncMetaBIN",
    "get_norm_layer",
    "create_norm_layer",
    "convert_bn_to_metabin",
    "convert_sync_metabin",
    "MetaBINOptimizer",
    "CapturedIteration",
    "metabin_modules",
    "rho_parameters",
    "base_parameters",
    "check_rho",
    "clamp_rho_",
    "stats_mode",
    "fold_metabin_for_inference",
    "update_bn_stats",
    "losses",
    "__version__",
]
