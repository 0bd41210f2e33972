"""The MobileNetV2 of the MetaBIN authors: torchreid's design at width 1.4, their module names.

Channels are ``int(c * 1.4)`` of torchreid's 32 / 16 / 24 / 32 / 64 / 96 / 160 / 320 (44 / 22 /
33 / 44 / 89 / 134 / 224 / 448) and the last 1x1 block gives ``int(1280 * 1.4) = 1792``, as in
their ``mobilenet_v2.py``. timm's ``mobilenetv2_140`` rounds widths to multiples of 8, so their
checkpoints do not fit it. Module names follow theirs (``layer1`` .. ``layer9``; blocks hold
``conv1``, ``dwconv2``, ``conv3`` and ``bn``), so their backbone keys load unchanged;
``rename_torchreid_keys`` maps torchreid's ImageNet checkpoint names (``conv1`` .. ``conv9``,
``conv3.0`` / ``conv3.1``) onto them.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

__all__ = ["MobileNetV2x14", "rename_torchreid_keys"]

# (expansion t, channels c, repeats n, stride s) of torchreid's stages 2..8, before the width factor
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBlock(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU6."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand (present for t = 1 too), 3x3 depthwise, 1x1 projection + BN."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv1 = ConvBlock(cin, mid, 1)
        self.dwconv2 = ConvBlock(mid, mid, 3, stride, 1, groups=mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        m = self.bn(self.conv3(self.dwconv2(self.conv1(x))))
        return x + m if self.use_residual else m


class MobileNetV2x14(nn.Module):
    """Feature-map trunk (``forward(x) -> (N, 1792, H / 16, W / 16)`` with ``last_stride=1``).

    ``last_stride`` is the stride of the 160-channel stage (theirs: 1, so a 256x128 image gives a
    16x8 map).

    Args:
        width_mult: Width factor applied to torchreid's channel counts (the authors': 1.4).
        last_stride: Stride of the 160-channel stage, 1 or 2.

    Raises:
        ValueError: If ``last_stride`` is not 1 or 2.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.mobilenetv2 import MobileNetV2x14
        >>> net = MobileNetV2x14()
        >>> tuple(net(torch.randn(1, 3, 64, 32)).shape)
        (1, 1792, 4, 2)
        >>> [net.layer1.conv.out_channels] + [getattr(net, f"layer{i}")[-1].bn.num_features for i in range(2, 9)]
        [44, 22, 33, 44, 89, 134, 224, 448]
    """

    def __init__(self, width_mult: float = 1.4, last_stride: int = 1) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        channels = int(32 * width_mult)
        self.layer1 = ConvBlock(3, channels, 3, stride=2, padding=1)
        for i, (t, c, n, s) in enumerate(_STAGES, start=2):
            stride = last_stride if c == 160 else s
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(channels, int(c * width_mult), t, stride if j == 0 else 1))
                channels = int(c * width_mult)
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.feature_dim = int(1280 * width_mult) if width_mult > 1 else 1280
        self.layer9 = ConvBlock(channels, self.feature_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 10):
            x = getattr(self, f"layer{i}")(x)
        return x


def rename_torchreid_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchreid's MobileNetV2 key names (``conv1`` .. ``conv9``, ``conv3.0`` / ``conv3.1``) -> ours.

    Args:
        state: A state dict with torchreid's MobileNetV2 key names.

    Returns:
        A new dict with the same values under ``MobileNetV2x14`` key names (other keys unchanged).

    Examples:
        >>> from metabin_layers.reid.mobilenetv2 import rename_torchreid_keys
        >>> sorted(rename_torchreid_keys({"conv2.0.conv3.1.weight": 0, "conv9.bn.bias": 0, "classifier.weight": 0}))
        ['classifier.weight', 'layer2.0.bn.weight', 'layer9.bn.bias']
    """
    out = {}
    for key, value in state.items():
        key = re.sub(r"^conv([1-9])\.", r"layer\1.", key)
        key = re.sub(r"^(layer[2-8]\.\d+)\.conv3\.0\.", r"\1.conv3.", key)
        key = re.sub(r"^(layer[2-8]\.\d+)\.conv3\.1\.", r"\1.bn.", key)
        out[key] = value
    return out
