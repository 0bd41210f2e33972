"""DukeMTMC-reID (Zheng et al., ICCV 2017; Ristani et al., ECCVW 2016)."""

from __future__ import annotations

import os
from typing import ClassVar

from .base import Layout, RawItem, ReIDDataset, find_layout, parse_market_style

__all__ = ["DukeMTMCreID"]

_SUBSETS = ("bounding_box_train", "query", "bounding_box_test")


class DukeMTMCreID(ReIDDataset):
    """DukeMTMC-reID: 702 training ids (16,522 images), 702 test ids (2,228 query, 17,661
    gallery images incl. 408 distractor ids), 8 cameras.

    Accepted layouts (first match wins)::

        <root>/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}   (fast-reid, MetaBIN)
        <root>/dukemtmc-reid/DukeMTMC-reID/{...}                             (torchreid)
        <root>/dukemtmcreid/DukeMTMC-reID/{...}
        <root>/{...}                                                         (root is the dataset folder)

    File names ``<pid>_c<cam>_f<frame>.jpg`` (Market-style regex); camids are 0-based.

    Args:
        root: folder searched for the layouts above.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import DukeMTMCreID
        >>> files = ["bounding_box_train/0001_c2_f0046182.jpg", "query/0005_c1_f0051781.jpg",
        ...          "bounding_box_test/0005_c5_f0051000.jpg"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "DukeMTMC-reID", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = DukeMTMCreID(root, combine_all=True)
        >>> [(item.pid, item.camid) for item in ds.train]  # id 5 (query + gallery) is label 1
        [(0, 1), (1, 0), (1, 4)]
    """

    name: ClassVar[str] = "DukeMTMCreID"
    junk_pids: ClassVar[frozenset[int]] = frozenset({-1})
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub, _SUBSETS) for sub in ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID", "")
    )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        _, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        train, query, gallery = (parse_market_style(os.path.join(self.dataset_dir, sub), self.name) for sub in _SUBSETS)
        return train, query, gallery
