"""Re-ID model: a timm/torchvision backbone, global average pooling, a BN neck and a classifier.

The backbone's BatchNorms become MetaBIN layers (the neck and classifier stay plain, as in the
paper); ``NORM_VARIANTS`` selects the normalization of the comparison table of the paper.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import convert_bn_to_metabin, metabin_modules

__all__ = [
    "NORM_VARIANTS",
    "MOBILENETV2_X1_4",
    "META_LEARNED_NORMS",
    "END_TO_END_RHO_NORMS",
    "ReIDModel",
    "build_backbone",
    "apply_norm_variant",
    "tie_branch_affines",
    "load_pretrained",
]

#: ``bn``: plain BatchNorm; ``in``: affine InstanceNorm everywhere; ``bin-half``: first half of
#: the channels BN, the rest IN; ``bin``: MetaBIN layers (one affine per branch) with rho trained
#: end to end with the weights; ``bin-gate1``: Nam & Kim's BIN as the paper compares it (one shared
#: affine, ``gamma * (rho * x_hat_B + (1 - rho) * x_hat_I) + beta``, rho trained end to end);
#: ``metabin``: rho meta-learned (the paper); ``metabin-gate1``: rho meta-learned in gate1 layers
#: (the paper's ablation "MetaBIN, replace with BIN").
NORM_VARIANTS = ("bn", "in", "bin-half", "bin", "bin-gate1", "metabin", "metabin-gate1")
#: The authors' MobileNetV2 x1.4 (torchreid widths; timm's ``mobilenetv2_140`` has other widths).
MOBILENETV2_X1_4 = "mobilenetv2_x1_4"
#: Variants whose rho is meta-learned by MetaBINOptimizer episodes.
META_LEARNED_NORMS = ("metabin", "metabin-gate1")
#: Variants whose rho is trained end to end with the base loss (its own SGD, clamped to [0, 1]).
END_TO_END_RHO_NORMS = ("bin", "bin-gate1")


def _set_last_stride_one(backbone: nn.Module) -> None:
    """Turn the last stride-2 stage into stride 1 (the usual Re-ID trick: finer last map)."""
    layer4 = getattr(backbone, "layer4", None)
    if isinstance(layer4, nn.Sequential):  # ResNet family (timm and torchvision)
        block = layer4[0]
        for name, m in block.named_modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
            if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) and name.startswith("downsample"):
                m.stride, m.kernel_size = 1, 1  # timm's avg-down shortcut
        return
    strided = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    if not strided:
        raise ValueError("last_stride=1: the backbone has no stride-2 convolution")
    strided[-1].stride = (1, 1)  # MobileNet/EfficientNet: a stride block has no shortcut


class _TorchvisionTrunk(nn.Module):
    """The feature-map part of a torchvision classifier (everything before pooling)."""

    features: nn.Module

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model, "features"):  # mobilenet, efficientnet, densenet, vgg
            self.features = model.features  # type: ignore[assignment]
        else:  # resnet / regnet / shufflenet: all children before the pooling
            names = [n for n, _ in model.named_children()]
            stop = next(i for i, n in enumerate(names) if n in ("avgpool", "fc", "classifier"))
            self.features = nn.Sequential(*[getattr(model, n) for n in names[:stop]])
        # resnets expose layer4 for last-stride handling
        if hasattr(model, "layer4"):
            self.layer4 = model.layer4

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def build_backbone(name: str, last_stride: int = 1) -> tuple[nn.Module, int]:
    """Build a feature-map backbone by name: ``"resnet50"`` (timm), ``"tv:resnet50"`` (torchvision)
    or ``"mobilenetv2_x1_4"`` (the authors' MobileNetV2 x1.4, ``metabin_layers.reid.mobilenetv2``).

    No weights are downloaded; load them with ``load_pretrained``.

    Args:
        name: A timm model name, ``"tv:<name>"`` for a torchvision model, or ``MOBILENETV2_X1_4``.
        last_stride: Stride of the last stride-2 stage: 1 (the Re-ID default, a finer last map) or 2.

    Returns:
        The backbone (``forward(x) -> (N, C, H, W)``) and its channel count ``C``.

    Raises:
        ValueError: If ``last_stride`` is not 1 or 2, or the model name is unknown.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.model import build_backbone
        >>> net, channels = build_backbone("resnet18")
        >>> channels, tuple(net(torch.randn(2, 3, 64, 32)).shape)
        (512, (2, 512, 4, 2))
    """
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    if name == MOBILENETV2_X1_4:  # the authors' torchreid-style MobileNetV2 (their widths)
        from .mobilenetv2 import MobileNetV2x14

        net = MobileNetV2x14(last_stride=last_stride)
        return net, net.feature_dim
    if name.startswith("tv:"):
        import torchvision

        try:
            model = torchvision.models.get_model(name[3:], weights=None)
        except ValueError as e:
            raise ValueError(f"unknown torchvision model {name[3:]!r}") from e
        backbone: nn.Module = _TorchvisionTrunk(model)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (use 'tv:<name>' for torchvision models)")
        backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    if last_stride == 1:
        _set_last_stride_one(backbone)
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        channels = backbone(torch.zeros(1, 3, 64, 32)).shape[1]
        backbone.train(was_training)
    return backbone, int(channels)


def load_pretrained(module: nn.Module, path: str) -> list[str]:
    """Load a local checkpoint (a state dict, or a dict holding one under ``model``/``state_dict``).

    Keys that do not fit (e.g. an ImageNet classifier) are ignored. Nothing is downloaded.
    torchreid's MobileNetV2 key names are renamed for ``MobileNetV2x14`` (``rename_torchreid_keys``).

    Args:
        module: The backbone to load into (before its BatchNorms are converted).
        path: A local checkpoint file, read with ``torch.load(weights_only=True)``.

    Returns:
        The keys of ``module`` that the checkpoint did not provide.

    Raises:
        ValueError: If the file holds no state dict, or no tensor of it fits ``module``.

    Examples:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from metabin_layers.reid.model import load_pretrained
        >>> src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
        >>> torch.save({"state_dict": src.state_dict()}, path)
        >>> dst = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
        >>> load_pretrained(dst, path)
        ['2.weight', '2.bias']
        >>> torch.equal(dst[0].weight, src[0].weight)
        True
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'model'/'state_dict'), got {type(state).__name__}")
    if type(module).__name__ == "MobileNetV2x14":  # torchreid's ImageNet files use other names
        from .mobilenetv2 import rename_torchreid_keys

        state = rename_torchreid_keys(state)
    own = module.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"{path}: no tensor of the checkpoint matches the backbone (wrong architecture?)")
    return module.load_state_dict(fitting, strict=False).missing_keys


def tie_branch_affines(model: nn.Module) -> nn.Module:
    """Make every MetaBIN layer of ``model`` a gate1 (Nam & Kim) layer: one affine for both branches.

    The IN-branch ``in_weight`` / ``in_bias`` become the BN-branch ``weight`` / ``bias`` Parameter
    objects, so the layer's single affine map per (sample, channel) computes
    ``rho * (g x_hat_B + b) + (1 - rho) * (g x_hat_I + b) = g (rho x_hat_B + (1 - rho) x_hat_I) + b``
    with the same code and backends as MetaBIN; both branches' gradients accumulate into the
    shared Parameters, and ``model.parameters()`` lists each once. The state dict keeps the
    ``in_weight`` / ``in_bias`` keys (equal to ``weight`` / ``bias``).

    Args:
        model: A module holding MetaBIN layers (with affines); changed in place.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: If a MetaBIN layer has no affine.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import convert_bn_to_metabin, metabin_modules
        >>> from metabin_layers.reid.model import tie_branch_affines
        >>> net = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> m = metabin_modules(tie_branch_affines(net))[0]
        >>> m.in_weight is m.weight, len(list(net.parameters()))
        (True, 5)
    """
    for m in metabin_modules(model):
        if m.weight is None or m.bias is None:
            raise ValueError(f"tie_branch_affines needs affine layers, got {type(m).__name__} with affine=False")
        m.in_weight = m.weight
        m.in_bias = m.bias
    return model


def apply_norm_variant(backbone: nn.Module, variant: str, rho_init: float = 1.0, in_affine_init: str = "copy") -> nn.Module:
    """Convert ``backbone``'s BatchNorms for one of ``NORM_VARIANTS``.

    ``in`` and ``bin-half`` are MetaBIN layers with a fixed rho (0, or 1 on the first
    ``ceil(C/2)`` channels and 0 on the rest) and the unused branch frozen: the same math as the
    authors' IN / BIN_half layers with one implementation. ``bin-gate1`` and ``metabin-gate1``
    tie the two branches' affines (``tie_branch_affines``). ``in_affine_init`` is passed to
    ``convert_bn_to_metabin`` (``"identity"``: the authors' IN affine 1 / 0).

    Args:
        backbone: The backbone whose BatchNorms are converted (in place where possible).
        variant: One of ``NORM_VARIANTS``; ``"bn"`` returns ``backbone`` unchanged.
        rho_init: Initial rho of the MetaBIN layers (overridden for ``in`` and ``bin-half``).
        in_affine_init: How the IN affine starts: ``"copy"`` (the BN affine) or ``"identity"`` (1 / 0).

    Returns:
        The converted backbone.

    Raises:
        ValueError: If ``variant`` is not one of ``NORM_VARIANTS``.

    Examples:
        >>> from metabin_layers import metabin_modules
        >>> from metabin_layers.reid.model import apply_norm_variant, build_backbone
        >>> net, _ = build_backbone("resnet18")
        >>> net = apply_norm_variant(net, "bin-half")
        >>> metabin_modules(net)[0].rho[:3].tolist(), metabin_modules(net)[0].rho[-1].item()
        ([1.0, 1.0, 1.0], 0.0)
    """
    if variant not in NORM_VARIANTS:
        raise ValueError(f"norm must be one of {NORM_VARIANTS}, got {variant!r}")
    if variant == "bn":
        return backbone
    backbone = convert_bn_to_metabin(backbone, rho_init=rho_init, in_affine_init=in_affine_init)
    if variant.endswith("gate1"):
        return tie_branch_affines(backbone)
    if variant in ("in", "bin-half"):
        for m in metabin_modules(backbone):
            with torch.no_grad():
                m.rho.zero_()
                if variant == "bin-half":
                    m.rho[: math.ceil(m.num_features / 2)] = 1.0
            m.rho.requires_grad_(False)
            if variant == "in" and m.weight is not None and m.bias is not None:
                m.weight.requires_grad_(False)  # the BN branch is unused
                m.bias.requires_grad_(False)
    return backbone


class ReIDModel(nn.Module):
    """Backbone -> global average pooling -> BN neck (bias frozen at 0) -> linear classifier.

    ``forward`` returns ``(features, logits)`` in training, where ``features`` are the pooled
    features *before* the neck (used by the triplet and meta losses), and the neck output (the
    test embedding) in eval mode.

    Args:
        backbone: A backbone name for ``build_backbone``, or a feature-map module (then ``feat_dim``
            is required).
        num_classes: Number of training identities (classifier outputs), at least 1.
        norm: The normalization, one of ``NORM_VARIANTS``.
        last_stride: Stride of the backbone's last stride-2 stage (1 or 2); for a name only.
        pretrained_path: A local checkpoint loaded into the backbone (``load_pretrained``) before
            its BatchNorms are converted; ``None``: random weights.
        rho_init: Initial rho of the MetaBIN layers.
        feat_dim: Channel count of a backbone given as a module.
        in_affine_init: How the IN affine starts: ``"copy"`` (the BN affine) or ``"identity"`` (1 / 0).

    Raises:
        ValueError: If ``num_classes < 1``, or ``backbone`` is a module and ``feat_dim`` is missing.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.model import ReIDModel
        >>> model = ReIDModel("resnet18", num_classes=10)
        >>> feats, logits = model(torch.randn(4, 3, 64, 32))
        >>> feats.shape, logits.shape
        (torch.Size([4, 512]), torch.Size([4, 10]))
        >>> model.eval()(torch.randn(2, 3, 64, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet50",
        num_classes: int = 1000,
        norm: str = "metabin",
        last_stride: int = 1,
        pretrained_path: Optional[str] = None,
        rho_init: float = 1.0,
        feat_dim: Optional[int] = None,
        in_affine_init: str = "copy",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(backbone, str):
            net, channels = build_backbone(backbone, last_stride)
        else:
            if feat_dim is None:
                raise ValueError("feat_dim is required when backbone is a module")
            net, channels = backbone, feat_dim
        if pretrained_path:
            load_pretrained(net, pretrained_path)  # before conversion: BN keys load as they are
        self.backbone = apply_norm_variant(net, norm, rho_init, in_affine_init)
        self.norm = norm
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.BatchNorm1d(channels)
        self.neck.bias.requires_grad_(False)  # BNNeck: no shift
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.feat_dim = channels

    def forward(self, x: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        features = self.pool(self.backbone(x)).flatten(1)
        embedding = self.neck(features)
        if not self.training:
            return embedding
        return features, self.classifier(embedding)
