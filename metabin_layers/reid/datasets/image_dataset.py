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
    """An image file is missing, truncated or not an image; ``path`` holds its path."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def read_image(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image.

    Raises:
        UnreadableImageError: naming the path, if the file cannot be read or decoded.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for bad files
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
