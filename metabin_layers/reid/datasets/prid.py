"""PRID2011 single-shot (Hirzer et al., SCIA 2011)."""

from __future__ import annotations

import os
import random
import re
from typing import Any, ClassVar

from .base import Layout, RawItem, SplitReIDDataset, find_layout, list_images

__all__ = ["PRID"]

_ID_RE = re.compile(r"^person_(\d+)\.")


class PRID(SplitReIDDataset):
    """PRID2011, single-shot: cam_a holds ids 1-385, cam_b ids 1-749; only ids 1-200 are the
    same people in both cameras. Each of the 10 splits trains on 100 of ids 1-200; the other
    100 give query = their cam_a image (camid 0, 100 images) and gallery = their cam_b image
    (camid 1) plus the cam_b images of ids 201-749 as distractors (649 images). cam_a ids
    201-385 are unused (torchreid / MetaBIN protocol).

    Accepted layouts (first match wins)::

        <root>/prid2011/prid_2011/single_shot/{cam_a,cam_b}   (torchreid; splits in <root>/prid2011/)
        <root>/prid_2011/single_shot/{cam_a,cam_b}            (MetaBIN; splits in <root>/prid_2011/)
        <root>/prid2011/single_shot/{cam_a,cam_b}, <root>/single_shot/{cam_a,cam_b}

    Splits: the authors' ``splits_single_shot.json`` (also torchreid's name and format:
    ``{"train": [ids], "test": [ids]}`` per split) when present, next to ``single_shot``;
    otherwise 10 seeded random halves of ids 1-200, cached in
    ``splits_single_shot_generated_seed<seed>.json`` (not comparable to the paper's numbers;
    ``split_origin`` says which). File names are ``person_<id:04d>.png``. ``combine_all`` drops
    the distractors.

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
        >>> from metabin_layers.reid.datasets import PRID
        >>> files = ["cam_a/person_0001.png", "cam_a/person_0002.png", "cam_b/person_0001.png",
        ...          "cam_b/person_0002.png", "cam_b/person_0201.png"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "prid_2011", "single_shot", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = PRID(root, split_id=0)
        >>> ds.split_origin, len(ds.train), len(ds.query), len(ds.gallery)  # gallery: test id + distractor 201
        ('generated', 2, 1, 2)
    """

    name: ClassVar[str] = "PRID"
    split_filename: ClassVar[str] = "splits_single_shot.json"
    #: ids 1..num_paired are seen by both cameras; larger cam_b ids are distractors.
    num_paired: ClassVar[int] = 200
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub, ("cam_a", "cam_b"))
        for sub in (
            "prid2011/prid_2011/single_shot",
            "prid_2011/single_shot",
            "prid2011/single_shot",
            "single_shot",
        )
    )

    def is_junk(self, pid: int) -> bool:
        """Distractor ids (> ``num_paired``) are dropped by ``combine_all``."""
        return pid > self.num_paired

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        layout, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        cam_a, cam_b = (
            [self._parse(p, camid) for p in list_images(os.path.join(self.dataset_dir, cam))]
            for camid, cam in enumerate(("cam_a", "cam_b"))
        )
        paired = sorted(i for i in {i for _, i, _ in cam_a} & {i for _, i, _ in cam_b} if 1 <= i <= self.num_paired)
        if not paired:
            raise ValueError(f"{self.name}: no ids 1..{self.num_paired} in both cam_a and cam_b of {self.dataset_dir!r}")

        def generate(rng: random.Random) -> list[dict[str, Any]]:
            splits = []
            for _ in range(self.num_splits):
                train_ids = sorted(rng.sample(paired, len(paired) // 2))
                splits.append({"train": train_ids, "test": sorted(set(paired) - set(train_ids))})
            return splits

        splits = self._load_splits(os.path.join(layout.split_dir(self.root), self.split_filename), generate)
        entry = splits[self.split_id]
        try:
            train_ids = {int(i) for i in self._entry_list(entry, "train")}
            test_ids = {int(i) for i in self._entry_list(entry, "test")}
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: split {self.split_id} of {self.split_path!r} must list integer ids") from None
        train = [(p, i, c) for p, i, c in (*cam_a, *cam_b) if i in train_ids]
        query = [(p, i, c) for p, i, c in cam_a if i in test_ids]
        gallery = [(p, i, c) for p, i, c in cam_b if i in test_ids or i > self.num_paired]
        return train, query, gallery

    def _parse(self, path: str, camid: int) -> tuple[str, int, int]:
        match = _ID_RE.match(os.path.basename(path))
        if match is None:
            raise ValueError(f"{self.name}: cannot parse identity from {path!r}; expected 'person_<id>.png'")
        return path, int(match.group(1)), camid
