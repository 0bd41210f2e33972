"""Ranked retrieval results as a picture (torchreid's ``visualize_ranked_results`` as one grid).

One row per query: the query image in a black frame on the left, then its ``topk`` nearest
gallery images in rank order, each framed green (same identity) or red (another identity).
Gallery images of the query's identity *and* camera are skipped, as the evaluation protocol
does (``metabin_layers.reid.evaluation``). Needs only numpy and PIL (no matplotlib).

Layout of ``ranked_grid`` (all in pixels): every image is resized to ``height x width`` and framed
by ``border`` pixels, so a cell is ``(height + 2 * border) x (width + 2 * border)``; cells are
``gap`` apart, the query column is ``query_gap`` away from rank 1, and a ``margin`` surrounds the
grid below a title strip of ``TITLE_HEIGHT`` rows (none without a title). The cell of row ``i``
and rank ``j`` (0-based) starts at
``y = title + margin + i * (cell_h + gap)``, ``x = margin + cell_w + query_gap + j * (cell_w + gap)``;
the query cell of row ``i`` at the same ``y`` and ``x = margin``.

Examples:
    >>> import numpy as np
    >>> from metabin_layers.reid.visualize import ranked_grid, GREEN, RED
    >>> q = [np.zeros((8, 4, 3), np.uint8)]
    >>> g = [[np.zeros((8, 4, 3), np.uint8)] * 2]
    >>> grid = ranked_grid(q, g, [[True, False]], height=8, width=4, border=1, gap=1, query_gap=2, margin=1)
    >>> grid.shape, grid[1, 1 + 6 + 2].tolist(), grid[1, 1 + 6 + 2 + 6 + 1].tolist()
    ((12, 23, 3), [0, 255, 0], [255, 0, 0])
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .disk import atomic_path

__all__ = [
    "GREEN",
    "RED",
    "BLACK",
    "TITLE_HEIGHT",
    "ranked_lists",
    "ranked_grid",
    "dataset_image",
    "save_ranked_results",
    "ranked_picture_name",
    "save_ranked_pictures",
]

GREEN = (0, 255, 0)
RED = (255, 0, 0)
BLACK = (0, 0, 0)
#: Rows of the title strip above the grid (when there is a title).
TITLE_HEIGHT = 16


def ranked_lists(
    distmat: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    query_indices: Sequence[int],
    topk: int = 10,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each chosen query, its ``topk`` gallery indices by distance and whether each matches.

    Args:
        distmat: ``(num_query, num_gallery)`` distances, smaller = more similar.
        q_pids, g_pids: identities of the queries and of the gallery images.
        q_camids, g_camids: their cameras; gallery images with the query's identity and camera
            are skipped (the protocol's junk images).
        query_indices: the queries to rank.
        topk: how many gallery images per query (fewer if the gallery runs out).

    Returns:
        Per query, ``(gallery_indices, same_identity)``: int64 and bool arrays of equal length.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.visualize import ranked_lists
        >>> d = np.array([[0.3, 0.1, 0.2]])
        >>> [(i.tolist(), m.tolist()) for i, m in ranked_lists(d, [7], [7, 5, 7], [0], [1, 1, 0], [0], topk=2)]
        [([1, 0], [False, True])]
    """
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) array, got shape {distmat.shape}")
    qp, gp = np.asarray(q_pids), np.asarray(g_pids)
    qc, gc = np.asarray(q_camids), np.asarray(g_camids)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    out = []
    for q in query_indices:
        if not 0 <= q < distmat.shape[0]:
            raise ValueError(f"query_indices: {q} outside 0..{distmat.shape[0] - 1}")
        order = np.argsort(distmat[q], kind="stable")  # ties keep gallery order, as the evaluation
        junk = (gp[order] == qp[q]) & (gc[order] == qc[q])
        order = order[~junk][:topk]
        out.append((order.astype(np.int64), gp[order] == qp[q]))
    return out


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (uint8 HWC) resized to ``height x width`` (nearest for whole-number upscaling)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[:2] == (height, width):
        return image
    h, w = image.shape[:2]
    if height % h == 0 and width % w == 0 and height // h == width // w:
        s = height // h
        return image.repeat(s, axis=0).repeat(s, axis=1)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def ranked_grid(
    query_images: Sequence[np.ndarray],
    gallery_images: Sequence[Sequence[np.ndarray]],
    matches: Sequence[Sequence[bool]],
    height: int = 128,
    width: int = 64,
    border: int = 4,
    gap: int = 4,
    query_gap: int = 16,
    margin: int = 4,
    title: Optional[str] = None,
) -> np.ndarray:
    """The picture as a uint8 ``(H, W, 3)`` array (layout in the module docstring).

    Args:
        query_images: one uint8 ``(h, w, 3)`` image per row.
        gallery_images: per row, its ranked gallery images.
        matches: per row, whether each ranked image shows the query's identity (green) or not (red).
        height, width: size of every image in the grid.
        border: frame width.
        gap: space between cells.
        query_gap: space between the query and rank 1.
        margin: space around the grid.
        title: a line of text above the grid (``TITLE_HEIGHT`` rows); None: no strip.

    Returns:
        The grid, white background; ``(title + 2 * margin + rows * cell_h + (rows - 1) * gap)`` x
        ``(2 * margin + cell_w + query_gap + k * cell_w + (k - 1) * gap)`` with ``k`` the longest row.

    Raises:
        ValueError: If the rows of images and matches disagree, or there is no row.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.visualize import ranked_grid
        >>> img = np.zeros((16, 8, 3), np.uint8)
        >>> ranked_grid([img, img], [[img] * 3, [img] * 3], [[True, False, False]] * 2, height=16, width=8).shape
        (60, 96, 3)
    """
    rows = len(query_images)
    if rows == 0 or len(gallery_images) != rows or len(matches) != rows:
        raise ValueError(
            f"ranked_grid: {rows} query images, {len(gallery_images)} gallery rows and {len(matches)} match rows; "
            "expected the same number (>= 1)"
        )
    for i, (g, m) in enumerate(zip(gallery_images, matches)):
        if len(g) != len(m):
            raise ValueError(f"ranked_grid: row {i} has {len(g)} gallery images but {len(m)} match flags")
    k = max(1, max(len(g) for g in gallery_images))
    cell_h, cell_w = height + 2 * border, width + 2 * border
    top = TITLE_HEIGHT if title else 0
    grid = np.full(
        (top + 2 * margin + rows * cell_h + (rows - 1) * gap, 2 * margin + cell_w + query_gap + k * cell_w + (k - 1) * gap, 3),
        255,
        dtype=np.uint8,
    )

    def put(image: np.ndarray, y: int, x: int, color: tuple[int, int, int]) -> None:
        grid[y : y + cell_h, x : x + cell_w] = color
        grid[y + border : y + border + height, x + border : x + border + width] = _fit(image, height, width)

    for i in range(rows):
        y = top + margin + i * (cell_h + gap)
        put(query_images[i], y, margin, BLACK)
        for j, (image, same) in enumerate(zip(gallery_images[i], matches[i])):
            put(image, y, margin + cell_w + query_gap + j * (cell_w + gap), GREEN if same else RED)
    if title:
        from PIL import Image, ImageDraw

        picture = Image.fromarray(grid)
        ImageDraw.Draw(picture).text((margin, 2), title, fill=BLACK)
        grid = np.asarray(picture).copy()
    return grid


def dataset_image(dataset: Any, index: int) -> np.ndarray:
    """The untransformed uint8 ``(H, W, 3)`` image behind ``dataset[index]``.

    Works for the recipe's datasets: ``SyntheticReIDDataset`` (rendered) and ``ImageDataset``
    (read from its file).

    Args:
        dataset: a dataset with ``items`` (``(img_path, pid, camid, ...)``); a synthetic one also
            has ``source`` (its ``SyntheticReID``).
        index: the item.

    Returns:
        The image as a uint8 array.

    Examples:
        >>> from metabin_layers.reid.synthetic import SyntheticReID
        >>> from metabin_layers.reid.visualize import dataset_image
        >>> ds = SyntheticReID(num_train_ids=4, num_test_ids=2, num_styles=2, held_out_styles=(1,))
        >>> dataset_image(ds.dataset("query"), 0).shape
        (64, 32, 3)
    """
    source = getattr(dataset, "source", None)
    if source is not None and hasattr(source, "render"):
        return np.asarray(source.render(dataset.items[index]))
    from .datasets import read_image

    return np.asarray(read_image(dataset.items[index][0]))


def save_ranked_results(
    distmat: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    query_image: Callable[[int], np.ndarray],
    gallery_image: Callable[[int], np.ndarray],
    path: str | Path,
    num_queries: int = 6,
    topk: int = 10,
    title: Optional[str] = None,
    **layout: int,
) -> np.ndarray:
    """Write the ranked-retrieval picture of ``num_queries`` queries (evenly spread) as a PNG.

    Args:
        distmat: ``(num_query, num_gallery)`` distances, smaller = more similar.
        q_pids, g_pids, q_camids, g_camids: identities and cameras (see ``ranked_lists``).
        query_image: index -> the query's uint8 image (e.g. ``dataset_image`` of the query set).
        gallery_image: index -> the gallery image.
        path: the PNG to write (its folder must exist).
        num_queries: rows: queries ``linspace(0, num_query - 1, num_queries)``, rounded, distinct.
        topk: ranks shown per query.
        title: a line of text above the grid.
        **layout: ``height``, ``width``, ``border``, ``gap``, ``query_gap``, ``margin`` of
            ``ranked_grid``.

    Returns:
        The picture written, a uint8 ``(H, W, 3)`` array.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from metabin_layers.reid.visualize import save_ranked_results
        >>> path = os.path.join(tempfile.mkdtemp(), "ranked.png")
        >>> img = lambda i: np.full((16, 8, 3), 40 * i, np.uint8)
        >>> d = np.array([[0.2, 0.1, 0.9], [0.5, 0.4, 0.3]])
        >>> grid = save_ranked_results(d, [1, 2], [1, 9, 2], [0, 0], [1, 1, 1], img, img, path, topk=3,
        ...                            height=16, width=8)
        >>> grid.shape, os.path.exists(path)
        ((60, 96, 3), True)
    """
    from PIL import Image

    distmat = np.asarray(distmat)
    num_queries = max(1, min(num_queries, distmat.shape[0]))
    chosen = list(dict.fromkeys(np.linspace(0, distmat.shape[0] - 1, num_queries).round().astype(int).tolist()))
    lists = ranked_lists(distmat, q_pids, g_pids, q_camids, g_camids, chosen, topk=topk)
    grid = ranked_grid(
        [query_image(q) for q in chosen],
        [[gallery_image(int(g)) for g in order] for order, _ in lists],
        [m.tolist() for _, m in lists],
        title=title,
        **layout,
    )
    with atomic_path(path) as tmp:  # the earlier picture stays until this one is whole
        Image.fromarray(grid).save(tmp)
    return grid


def ranked_picture_name(target: str, num_targets: int) -> str:
    """``ranked.png`` for a run with one target, ``ranked-<target>.png`` with several.

    Args:
        target: the target's name.
        num_targets: how many targets the run evaluates.

    Returns:
        The picture's file name.

    Examples:
        >>> from metabin_layers.reid.visualize import ranked_picture_name
        >>> ranked_picture_name("style4", 1), ranked_picture_name("grid", 4)
        ('ranked.png', 'ranked-grid.png')
    """
    return "ranked.png" if num_targets == 1 else f"ranked-{target}.png"


def save_ranked_pictures(
    distances: dict[str, dict[str, Any]], output: str | Path, title: str, num_queries: int = 6, topk: int = 10
) -> list[Path]:
    """One ranked-retrieval picture per target, from what ``evaluate_model(..., distances=d)`` kept.

    Args:
        distances: per target, ``distmat``, ``q_pids``, ``g_pids``, ``q_camids``, ``g_camids``
            and ``split`` (its ``TargetSplit``: the images).
        output: the folder to write into (``ranked_picture_name`` names the files).
        title: the pictures' title; the target's name and the colour key are appended.
        num_queries: rows per picture.
        topk: ranks per row.

    Returns:
        The paths written.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from metabin_layers.reid.data import TargetSplit
        >>> from metabin_layers.reid.synthetic import SyntheticReID
        >>> from metabin_layers.reid.visualize import save_ranked_pictures
        >>> ds = SyntheticReID(num_train_ids=4, num_test_ids=3, num_styles=2, held_out_styles=(1,))
        >>> q, g = ds.dataset("query"), ds.dataset("gallery")
        >>> pid = lambda items: np.array([it.pid for it in items])
        >>> cam = lambda items: np.array([it.camid for it in items])
        >>> kept = {"style1": {"distmat": np.random.rand(len(q), len(g)), "q_pids": pid(q.items), "g_pids": pid(g.items),
        ...                    "q_camids": cam(q.items), "g_camids": cam(g.items), "split": TargetSplit(q, g)}}
        >>> [os.path.basename(p) for p in save_ranked_pictures(kept, tempfile.mkdtemp(), "random distances")]
        ['ranked.png']
    """
    paths = []
    for target, d in distances.items():
        split = d["split"]
        path = Path(output) / ranked_picture_name(target, len(distances))
        save_ranked_results(
            d["distmat"],
            d["q_pids"],
            d["g_pids"],
            d["q_camids"],
            d["g_camids"],
            partial(dataset_image, split.query),
            partial(dataset_image, split.gallery),
            path,
            num_queries=num_queries,
            topk=topk,
            title=f"{title}, {target}: query | top-{topk} (green: same person, red: another)",
        )
        paths.append(path)
    return paths
