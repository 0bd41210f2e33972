"""A ``torch.utils.data.Dataset`` over ``ReIDItem`` lists."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .base import ReIDItem

__all__ = ["ImageDataset", "UnreadableImageError", "read_image"]


class UnreadableImageError(OSError):
    """An image file is missing, truncated or not an image; ``path`` holds its path.

    Args:
        message: the error message (``read_image`` names the path and PIL's error).
        path: the image file that could not be read.

    Examples:
        >>> import os, tempfile
        >>> from metabin_layers.reid.datasets import UnreadableImageError, read_image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "0001_c1_1.jpg")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not an image")
        ...     try:
        ...         read_image(path)
        ...     except UnreadableImageError as err:
        ...         os.path.basename(err.path), isinstance(err, OSError)
        ('0001_c1_1.jpg', True)
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def read_image(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image.

    Args:
        path: the image file.

    Returns:
        The decoded image, converted to RGB (and detached from the file, which is closed).

    Raises:
        UnreadableImageError: naming the path, if the file cannot be read or decoded.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import read_image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "gray.png")
        ...     Image.new("L", (8, 16)).save(path)
        ...     img = read_image(path)
        >>> img.mode, img.size
        ('RGB', (8, 16))
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL raises all four for bad files
        raise UnreadableImageError(f"cannot read image {path!r}: {type(exc).__name__}: {exc}", path) from exc


class ImageDataset(Dataset[dict[str, Any]]):
    """Images of a Re-ID item list.

    ``dataset[i]`` is ``{"img": transform(image), "pid": int, "camid": int, "domain": int,
    "path": str}`` (torchreid's dict, ``impath`` renamed ``path``, ``dsetid`` -> ``domain``).
    Without a transform ``img`` is an RGB PIL image.

    Args:
        items: ``ReIDItem`` s or tuples ``(img_path, pid, camid[, domain])``.
        transform: applied to the PIL image.
        check_files: verify at construction that every file exists (a
            ``FileNotFoundError`` lists the first missing ones), instead of failing later in a
            loader worker.

    Raises:
        UnreadableImageError: from ``__getitem__``, naming the path of an image that cannot be
            read (in a ``DataLoader`` worker the message reaches the main process unchanged).

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import ImageDataset
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "0002_c1s1_000451_03.jpg")
        ...     Image.new("RGB", (64, 128)).save(path)
        ...     sample = ImageDataset([(path, 2, 0)], transform=lambda img: img.size)[0]
        >>> sample["img"], sample["pid"], sample["camid"], sample["domain"]
        ((64, 128), 2, 0, 0)
    """

    def __init__(
        self,
        items: Sequence[ReIDItem | tuple[Any, ...]],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        check_files: bool = False,
    ) -> None:
        self.items = [it if isinstance(it, ReIDItem) else ReIDItem(*it) for it in items]
        self.transform = transform
        if check_files:
            missing = [it.img_path for it in self.items if not os.path.isfile(it.img_path)]
            if missing:
                raise FileNotFoundError(
                    f"ImageDataset: {len(missing)} of {len(self.items)} image files are missing, e.g. "
                    + ", ".join(repr(p) for p in missing[:3])
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        img: Any = read_image(item.img_path)
        if self.transform is not None:
            img = self.transform(img)
        return {"img": img, "pid": item.pid, "camid": item.camid, "domain": item.domain, "path": item.img_path}
