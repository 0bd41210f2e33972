"""Image transforms of the Re-ID recipe (the paper's / authors' pipeline, on torchvision).

Train (authors' ``data/transforms/build.py``): bicubic resize to ``height x width``, random
horizontal flip (p=0.5), zero padding of ``pad`` pixels followed by a random crop back to
``height x width``, optional colour jitter (their single-source configs only), then
``ToTensor`` and normalisation with the ImageNet mean/std.

Test: bicubic resize, ``ToTensor``, normalisation (no flip test-time augmentation).

The authors keep pixels in ``[0, 255]`` and normalise inside the model with ``mean * 255`` and
``std * 255``; ``ToTensor`` (``[0, 1]``) followed by ``Normalize(mean, std)`` is the same map.

Both builders accept PIL images, ``uint8`` numpy arrays of shape ``(H, W, 3)`` or ``(H, W)``
(what ``metabin_layers.reid.synthetic.SyntheticReID`` renders) and ``uint8`` torch tensors
of shape ``(3, H, W)``.

Examples:
    >>> import numpy as np
    >>> from metabin_layers.reid.transforms import build_test_transform
    >>> t = build_test_transform(64, 32)
    >>> t(np.zeros((128, 64, 3), dtype=np.uint8)).shape
    torch.Size([3, 64, 32])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ToPILImage",
    "build_train_transform",
    "build_test_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ToPILImage:
    """Convert a PIL image, a ``uint8`` HWC / HW numpy array or a ``uint8`` CHW tensor to RGB PIL.

    Module-level class (not a lambda) so that transforms pickle into DataLoader workers.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.transforms import ToPILImage
        >>> ToPILImage()(np.zeros((4, 2, 3), dtype=np.uint8)).size
        (2, 4)
    """

    def __call__(self, img: Any) -> Image.Image:
        if isinstance(img, Image.Image):
            return img if img.mode == "RGB" else img.convert("RGB")
        if isinstance(img, torch.Tensor):
            if img.dtype != torch.uint8 or img.ndim not in (2, 3):
                raise TypeError(
                    f"img: expected a uint8 tensor of shape (C, H, W) or (H, W), got "
                    f"dtype {img.dtype} and shape {tuple(img.shape)}"
                )
            if img.ndim == 3:
                img = img.permute(1, 2, 0)
            img = img.cpu().numpy()
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8:
                raise TypeError(f"img: expected a uint8 numpy array, got dtype {img.dtype}")
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            if img.ndim == 2:
                return Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
            if img.ndim == 3 and img.shape[2] in (3, 4):
                return Image.fromarray(np.ascontiguousarray(img[:, :, :3]))
            raise TypeError(f"img: expected an array of shape (H, W, 3) or (H, W), got {img.shape}")
        raise TypeError(f"img: unsupported type {type(img).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _normalize(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Callable]:
    if mean is None and std is None:
        return []
    if mean is None or std is None:
        raise ValueError("mean and std must both be given or both be None")
    return [T.Normalize(mean=list(mean), std=list(std))]


def build_train_transform(
    height: int = 256,
    width: int = 128,
    flip: bool = True,
    pad: int = 10,
    color_jitter: bool = False,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> T.Compose:
    """Training transform: resize (bicubic), flip, pad + random crop, [jitter], tensor, normalise.

    Args:
        height, width: output size (the paper: 256 x 128).
        flip: random horizontal flip with probability 0.5.
        pad: zero padding (pixels) before a random ``height x width`` crop; 0 disables both.
            For small images scale it with the height (e.g. ``pad=3`` at 64 x 32).
        color_jitter: the authors' single-source jitter (brightness 0.15, contrast 0.15,
            saturation 0.1, hue 0.1, always applied).
        mean, std: normalisation; ``None`` for both leaves the ``[0, 1]`` tensor as is.

    Returns:
        A ``torchvision.transforms.Compose`` mapping an image to a float tensor ``(3, H, W)``.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.transforms import build_train_transform
        >>> t = build_train_transform(64, 32, pad=3)
        >>> t(np.full((64, 32, 3), 128, dtype=np.uint8)).shape
        torch.Size([3, 64, 32])
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    steps: list[Callable] = [
        ToPILImage(),
        T.Resize((height, width), interpolation=InterpolationMode.BICUBIC),
    ]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    if pad > 0:
        steps += [T.Pad(pad, fill=0, padding_mode="constant"), T.RandomCrop((height, width))]
    if color_jitter:
        steps.append(T.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.1))
    steps.append(T.ToTensor())
    steps += _normalize(mean, std)
    return T.Compose(steps)


def build_test_transform(
    height: int = 256,
    width: int = 128,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> T.Compose:
    """Test transform: bicubic resize, tensor, normalise (deterministic).

    Args:
        height: output height (the paper: 256).
        width: output width (the paper: 128).
        mean: per-channel normalisation mean; ``None`` (with ``std=None``) leaves ``[0, 1]`` values.
        std: per-channel normalisation standard deviation.

    Returns:
        A ``torchvision.transforms.Compose`` mapping an image to a float tensor ``(3, H, W)``.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.transforms import build_test_transform
        >>> t = build_test_transform(64, 32, mean=None, std=None)
        >>> float(t(np.full((8, 4, 3), 255, dtype=np.uint8)).max())
        1.0
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    steps: list[Callable] = [
        ToPILImage(),
        T.Resize((height, width), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
    ]
    steps += _normalize(mean, std)
    return T.Compose(steps)
