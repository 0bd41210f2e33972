"""metabin-layers: Meta Batch-Instance Normalization (MetaBIN, CVPR 2021) for any PyTorch CNN.

Example:
    >>> import torch, torchvision
    >>> from metabin_layers import convert_bn_to_metabin, base_parameters, MetaBINOptimizer
    >>> model = convert_bn_to_metabin(torchvision.models.resnet18(num_classes=10))
    >>> base = torch.optim.SGD(base_parameters(model), lr=0.01, momentum=0.9)
    >>> opt = MetaBINOptimizer(model, base, rho_lr=0.1)
"""

from . import losses
from .convert import base_parameters, convert_bn_to_metabin, metabin_modules, rho_parameters
from .distributed import DistributedStepError, SyncMetaBIN, convert_sync_metabin
from .episode import ConstantInnerLR, CyclicInnerLR, DomainSplit, InnerLR, split_domains
from .export import FoldedMetaBIN, FoldedMetaBINAct2d, fold_metabin_for_inference
from .functional import BACKENDS, batch_instance_norm, resolve_backend
from .layers import STATS_MODES, MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, set_stats_mode, stats_mode
from .losses import (
    cross_entropy_label_smooth,
    inter_domain_shuffle_loss,
    intra_domain_scatter_loss,
    triplet_loss,
)
from .optim import MetaBINOptimizer

__version__ = "0.1.0"

__all__ = [
    "MetaBIN1d",
    "MetaBIN2d",
    "MetaBIN3d",
    "MetaBINAct2d",
    "STATS_MODES",
    "set_stats_mode",
    "stats_mode",
    "batch_instance_norm",
    "BACKENDS",
    "resolve_backend",
    "fold_metabin_for_inference",
    "FoldedMetaBIN",
    "FoldedMetaBINAct2d",
    "convert_bn_to_metabin",
    "metabin_modules",
    "rho_parameters",
    "base_parameters",
    "MetaBINOptimizer",
    "SyncMetaBIN",
    "convert_sync_metabin",
    "DistributedStepError",
    "InnerLR",
    "CyclicInnerLR",
    "ConstantInnerLR",
    "DomainSplit",
    "split_domains",
    "losses",
    "triplet_loss",
    "cross_entropy_label_smooth",
    "intra_domain_scatter_loss",
    "inter_domain_shuffle_loss",
    "__version__",
]
