"""CUHK-SYSU person-search dataset, cropped person images (Xiao et al., CVPR 2017)."""

from __future__ import annotations

import os
import re
from typing import ClassVar

from .base import Layout, RawItem, ReIDDataset, find_layout, list_images

__all__ = ["CUHKSYSU"]

_PID_RE = re.compile(r"^p(-?\d+)_")


class CUHKSYSU(ReIDDataset):
    """CUHK-SYSU cropped persons: a training-only source (11,934 ids in torchreid's crop).

    Accepted layouts (first match wins)::

        <root>/cuhksysu/cropped_images/     (torchreid: p11422_s16929_1.jpg)
        <root>/cuhk_sysu/cropped_images/    (fast-reid)
        <root>/CUHK-SYSU/cropped_image/     (MetaBIN's make_cropped_image.m: p00001_n01_s00001_hard0.png)
        <root>/CUHK-SYSU/cropped_images/
        <root>/cropped_images/

    The identity is the ``p<number>`` prefix of the file name (pid -1 dropped); every image
    has camid 0 (the crops carry no camera). ``query`` and ``gallery`` are empty (fast-reid
    convention for training-only sources); ``combine_all`` therefore changes nothing.

    Args:
        root: folder searched for the layouts above.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import CUHKSYSU
        >>> with tempfile.TemporaryDirectory() as root:
        ...     folder = os.path.join(root, "cuhksysu", "cropped_images")
        ...     os.makedirs(folder)
        ...     for name in ("p11422_s16929_1.jpg", "p11422_s16930_2.jpg", "p00005_s00001_1.jpg"):
        ...         Image.new("RGB", (8, 16)).save(os.path.join(folder, name))
        ...     ds = CUHKSYSU(root)
        >>> [item.pid for item in ds.train], ds.query
        ([0, 1, 1], [])
    """

    name: ClassVar[str] = "CUHKSYSU"
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub)
        for sub in (
            "cuhksysu/cropped_images",
            "cuhk_sysu/cropped_images",
            "CUHK-SYSU/cropped_image",
            "CUHK-SYSU/cropped_images",
            "cropped_images",
        )
    )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        _, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        train: list[RawItem] = []
        for path in list_images(self.dataset_dir):
            match = _PID_RE.match(os.path.basename(path))
            if match is None:
                raise ValueError(
                    f"{self.name}: cannot parse identity from file name {path!r}; "
                    "expected names like 'p11422_s16929_1.jpg' (p<pid>_...)"
                )
            pid = int(match.group(1))
            if pid == -1:
                continue
            train.append((path, pid, 0))
        if not train:
            raise ValueError(f"{self.name}: no person images found in {self.dataset_dir!r}")
        return train, [], []
