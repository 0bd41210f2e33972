"""CUHK02 (Li & Wang, CVPR 2013)."""

from __future__ import annotations

import os
from typing import ClassVar

from .base import Layout, PathLike, RawItem, ReIDDataset, find_layout, list_images

__all__ = ["CUHK02"]

_PAIRS = ("P1", "P2", "P3", "P4", "P5")
_CAMS = ("cam1", "cam2")


class CUHK02(ReIDDataset):
    """CUHK02: 1,816 ids in 5 camera pairs (P1..P5), 7,264 images, 10 cameras.

    Accepted layouts (first match wins)::

        <root>/cuhk02/Dataset/P1..P5/{cam1,cam2}   (torchreid)
        <root>/cuhk02/P1..P5/{cam1,cam2}           (MetaBIN)
        <root>/CUHK02/Dataset/P1..P5/{cam1,cam2}, <root>/CUHK02/P1..P5/{cam1,cam2}
        <root>/P1..P5/{cam1,cam2}                  (root is the dataset folder)

    torchreid protocol: pairs other than ``test_pair`` (P5) are training data, ``test_pair``'s
    cam1 is the query and its cam2 the gallery. Identities are ``(pair, <file name prefix>)``
    (file names ``<pid>_<n>.png``), so equal numbers in different pairs are different people.
    camid = ``2 * pair_index + cam_index`` (0..9). ``combine_all=True`` (MetaBIN's
    ``DG_CUHK02``) puts all 5 pairs into ``train``.

    Args:
        root: folder searched for the layouts above.
        test_pair: camera pair used for query/gallery (default ``"P5"``).
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Raises:
        ValueError: ``test_pair`` is not one of ``"P1"`` .. ``"P5"``.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import CUHK02
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for pair in ("P1", "P2", "P3", "P4", "P5"):
        ...         for n, cam in enumerate(("cam1", "cam2"), 1):
        ...             os.makedirs(os.path.join(root, "cuhk02", pair, cam))
        ...             Image.new("RGB", (8, 16)).save(os.path.join(root, "cuhk02", pair, cam, f"001_{n}.png"))
        ...     ds = CUHK02(root)
        >>> ds.num_train_pids, len(ds.train)  # "001" of P1..P4: four people
        (4, 8)
        >>> ds.query[0].camid, ds.gallery[0].camid  # P5's two cameras
        (8, 9)
    """

    name: ClassVar[str] = "CUHK02"
    layouts: ClassVar[tuple[Layout, ...]] = tuple(
        Layout(
            sub,
            tuple(f"{p}/{c}" for p in _PAIRS for c in _CAMS),
            desc="<root>" + (f"/{sub}" if sub else "") + "/P1..P5/{cam1,cam2}",
        )
        for sub in ("cuhk02/Dataset", "cuhk02", "CUHK02/Dataset", "CUHK02", "")
    )

    def __init__(
        self,
        root: PathLike,
        *,
        test_pair: str = "P5",
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        if test_pair not in _PAIRS:
            raise ValueError(f"{self.name}: test_pair must be one of {_PAIRS}, got {test_pair!r}")
        self.test_pair = test_pair
        super().__init__(root, combine_all=combine_all, domain=domain, verbose=verbose)

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        _, self.dataset_dir = find_layout(self.name, self.root, self.layouts)
        train: list[RawItem] = []
        query: list[RawItem] = []
        gallery: list[RawItem] = []
        for pair_idx, pair in enumerate(_PAIRS):
            for cam_idx, cam in enumerate(_CAMS):
                camid = 2 * pair_idx + cam_idx
                for path in list_images(os.path.join(self.dataset_dir, pair, cam)):
                    pid_str = os.path.basename(path).split("_")[0]
                    if pair != self.test_pair:
                        train.append((path, (pair, pid_str), camid))
                        continue
                    try:
                        pid = int(pid_str)
                    except ValueError:
                        raise ValueError(
                            f"{self.name}: cannot parse identity from file name {path!r}; expected '<pid>_<n>.png'"
                        ) from None
                    (query if cam_idx == 0 else gallery).append((path, pid, camid))
        return train, query, gallery
