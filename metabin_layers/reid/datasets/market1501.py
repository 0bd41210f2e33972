"""Market-1501 (Zheng et al., ICCV 2015)."""

from __future__ import annotations

import os
from typing import ClassVar

from .base import Layout, RawItem, ReIDDataset, find_layout, parse_market_style

__all__ = ["Market1501"]

_SUBSETS = ("bounding_box_train", "query", "bounding_box_test")


class Market1501(ReIDDataset):
    """Market-1501: 751 training ids (12,936 images), 750 test ids (3,368 query, 19,732 gallery
    images), 6 cameras.

    Accepted layouts (first match wins)::

        <root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}   (fast-reid, MetaBIN)
        <root>/market1501/Market-1501-v15.09.15/{...}                                (torchreid)
        <root>/market1501/{...}                                                      (torchreid, flat)
        <root>/{...}                                                                 (root is the dataset folder)

    File names ``<pid>_c<cam>s<seq>_<frame>_<box>.jpg``: pid -1 (junk) is dropped, pid 0
    (distractors) stays in the gallery and is dropped by ``combine_all``; camids are 0-based.

    Args:
        root: folder searched for the layouts above.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import Market1501
        >>> files = ["bounding_box_train/0001_c1s1_000151_01.jpg", "query/0002_c1s1_000451_03.jpg",
        ...          "bounding_box_test/0002_c2s1_000301_01.jpg", "bounding_box_test/-1_c3s1_000001_00.jpg"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "Market-1501-v15.09.15", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = Market1501(root)
        >>> len(ds.train), len(ds.query), len(ds.gallery)  # the junk image (pid -1) is dropped
        (1, 1, 1)
        >>> ds.query[0].pid, ds.gallery[0].camid
        (2, 1)
    """

    name: ClassVar[str] = "Market1501"
    junk_pids: ClassVar[frozenset[int]] = frozenset({0, -1})
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub, _SUBSETS) for sub in ("Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501", "")
    )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        _, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        train, query, gallery = (parse_market_style(os.path.join(self.dataset_dir, sub), self.name) for sub in _SUBSETS)
        return train, query, gallery
