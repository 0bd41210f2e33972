"""GRID (Loy et al., 2009/2013): underground station, 8 cameras."""

from __future__ import annotations

import os
import random
from typing import Any, ClassVar

from .base import (
    Layout,
    PathLike,
    RawItem,
    SplitReIDDataset,
    find_layout,
    item_name,
    list_images,
)

__all__ = ["GRID"]

_MAT_NAME = "features_and_partitions.mat"


def _parse(path: str, dataset: str) -> tuple[str, int, int]:
    """``<id:04d>_<cam>_...jpeg`` -> ``(path, id, cam - 1)``; id 0 marks the distractors."""
    fields = os.path.basename(path).split("_")
    try:
        return path, int(fields[0]), int(fields[1]) - 1
    except (IndexError, ValueError):
        raise ValueError(
            f"{dataset}: cannot parse identity and camera from {path!r}; expected "
            "'<id>_<camera>_....jpeg' (e.g. 0001_1_25004_107_32_130.jpeg)"
        ) from None


class GRID(SplitReIDDataset):
    """GRID: 250 paired ids (one probe and one gallery image each) plus 775 gallery-only
    distractors (id 0). Each of the 10 splits trains on 125 paired ids; the test uses the other
    125: query = their probe images (125), gallery = their gallery images plus the 775
    distractors (900).

    Accepted layouts (first match wins)::

        <root>/grid/underground_reid/{probe,gallery}   (torchreid; splits in <root>/grid/splits.json)
        <root>/GRID/{probe,gallery}                    (MetaBIN; splits in <root>/GRID/splits.json)
        <root>/grid/{probe,gallery}, <root>/underground_reid/{probe,gallery}, <root>/{probe,gallery}

    Splits, in order of precedence (``split_origin`` says which was used):

    1. ``splits.json`` (the authors' and torchreid's file: entries with ``train``/``query``/
       ``gallery`` item lists; only the training ids are read from it, by file name).
    2. The 10 official partitions of ``features_and_partitions.mat`` (``trainIdxAll``, in the
       data folder or next to ``splits.json``; part of the GRID download), from which the
       authors make their ``splits.json``; read directly (needs scipy), nothing is written.
    3. Otherwise 10 seeded random halves of the paired ids, cached in
       ``splits_generated_seed<seed>.json``: not comparable to the paper's numbers.

    ``combine_all`` drops the id-0 distractors.

    Args:
        root: folder searched for the layouts above.
        split_id: which of the 10 splits, ``0..9``.
        seed: seed of generated splits; see ``SplitReIDDataset``.
        use_mat: ``None`` (use ``features_and_partitions.mat`` when present), ``True``
            (require it) or ``False`` (ignore it, use seeded random splits).
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import GRID
        >>> files = ["probe/0001_1_25004_107_32_130.jpeg", "probe/0002_1_25010_45_20_118.jpeg",
        ...          "gallery/0001_5_25012_87_40_113.jpeg", "gallery/0002_5_25020_52_33_117.jpeg",
        ...          "gallery/0000_3_25103_110_28_96.jpeg"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "GRID", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = GRID(root, split_id=0)
        ...     os.path.basename(ds.split_path)
        'splits_generated_seed0.json'
        >>> ds.split_origin, len(ds.query), len(ds.gallery)  # one paired id for testing + the distractor
        ('generated', 1, 2)
    """

    name: ClassVar[str] = "GRID"
    junk_pids: ClassVar[frozenset[int]] = frozenset({0})
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(sub, ("probe", "gallery"))
        for sub in ("grid/underground_reid", "GRID", "grid", "GRID/underground_reid", "underground_reid", "")
    )

    def __init__(
        self,
        root: PathLike,
        split_id: int = 0,
        *,
        seed: int | None = None,
        use_mat: bool | None = None,
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        self.use_mat = use_mat
        super().__init__(root, split_id, seed=seed, combine_all=combine_all, domain=domain, verbose=verbose)

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        layout, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        split_dir = layout.split_dir(self.root)
        probe = [_parse(p, self.name) for p in list_images(os.path.join(self.dataset_dir, "probe"))]
        gallery = [_parse(p, self.name) for p in list_images(os.path.join(self.dataset_dir, "gallery"))]
        paired = sorted(({i for _, i, _ in probe} & {i for _, i, _ in gallery}) - {0})
        if not paired:
            raise ValueError(f"{self.name}: no identity appears in both probe and gallery of {self.dataset_dir!r}")

        mat_path = None
        if self.use_mat is not False:
            candidates = [os.path.join(self.dataset_dir, _MAT_NAME), os.path.join(split_dir, _MAT_NAME)]
            mat_path = next((p for p in candidates if os.path.isfile(p)), None)
            if mat_path is None and self.use_mat:
                raise FileNotFoundError(f"{self.name}: use_mat=True but no {_MAT_NAME} in {candidates}")

        authors_json = os.path.join(split_dir, self.split_filename)
        if mat_path is not None and not os.path.isfile(authors_json):
            # The official partitions: the authors derive their splits.json from this file.
            self.split_path, self.split_origin = mat_path, "authors"
            train_ids = set(self._read_mat(mat_path)[self.split_id])
        else:

            def generate(rng: random.Random) -> list[dict[str, Any]]:
                train_lists = [sorted(rng.sample(paired, len(paired) // 2)) for _ in range(self.num_splits)]
                return [self._entry(set(ids), probe, gallery) for ids in train_lists]

            entry = self._load_splits(authors_json, generate)[self.split_id]
            train_ids = {_parse(item_name(item), self.name)[1] for item in self._entry_list(entry, "train")}
        train = [(p, i, c) for p, i, c in (*probe, *gallery) if i in train_ids]
        query = [(p, i, c) for p, i, c in probe if i not in train_ids]
        gal = [(p, i, c) for p, i, c in gallery if i not in train_ids]
        return train, query, gal

    @staticmethod
    def _entry(train_ids: set[int], probe: list[RawItem], gallery: list[RawItem]) -> dict[str, Any]:
        """A split in torchreid's format (absolute paths; train pids relabelled)."""
        label = {pid: i for i, pid in enumerate(sorted(train_ids))}
        train = [[p, label[i], c] for p, i, c in (*probe, *gallery) if i in train_ids]
        query = [[p, i, c] for p, i, c in probe if i not in train_ids]
        gal = [[p, i, c] for p, i, c in gallery if i not in train_ids]
        return {
            "train": train,
            "query": query,
            "gallery": gal,
            "num_train_pids": len(train_ids),
            "num_query_pids": len({q[1] for q in query}),
            "num_gallery_pids": len({g[1] for g in gal}),
        }

    def _read_mat(self, mat_path: str) -> list[list[int]]:
        """The 10 training-id lists of ``trainIdxAll`` (torchreid: ``[k][0][0][2][0]``)."""
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ImportError(
                f"{self.name}: reading {mat_path!r} needs scipy (pip install scipy); or pass "
                "use_mat=False for seeded random splits"
            ) from None
        try:
            parts = loadmat(mat_path, variable_names=["trainIdxAll"])["trainIdxAll"][0]
            lists = [sorted(int(i) for i in parts[k][0][0][2][0]) for k in range(self.num_splits)]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.name}: {mat_path!r} has no usable trainIdxAll (10 partitions): {exc!r}") from None
        return lists
