"""The ranked-retrieval picture: size, layout, and frame colours against an independent ranking."""

import numpy as np
import pytest
from PIL import Image

from metabin_layers.reid.visualize import TITLE_HEIGHT, ranked_grid, save_ranked_results

H, W, BORDER, GAP, QGAP, MARGIN = 16, 8, 2, 3, 10, 4
CELL_H, CELL_W = H + 2 * BORDER, W + 2 * BORDER


def colour(i: int, kind: int) -> np.ndarray:
    """A solid image whose colour encodes (index, query or gallery)."""
    return np.full((H, W, 3), (i % 250, i // 250, 100 + kind), dtype=np.uint8)


def expected_ranking(distmat, q_pids, g_pids, q_camids, g_camids, q, topk):
    """float64 stable argsort, junk (same identity and camera) removed: the reference."""
    order = [int(g) for g in np.argsort(distmat[q].astype(np.float64), kind="stable")]
    order = [g for g in order if not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
    return order[:topk]


def test_picture_frames_follow_the_ranking(tmp_path):
    rng = np.random.default_rng(0)
    nq, ng, topk, rows = 9, 40, 10, 4
    q_pids, g_pids = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    q_camids, g_camids = rng.integers(0, 2, nq), rng.integers(0, 2, ng)
    distmat = rng.random((nq, ng)).astype(np.float32)
    distmat[:, 5] = distmat[:, 6]  # a tie: the earlier gallery image ranks first
    path = tmp_path / "ranked.png"
    grid = save_ranked_results(
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        lambda i: colour(i, 0),
        lambda i: colour(i, 1),
        path,
        num_queries=rows,
        topk=topk,
        title="test",
        height=H,
        width=W,
        border=BORDER,
        gap=GAP,
        query_gap=QGAP,
        margin=MARGIN,
    )
    on_disk = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(on_disk, grid)
    assert grid.shape == (
        TITLE_HEIGHT + 2 * MARGIN + rows * CELL_H + (rows - 1) * GAP,
        2 * MARGIN + CELL_W + QGAP + topk * CELL_W + (topk - 1) * GAP,
        3,
    )
    queries = [0, 3, 5, 8]  # linspace(0, 8, 4) rounded
    greens = reds = 0
    for row, q in enumerate(queries):
        y = TITLE_HEIGHT + MARGIN + row * (CELL_H + GAP)
        assert on_disk[y, MARGIN].tolist() == [0, 0, 0]  # the query's black frame
        assert on_disk[y + CELL_H // 2, MARGIN + CELL_W // 2].tolist() == colour(q, 0)[0, 0].tolist()
        for rank, g in enumerate(expected_ranking(distmat, q_pids, g_pids, q_camids, g_camids, q, topk)):
            x = MARGIN + CELL_W + QGAP + rank * (CELL_W + GAP)
            same = g_pids[g] == q_pids[q]
            frame = [0, 255, 0] if same else [255, 0, 0]
            greens, reds = greens + same, reds + (not same)
            for fy, fx in ((y, x), (y + CELL_H - 1, x + CELL_W - 1), (y + BORDER - 1, x + CELL_W // 2)):
                assert on_disk[fy, fx].tolist() == frame, (row, rank)
            assert on_disk[y + CELL_H // 2, x + CELL_W // 2].tolist() == colour(g, 1)[0, 0].tolist(), (row, rank)
    assert greens > 0 and reds > 0  # both colours were checked


def test_picture_without_title_and_bad_rows():
    grid = ranked_grid([colour(0, 0)], [[colour(1, 1)]], [[True]], height=H, width=W, border=BORDER, gap=GAP, margin=0)
    assert grid.shape == (CELL_H, CELL_W + 16 + CELL_W, 3) and grid[0, CELL_W + 16].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="row 0 has 1 gallery images but 2 match flags"):
        ranked_grid([colour(0, 0)], [[colour(1, 1)]], [[True, False]])
    with pytest.raises(ValueError, match="expected the same number"):
        ranked_grid([], [], [])
