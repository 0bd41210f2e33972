"""MetaBIN against its BatchNorm baseline: both trained on the same data with the same seed.

``train_with_baseline(cfg)`` trains ``cfg`` twice, with plain BatchNorm and with MetaBIN, into
``<output>/bn`` and ``<output>/metabin`` (each a complete run folder: config, log, checkpoint,
results, plots), then writes the comparison into ``<output>``: ``results.md`` (the captioned
table of ``report.baseline_table``), ``results.json``, ``cmc.png`` (both CMC curves) and
``ranked.png`` (the same queries ranked by BN, above, and by MetaBIN, below). This is what
``metabin-reid train`` runs on the synthetic data when no variant is chosen.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import report
from .config import TrainConfig
from .data import build_data
from .report import baseline_table, plot_cmc, write_text_atomic
from .train import check_output, clear_output, train

__all__ = ["BASELINE_NORMS", "train_with_baseline"]

#: The two variants, in the order they train and appear in the table.
BASELINE_NORMS = ("bn", "metabin")
_SUMMARY_KEYS = ("norm", "seed", "iterations", "train_seconds", "targets", "mean_rho", "rho_per_layer")


def _stack_pictures(top: Path, bottom: Path, path: Path, gap: int = 12) -> None:
    """``top`` above ``bottom`` (PNG files, white ``gap`` between), written to ``path``."""
    from PIL import Image

    a, b = np.asarray(Image.open(top).convert("RGB")), np.asarray(Image.open(bottom).convert("RGB"))
    width = max(a.shape[1], b.shape[1])
    out = np.full((a.shape[0] + gap + b.shape[0], width, 3), 255, dtype=np.uint8)
    out[: a.shape[0], : a.shape[1]] = a
    out[a.shape[0] + gap :, : b.shape[1]] = b
    Image.fromarray(out).save(path)


def train_with_baseline(cfg: TrainConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` with BatchNorm and with MetaBIN (same data, same seed), print and write the comparison.

    Args:
        cfg: The run's configuration; its ``norm`` is replaced by each variant's and its
            ``output`` holds the two run folders ``bn`` and ``metabin`` and the comparison.
        progress: Show a progress bar per run (else log lines).
        overwrite: Replace an earlier comparison in ``cfg.output`` (refused otherwise; checked
            for all three folders before anything trains).

    Returns:
        On rank 0: ``{"target", "seed", "seconds", "runs": {"bn": ..., "metabin": ...}}``, each run
        a summary of its results (metrics per target, ``mean_rho``, ``rho_per_layer``,
        ``train_seconds``); ``{}`` on the other ranks.

    Raises:
        OutputFolderError: If one of the folders holds an earlier run and ``overwrite`` is not set.

    Examples:
        >>> import contextlib, io, os, tempfile
        >>> from metabin_layers.reid.baseline import train_with_baseline
        >>> from metabin_layers.reid.config import TrainConfig
        >>> cfg = TrainConfig(
        ...     syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2,
        ...     backbone="test_resnet", height=32, width=16, pad=2, workers=0, batch_size=4, num_instances=2,
        ...     meta_batch_size=8, max_iters=1, iters_per_epoch=1, first_inner_loop=1, warmup_epochs=0,
        ...     milestones=[10], num_meta_train_domains=1, output=tempfile.mkdtemp(), eval_batch_size=8,
        ... )
        >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
        ...     summary = train_with_baseline(cfg, progress=False)
        >>> sorted(summary["runs"]), sorted(os.listdir(os.path.join(cfg.output, "metabin")))[:3]
        (['bn', 'metabin'], ['checkpoint.pt', 'cmc.png', 'config.json'])
        >>> "| MetaBIN |" in printed.getvalue(), os.path.exists(os.path.join(cfg.output, "ranked.png"))
        (True, True)
    """
    root = Path(cfg.output)
    runs = {norm: dataclasses.replace(cfg, norm=norm, output=str(root / norm)) for norm in BASELINE_NORMS}
    for folder in (root, *(Path(c.output) for c in runs.values())):  # refuse before an hour of training
        check_output(folder, overwrite=overwrite)
    start = time.perf_counter()
    data = build_data(cfg)  # rendered once, shared: both variants see the same images
    print(data.description, flush=True)
    results: dict[str, dict[str, Any]] = {}
    for i, (norm, run_cfg) in enumerate(runs.items(), 1):
        print(f"[{i}/{len(runs)}] {norm}: training into {run_cfg.output}", flush=True)
        results[norm] = train(run_cfg, progress=progress, overwrite=overwrite, data=data, verbose=False)
    if not results["bn"]:  # another rank of a distributed run: rank 0 reports
        return {}
    clear_output(root, overwrite=overwrite)
    target = next(iter(results["metabin"]["targets"]))
    table = baseline_table(results["bn"], results["metabin"], target)
    seconds = time.perf_counter() - start
    summary = {
        "target": target,
        "seed": cfg.seed,
        "seconds": round(seconds, 1),
        "runs": {norm: {k: r.get(k) for k in _SUMMARY_KEYS} | {"output": runs[norm].output} for norm, r in results.items()},
    }
    write_text_atomic(root / "results.json", json.dumps(summary, indent=2))
    write_text_atomic(root / "results.md", f"# BN vs MetaBIN\n\n{table}\n")
    for picture in sorted(Path(runs["metabin"].output).glob("ranked*.png")):
        _stack_pictures(Path(runs["bn"].output) / picture.name, picture, root / picture.name)
    if report.matplotlib_available():
        plot_cmc({"BN": results["bn"]["targets"][target], "MetaBIN": results["metabin"]["targets"][target]}, root / "cmc.png")
    print(f"\n{table}", flush=True)
    print(
        f"Results, plots and checkpoints ({seconds / 60:.1f} min): {root}\n"
        f"  results.md, cmc.png, ranked.png (top-10 of a few queries, BN above MetaBIN; green: same person)\n"
        f"  bn/, metabin/: each run's checkpoint.pt, log.txt, results.json and plots (metabin/rho.png: rho per layer)",
        flush=True,
    )
    return summary
