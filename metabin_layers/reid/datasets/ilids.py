"""QMUL iLIDS / i-LIDS Pedestrian (Zheng et al., BMVC 2009)."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from typing import Any, ClassVar

from .base import Layout, RawItem, SplitReIDDataset, find_layout, item_name, list_images

__all__ = ["iLIDS"]


class iLIDS(SplitReIDDataset):  # torchreid's class name
    """QMUL-iLIDS: 119 ids, 476 images. Each of the 10 splits trains on half the ids
    (``int(119 * 0.5) = 59``, all their images); each of the other 60 ids gives two random
    images, one query and one gallery (60 + 60).

    Accepted layouts (first match wins)::

        <root>/ilids/i-LIDS_Pedestrian/Persons/   (torchreid; splits in <root>/ilids/splits.json)
        <root>/QMUL-iLIDS/images/                 (MetaBIN; splits in <root>/QMUL-iLIDS/splits.json)
        <root>/QMUL_iLIDS/images/, <root>/i-LIDS_Pedestrian/Persons/

    File names ``<pid:4><seq:3>.jpg`` (e.g. ``0001001.jpg``); camid = the 3-digit sequence
    index - 1, as torchreid and MetaBIN (iLIDS has no camera labels).

    Splits: the authors' ``splits.json`` (torchreid's name and format: image names per split)
    when present, next to ``images``; otherwise 10 seeded random splits cached in
    ``splits_generated_seed<seed>.json`` (not comparable to the paper's numbers;
    ``split_origin`` says which).

    Args:
        root: folder searched for the layouts above.
        split_id: which of the 10 splits, ``0..9``.
        seed: seed of generated splits; see ``SplitReIDDataset``.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import iLIDS
        >>> with tempfile.TemporaryDirectory() as root:
        ...     folder = os.path.join(root, "QMUL-iLIDS", "images")
        ...     os.makedirs(folder)
        ...     for name in ("0001001.jpg", "0001002.jpg", "0002001.jpg", "0002002.jpg"):
        ...         Image.new("RGB", (8, 16)).save(os.path.join(folder, name))
        ...     ds = iLIDS(root, split_id=0)
        >>> ds.split_origin, len(ds.train), len(ds.query), len(ds.gallery)
        ('generated', 2, 1, 1)
    """

    name: ClassVar[str] = "iLIDS"
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub)
        for sub in ("ilids/i-LIDS_Pedestrian/Persons", "QMUL-iLIDS/images", "QMUL_iLIDS/images", "i-LIDS_Pedestrian/Persons")
    )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        layout, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        by_pid: dict[int, list[str]] = defaultdict(list)
        for path in list_images(self.dataset_dir):
            by_pid[self._parse(os.path.basename(path))[0]].append(os.path.basename(path))
        if not by_pid:
            raise ValueError(f"{self.name}: no images in {self.dataset_dir!r}")
        pids = sorted(by_pid)

        def generate(rng: random.Random) -> list[dict[str, Any]]:
            splits = []
            for _ in range(self.num_splits):
                order = list(pids)
                rng.shuffle(order)
                n_train = int(len(order) * 0.5)
                train = sorted(n for pid in order[:n_train] for n in by_pid[pid])
                query, gallery = [], []
                for pid in order[n_train:]:
                    if len(by_pid[pid]) < 2:
                        raise ValueError(f"{self.name}: identity {pid} has fewer than 2 images in {self.dataset_dir!r}")
                    q, g = rng.sample(by_pid[pid], 2)
                    query.append(q)
                    gallery.append(g)
                splits.append({"train": train, "query": query, "gallery": gallery})
            return splits

        splits = self._load_splits(os.path.join(layout.split_dir(self.root), self.split_filename), generate)
        entry = splits[self.split_id]
        train, query, gallery = (self._items(self._entry_list(entry, key)) for key in ("train", "query", "gallery"))
        return train, query, gallery

    def _parse(self, name: str) -> tuple[int, int]:
        if len(name) < 7 or not name[:7].isdigit():
            raise ValueError(
                f"{self.name}: cannot parse {name!r} in {self.dataset_dir!r}; expected '<pid:4><seq:3>.jpg' (e.g. 0001001.jpg)"
            )
        return int(name[:4]), int(name[4:7]) - 1

    def _items(self, names: list[Any]) -> list[RawItem]:
        items: list[RawItem] = []
        for entry in names:
            # torchreid stores bare names; tolerate [path, pid, camid] items too.
            name = item_name(entry)
            path = os.path.join(self.dataset_dir, name)
            if not os.path.isfile(path):
                raise ValueError(f"{self.name}: split file {self.split_path!r} refers to missing image {path!r}")
            pid, camid = self._parse(name)
            items.append((path, pid, camid))
        return items
