"""VIPeR (Gray et al., PETS 2007): 632 ids, one image per camera."""

from __future__ import annotations

import os
import random
from typing import Any, ClassVar, NoReturn

from .base import (
    Layout,
    PathLike,
    RawItem,
    SplitReIDDataset,
    item_name,
    list_images,
    search_layout,
)

__all__ = ["VIPeR"]

_CAMS = ("cam_a", "cam_b")
_SUBSETS = ("train", "query", "gallery")
#: Folders that may hold the authors' ``split_<k>a`` folders (``viper/`` in their download).
_SPLIT_DIRS = ("viper", "VIPeR", "")


def _parse(path: str, camid: int, dataset: str) -> tuple[str, int, int]:
    """``<id>_<angle>.bmp`` -> ``(path, id, camid)``."""
    try:
        return path, int(os.path.basename(path).split("_")[0]), camid
    except ValueError:
        raise ValueError(
            f"{dataset}: cannot parse identity from {path!r}; expected '<id>_<angle>.bmp' (e.g. 000_45.bmp)"
        ) from None


def _parse_metabin(path: str, dataset: str) -> tuple[str, int, int]:
    """MetaBIN split folders: ``p<id>_c<cam>_d<angle>.png`` -> ``(path, id, cam - 1)``."""
    fields = os.path.basename(path).split("_")
    try:
        if not (fields[0].startswith("p") and fields[1].startswith("c")):
            raise ValueError
        return path, int(fields[0][1:]), int(fields[1][1:]) - 1
    except (IndexError, ValueError):
        raise ValueError(
            f"{dataset}: cannot parse {path!r}; expected 'p<id>_c<cam>_d<angle>.png' (e.g. p000_c1_d045.png)"
        ) from None


class VIPeR(SplitReIDDataset):
    """VIPeR: 632 ids, one image in cam_a and one in cam_b. Each of the 10 splits halves the ids
    316/316; the test half gives query = cam_a images (316), gallery = cam_b images (316);
    camid 0 = cam_a, 1 = cam_b (MetaBIN's ``ALL_VIPER_only_10`` protocol).

    Accepted layouts (first match wins)::

        <root>/viper/split_<k>a/{train,query,gallery}   (the authors' test download; cam_a/cam_b not needed)
        <root>/viper/VIPeR/{cam_a,cam_b}   (torchreid; splits in <root>/viper/)
        <root>/viper/{cam_a,cam_b}         (MetaBIN with the original images; splits in <root>/viper/)
        <root>/VIPeR/{cam_a,cam_b}, <root>/{cam_a,cam_b}

    Splits, in order of precedence (``split_origin`` says which was used):

    1. The authors' pre-made folders ``split_<k+1>a/{train,query,gallery}`` in ``<root>/viper``
       (or ``<root>/VIPeR``, ``<root>``; file names ``p000_c1_d045.png``, made by the authors'
       ``make_split.m``), if present and ``use_split_folders`` is true: the paper's splits.
       Their ``b``/``c``/``d`` variants are not used (``ALL_VIPER_only_10``).
    2. ``splits.json`` in torchreid's format: 20 entries alternating cam_a->cam_b and
       cam_b->cam_a query/gallery over 10 random halves (entry ``2 * split_id`` is used; a
       10-entry file uses entry ``split_id``). Only the training ids are read, by file name.
    3. Otherwise 10 seeded random halves are generated and cached in that format in
       ``splits_generated_seed<seed>.json``: not comparable to the paper's numbers.

    Identities are paired by the ``<id>`` prefix of the file names.

    Args:
        root: folder searched for the layouts above.
        split_id: which of the 10 splits, ``0..9``.
        seed: seed of generated splits; see ``SplitReIDDataset``.
        use_split_folders: read the authors' ``split_<k>a`` folders when present; ``False``
            ignores them (``cam_a``/``cam_b`` images with ``splits.json`` or generated splits).
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Examples:
        The authors' split folders alone (here a one-image-per-subset ``split_1a``):

        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import VIPeR
        >>> files = ["train/p000_c1_d045.png", "train/p000_c2_d090.png", "query/p001_c1_d000.png",
        ...          "gallery/p001_c2_d180.png"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "viper", "split_1a", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = VIPeR(root, split_id=0)
        >>> ds.split_origin, ds.uses_authors_splits, len(ds.train)
        ('authors', True, 2)
        >>> ds.query[0].pid, ds.query[0].camid, ds.gallery[0].camid
        (1, 0, 1)
    """

    name: ClassVar[str] = "VIPeR"
    layouts: ClassVar[tuple[Layout, ...]] = tuple(Layout(sub, _CAMS) for sub in ("viper/VIPeR", "viper", "VIPeR", ""))

    def __init__(
        self,
        root: PathLike,
        split_id: int = 0,
        *,
        seed: int | None = None,
        use_split_folders: bool = True,
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        self.use_split_folders = use_split_folders
        super().__init__(root, split_id, seed=seed, combine_all=combine_all, domain=domain, verbose=verbose)

    def _split_folder(self) -> str | None:
        """The authors' ``split_<k>a`` folder of this split, if ``use_split_folders`` and present.

        Raises:
            ValueError: the folder exists but lacks ``train``, ``query`` or ``gallery``.
        """
        if not self.use_split_folders:
            return None
        for sub in _SPLIT_DIRS:
            folder = os.path.join(self.root, sub, f"split_{self.split_id + 1}a")
            if not os.path.isdir(folder):
                continue
            missing = [s for s in _SUBSETS if not os.path.isdir(os.path.join(folder, s))]
            if missing:
                raise ValueError(f"{self.name}: malformed split folder {folder!r}: lacks {', '.join(missing)}")
            return folder
        return None

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        folder = self._split_folder()
        if folder is not None:  # the authors' test download: the split folders alone suffice
            self.dataset_dir = os.path.dirname(folder)
            self.split_path, self.split_origin = folder, "authors"
            train, query, gallery = (
                [_parse_metabin(p, self.name) for p in list_images(os.path.join(folder, s))] for s in _SUBSETS
            )
            return train, query, gallery
        layout, found, malformed = search_layout(self.root, self.layouts)
        if layout is None:
            self._raise_missing(malformed)
        self.dataset_dir = found
        split_dir = layout.split_dir(self.root)
        cam_a, cam_b = (
            [_parse(p, camid, self.name) for p in list_images(os.path.join(self.dataset_dir, cam))]
            for camid, cam in enumerate(_CAMS)
        )
        paired = sorted({i for _, i, _ in cam_a} & {i for _, i, _ in cam_b})
        if not paired:
            raise ValueError(f"{self.name}: no identity appears in both cam_a and cam_b of {self.dataset_dir!r}")

        def generate(rng: random.Random) -> list[dict[str, Any]]:
            splits: list[dict[str, Any]] = []
            for _ in range(self.num_splits):
                train_ids = set(rng.sample(paired, len(paired) // 2))
                splits += self._entries(train_ids, paired, cam_a, cam_b)
            return splits

        splits = self._load_splits(os.path.join(split_dir, self.split_filename), generate, origin="torchreid")
        entry = splits[2 * self.split_id] if len(splits) >= 2 * self.num_splits else splits[self.split_id]
        train_ids = {_parse(item_name(item), 0, self.name)[1] for item in self._entry_list(entry, "train")}
        test_ids = set(paired) - train_ids
        train = [(p, i, c) for p, i, c in (*cam_a, *cam_b) if i in train_ids]
        query = [(p, i, c) for p, i, c in cam_a if i in test_ids]
        gallery = [(p, i, c) for p, i, c in cam_b if i in test_ids]
        return train, query, gallery

    def _raise_missing(self, malformed: list[tuple[str, list[str]]]) -> NoReturn:
        expected = f"<root>/viper/split_{self.split_id + 1}a/{{train,query,gallery}} (the authors' test data) or " + " or ".join(
            layout.describe() for layout in self.layouts
        )
        split_dirs = [os.path.join(self.root, sub) for sub in _SPLIT_DIRS]
        others = sorted(n for d in split_dirs if os.path.isdir(d) for n in os.listdir(d) if n.startswith("split_"))
        if others and self.use_split_folders:
            raise ValueError(
                f"{self.name}: no split_{self.split_id + 1}a folder under root {self.root!r} (found {', '.join(others[:4])}"
                f"{', ...' if len(others) > 4 else ''}) and no cam_a/cam_b images; expected {expected}"
            )
        if malformed:
            folder, missing = malformed[0]
            raise ValueError(
                f"{self.name}: malformed layout under root {self.root!r}: {folder!r} lacks {', '.join(missing)}; "
                f"expected {expected}"
            )
        raise FileNotFoundError(f"{self.name}: no dataset found under root {self.root!r}; expected {expected}")

    @staticmethod
    def _entries(train_ids: set[int], paired: list[int], cam_a: list[RawItem], cam_b: list[RawItem]) -> list[dict[str, Any]]:
        """torchreid's two entries per random half: cam_a->cam_b, then cam_b->cam_a."""
        label = {pid: i for i, pid in enumerate(sorted(train_ids))}
        test_ids = set(paired) - train_ids
        train = [[p, label[i], c] for p, i, c in (*cam_a, *cam_b) if i in train_ids]
        test_a = [[p, i, c] for p, i, c in cam_a if i in test_ids]
        test_b = [[p, i, c] for p, i, c in cam_b if i in test_ids]
        counts = {"num_train_pids": len(train_ids), "num_query_pids": len(test_ids), "num_gallery_pids": len(test_ids)}
        return [
            {"train": train, "query": test_a, "gallery": test_b, **counts},
            {"train": train, "query": test_b, "gallery": test_a, **counts},
        ]
