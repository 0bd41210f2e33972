"""MSMT17 (Wei et al., CVPR 2018), versions V1 and V2."""

from __future__ import annotations

import os
from typing import ClassVar

from .base import Layout, RawItem, ReIDDataset, find_layout

__all__ = ["MSMT17"]

_LISTS = ("list_train.txt", "list_query.txt", "list_gallery.txt")
#: (train folder, test folder) of V2 and V1.
_VERSIONS = (("mask_train_v2", "mask_test_v2"), ("train", "test"))
_MAIN_DIRS = ("msmt17/MSMT17_V2", "msmt17/MSMT17_V1", "MSMT17_V2", "MSMT17_V1", "msmt17", "")


class MSMT17(ReIDDataset):
    """MSMT17: 1,041 training ids (30,248 images + 2,373 validation images), 3,060 test ids
    (11,659 query, 82,161 gallery images), 15 cameras.

    Accepted layouts (first match wins; V2 before V1)::

        <root>/msmt17/MSMT17_V2/{mask_train_v2,mask_test_v2,list_train.txt,list_query.txt,list_gallery.txt}
        <root>/msmt17/MSMT17_V1/{train,test,list_*.txt}                      (torchreid)
        <root>/MSMT17_V2/{...}, <root>/MSMT17_V1/{...}                        (fast-reid)
        <root>/msmt17/{...}, <root>/{...}                                     (either version)

    Lines of ``list_*.txt`` are ``<folder>/<file> <pid>``; camid = third ``_`` field of the
    file name - 1. ``list_val.txt`` (optional) is added to ``train`` only with ``combine_all``
    (torchreid). Train and test ids are numbered separately in MSMT17; ``combine_all`` keeps
    them apart (test labels follow the training ones). Query/gallery pids are the list's ids.

    Args:
        root: folder searched for the layouts above.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import MSMT17
        >>> lists = [("list_train.txt", "train", "0000/0000_000_01_0303morning_0015_0.jpg"),
        ...          ("list_query.txt", "test", "0000/0000_000_01_0303morning_0036_0.jpg"),
        ...          ("list_gallery.txt", "test", "0000/0000_001_07_0303noon_0011_1.jpg")]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for list_name, folder, name in lists:
        ...         path = os.path.join(root, "MSMT17_V1", folder, name)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...         with open(os.path.join(root, "MSMT17_V1", list_name), "w") as f:
        ...             print(name, 0, file=f)
        ...     ds = MSMT17(root)
        >>> [(item.pid, item.camid) for item in (*ds.train, *ds.query, *ds.gallery)]
        [(0, 0), (0, 0), (0, 6)]
    """

    name: ClassVar[str] = "MSMT17"
    layouts: ClassVar[tuple[Layout, ...]] = tuple(Layout(main, version, _LISTS) for main in _MAIN_DIRS for version in _VERSIONS)
    expected: ClassVar[str] = (
        "<root>/[msmt17/]MSMT17_V2/{mask_train_v2,mask_test_v2,list_train.txt,list_query.txt,"
        "list_gallery.txt} or <root>/[msmt17/]MSMT17_V1/{train,test,list_train.txt,"
        "list_query.txt,list_gallery.txt} (the same folders directly in <root>/msmt17 or <root> "
        "are accepted too)"
    )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        layout, self.dataset_dir = find_layout(self.name, self.root, self.layouts, self.expected)
        train_dir, test_dir = (os.path.join(self.dataset_dir, d) for d in layout.dirs)
        train = self._read_list(train_dir, "list_train.txt")
        if self.combine_all and os.path.isfile(os.path.join(self.dataset_dir, "list_val.txt")):
            train += self._read_list(train_dir, "list_val.txt")
        query = self._read_list(test_dir, "list_query.txt")
        gallery = self._read_list(test_dir, "list_gallery.txt")
        return train, query, gallery

    def _read_list(self, img_dir: str, list_name: str) -> list[RawItem]:
        list_path = os.path.join(self.dataset_dir, list_name)
        items: list[RawItem] = []
        with open(list_path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rel_path, pid_str = line.split()
                    pid = int(pid_str)
                    camid = int(os.path.basename(rel_path).split("_")[2]) - 1
                except (ValueError, IndexError):
                    raise ValueError(
                        f"{self.name}: malformed line {line_no} of {list_path!r}: {line.strip()!r}; "
                        "expected '<folder>/<pid>_<n>_<cam>_....jpg <pid>'"
                    ) from None
                items.append((os.path.join(img_dir, rel_path), pid, camid))
        if items and not os.path.isfile(items[0][0]):
            raise ValueError(
                f"{self.name}: {list_path!r} lists {items[0][0]!r}, which does not exist; "
                f"is {img_dir!r} the matching image folder?"
            )
        return items
