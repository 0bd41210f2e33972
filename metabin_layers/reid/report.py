"""Results of a run as JSON, a captioned Markdown table and plots (matplotlib for the curves)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .disk import DISK_ERRNOS, atomic_path, disk_error

__all__ = [
    "write_results",
    "write_text_atomic",
    "results_table",
    "results_caption",
    "ranking_note",
    "split_notice",
    "comparison_table",
    "baseline_table",
    "NORM_LABELS",
    "matplotlib_available",
    "PLOTS_NOTICE",
    "plot_rho",
    "plot_cmc",
]

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def _pct(entry: Mapping[str, Any], key: str) -> str:
    value = 100 * entry[key]
    std = entry.get(f"{key}_std")
    return f"{value:.1f} ± {100 * std:.1f}" if std else f"{value:.1f}"


def _split_cell(provenance: Optional[Mapping[str, Any]]) -> str:
    if provenance is None or provenance.get("authors_split_files") is None:
        return "n/a"
    return "yes" if provenance["authors_split_files"] else f"NO ({provenance.get('origin', 'unknown')})"


def results_table(targets: Mapping[str, Mapping[str, Any]], test_splits: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
    """Markdown table: one row per target (percentages; ± is the std over splits).

    With ``test_splits`` (``results["test_splits"]``, see ``metabin_layers.reid.data.split_provenance``)
    a last column says whether the target's splits are the authors' (``yes``), not theirs
    (``NO (generated)``, ...), or ``n/a`` (a fixed query/gallery, the synthetic data).

    Args:
        targets: per target name, its metrics ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP``
            as fractions in [0, 1]; an optional ``<metric>_std`` adds ``± std``.
        test_splits: per target name, its split provenance; None leaves the column out.

    Returns:
        The Markdown table, one line per row, without a trailing newline.

    Examples:
        >>> from metabin_layers.reid.report import results_table
        >>> print(results_table({"style4": {"rank1": 0.5, "rank5": 0.7, "rank10": 0.8, "mAP": 0.4, "mINP": 0.2}}))
        | target | rank1 | rank5 | rank10 | mAP | mINP |
        |---|---|---|---|---|---|
        | style4 | 50.0 | 70.0 | 80.0 | 40.0 | 20.0 |
        >>> m = {"rank1": 0.5, "rank5": 0.7, "rank10": 0.8, "mAP": 0.4, "mINP": 0.4}
        >>> print(results_table({"prid": m}, {"prid": {"authors_split_files": False, "origin": "generated"}}))
        | target | rank1 | rank5 | rank10 | mAP | mINP | authors' splits |
        |---|---|---|---|---|---|---|
        | prid | 50.0 | 70.0 | 80.0 | 40.0 | 40.0 | NO (generated) |
    """
    columns = ["target", *METRICS] + (["authors' splits"] if test_splits is not None else [])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, entry in targets.items():
        cells = [name, *(_pct(entry, k) for k in METRICS)]
        if test_splits is not None:
            cells.append(_split_cell(test_splits.get(name)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_notice(test_splits: Optional[Mapping[str, Mapping[str, Any]]]) -> str:
    """A line naming the targets whose splits are not the authors' ("" when there are none).

    Args:
        test_splits: per target name, its split provenance (``authors_split_files`` True, False
            or None); None is the same as no target.

    Returns:
        The notice, or an empty string when every target uses the authors' split files or has
        none to use.

    Examples:
        >>> from metabin_layers.reid.report import split_notice
        >>> split_notice({"grid": {"authors_split_files": True}, "viper": {"authors_split_files": False}})
        "NOT COMPARABLE TO THE PAPER: viper not evaluated on the authors' split files."
    """
    other = [name for name, p in (test_splits or {}).items() if p.get("authors_split_files") is False]
    if not other:
        return ""
    return f"NOT COMPARABLE TO THE PAPER: {', '.join(other)} not evaluated on the authors' split files."


def comparison_table(runs: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str] = ("rank1", "mAP")) -> str:
    """The paper's Table 5 shape: one row per normalization, mean ± std over seeds per target.

    Args:
        runs: maps a variant name (``"bn"``, ``"metabin"``, ...) to the ``results`` dicts of its
            seeds; the targets are those of the first result.
        metrics: the metrics shown per target (keys of a target's entry). With more than one
            target, an ``avg`` column per metric follows.

    Returns:
        The Markdown table (percentages, ``mean ± std`` over seeds; std with ``ddof=0``).

    Examples:
        >>> from metabin_layers.reid.report import comparison_table
        >>> r = {"targets": {"t": {"rank1": 0.5, "mAP": 0.25}}}
        >>> print(comparison_table({"bn": [r, r]}))
        | norm | t R-1 | t mAP | seeds |
        |---|---|---|---|
        | bn | 50.0 ± 0.0 | 25.0 ± 0.0 | 2 |
    """
    import numpy as np

    first = next(iter(runs.values()))[0]
    targets = list(first["targets"])
    names = {"rank1": "R-1", "rank5": "R-5", "rank10": "R-10", "mAP": "mAP", "mINP": "mINP"}
    header = ["norm"] + [f"{t} {names[m]}" for t in targets for m in metrics]
    if len(targets) > 1:
        header += [f"avg {names[m]}" for m in metrics]
    lines = ["| " + " | ".join(header + ["seeds"]) + " |", "|---" * (len(header) + 1) + "|"]
    for variant, results in runs.items():
        cells = []
        for t in targets:
            for m in metrics:
                values = np.array([100 * r["targets"][t][m] for r in results])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
        if len(targets) > 1:
            for m in metrics:
                values = np.array([np.mean([100 * r["targets"][t][m] for t in targets]) for r in results])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {len(results)} |")
    return "\n".join(lines)


#: The one line printed when the curves cannot be drawn.
PLOTS_NOTICE = "matplotlib is not installed: rho.png and cmc.png skipped (pip install 'metabin-layers[reid]')"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the rho and CMC plots need it; nothing is printed).

    Examples:
        >>> from metabin_layers.reid.report import matplotlib_available
        >>> isinstance(matplotlib_available(), bool)
        True
    """
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(PLOTS_NOTICE)
        return None
    return plt


def plot_rho(rho_per_layer: Sequence[Mapping[str, float]], path: Path) -> bool:
    """rho per layer (mean with min-max band). Returns False when matplotlib is missing.

    Args:
        rho_per_layer: one dict per MetaBIN layer with keys ``layer`` (its position),
            ``mean``, ``min`` and ``max`` of its rho.
        path: the image file to write (PNG by its suffix).

    Returns:
        True when the plot was written; False when matplotlib is missing or
        ``rho_per_layer`` is empty.

    Examples:
        >>> import contextlib, io, tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.report import plot_rho
        >>> path = Path(tempfile.mkdtemp()) / "rho.png"
        >>> rho = [{"layer": 0, "mean": 0.9, "min": 0.8, "max": 1.0}, {"layer": 1, "mean": 0.4, "min": 0.1, "max": 0.7}]
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the notice when matplotlib is missing
        ...     written = plot_rho(rho, path)
        >>> written == path.exists()
        True
    """
    plt = _pyplot()
    if plt is None or not rho_per_layer:
        return False
    x = [r["layer"] for r in rho_per_layer]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(x, [r["mean"] for r in rho_per_layer], marker="o", ms=3, label="mean rho")
    ax.fill_between(x, [r["min"] for r in rho_per_layer], [r["max"] for r in rho_per_layer], alpha=0.25, label="min-max")
    ax.set(xlabel="MetaBIN layer (forward order)", ylabel="rho (1 = BN, 0 = IN)", ylim=(-0.05, 1.05))
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the earlier plot stays until this one is whole
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def plot_cmc(targets: Mapping[str, Mapping[str, Any]], path: Path, max_rank: int = 20) -> bool:
    """CMC curves of every target. Returns False when matplotlib is missing.

    Args:
        targets: per target name, its metrics; the ``cmc`` entry (fractions in [0, 1]) is drawn.
        path: the image file to write (PNG by its suffix).
        max_rank: the number of ranks drawn.

    Returns:
        True when the plot was written, False when matplotlib is missing.

    Examples:
        >>> import contextlib, io, tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.report import plot_cmc
        >>> path = Path(tempfile.mkdtemp()) / "cmc.png"
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the notice when matplotlib is missing
        ...     written = plot_cmc({"style4": {"cmc": [0.5, 0.75, 1.0]}}, path)
        >>> written == path.exists()
        True
    """
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, entry in targets.items():
        cmc = entry["cmc"][:max_rank]
        ax.plot(range(1, len(cmc) + 1), [100 * v for v in cmc], marker=".", label=name)
    ax.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the earlier plot stays until this one is whole
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Readers see the old file or the whole new one, never a partial file. A full, read-only or
    over-quota disk raises ``DiskError`` naming ``path`` and the space left (the old file intact).

    Args:
        path: the file to write; its folder must exist.
        text: the content.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.report import write_text_atomic
        >>> path = Path(tempfile.mkdtemp()) / "notes.md"
        >>> write_text_atomic(path, "# run 1")
        >>> path.read_text()
        '# run 1'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in DISK_ERRNOS:  # full, read-only, over quota: one line naming the file
            raise disk_error(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


#: How tables name the normalization variants.
NORM_LABELS = {
    "bn": "BN",
    "in": "IN",
    "bin-half": "BIN-half",
    "bin": "BIN",
    "bin-gate1": "BIN gate1",
    "metabin": "MetaBIN",
    "metabin-gate1": "MetaBIN-gate1",
}


def ranking_note(results: Mapping[str, Any]) -> str:
    """How the metrics were obtained beyond the plain protocol: ``""``, or e.g.
    ``" after k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3), with precise BN over 100 batches"``.

    Args:
        results: a run's results; its targets' ``ranking`` (``evaluate``) and its
            ``precise_bn_batches`` are read.

    Examples:
        >>> from metabin_layers.reid.report import ranking_note
        >>> ranking_note({"targets": {"t": {"ranking": "plain distances"}}})
        ''
        >>> ranking_note({"targets": {"t": {"ranking": "k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)"}},
        ...               "precise_bn_batches": 100})
        ' after k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3), with precise BN over 100 batches'
    """
    rankings = sorted(
        {str(e["ranking"]) for e in results.get("targets", {}).values() if isinstance(e, Mapping) and e.get("ranking")}
        - {"plain distances"}
    )
    note = f" after {'; '.join(rankings)}" if rankings else ""
    if results.get("precise_bn_batches"):
        note += f", with precise BN over {results['precise_bn_batches']} batches"
    return note


def results_caption(results: Mapping[str, Any]) -> str:
    """The line printed above a run's table: what was evaluated, how long it trained, units.

    Args:
        results: a run's results (``norm``, ``seed``, ``iterations``, ``targets``; an optional
            ``checkpoint`` marks an evaluation of a saved model).

    Returns:
        One line, e.g. ``"MetaBIN (seed 0, 10 iterations) on style4, metrics in %:"``; re-ranked
        metrics say so (``ranking_note``): ``"... on style4, metrics in % after k-reciprocal
        re-ranking (k1=20, k2=6, lambda=0.3):"``.

    Examples:
        >>> from metabin_layers.reid.report import results_caption
        >>> results_caption({"norm": "bn", "seed": 0, "iterations": 10, "targets": {"style4": {}}})
        'BN (seed 0, 10 iterations) on style4, metrics in %:'
    """
    label = NORM_LABELS.get(str(results["norm"]), str(results["norm"]))
    trained = f"seed {results['seed']}"
    if results.get("iterations"):
        trained += f", {results['iterations']} iterations"
    what = f"checkpoint {results['checkpoint']}: " if results.get("checkpoint") else ""
    return f"{what}{label} ({trained}) on {', '.join(results['targets'])}, metrics in %{ranking_note(results)}:"


def baseline_table(bn: Mapping[str, Any], metabin: Mapping[str, Any], target: Optional[str] = None) -> str:
    """MetaBIN against its BatchNorm baseline on one target: a caption, a table and MetaBIN's mean rho.

    Args:
        bn: the results of the BN run (``train``'s return value).
        metabin: the results of the MetaBIN run (same data and seed); its ``rho_per_layer``
            gives the mean rho.
        target: the target shown; default: the first one of ``metabin``.

    Returns:
        Text lines: the caption, the Markdown table (rows BN and MetaBIN; R-1, R-5, mAP, mINP in
        %) and a line with the mean rho (over every channel, as ``Trainer.mean_rho``; the mean of
        the per-layer means when channel counts are missing).

    Examples:
        >>> from metabin_layers.reid.report import baseline_table
        >>> m = lambda r1: {"style4": {"rank1": r1, "rank5": 0.9, "rank10": 0.95, "mAP": 0.5, "mINP": 0.2}}
        >>> bn = {"norm": "bn", "seed": 3, "iterations": 9, "targets": m(0.5)}
        >>> mb = {"norm": "metabin", "seed": 3, "iterations": 9, "targets": m(0.75), "mean_rho": 0.875}
        >>> print(baseline_table(bn, mb))
        Held-out style style4 (never seen in training), seed 3, 9 iterations each; metrics in %:
        | model | R-1 | R-5 | mAP | mINP |
        |---|---|---|---|---|
        | BN | 50.0 | 90.0 | 50.0 | 20.0 |
        | MetaBIN | 75.0 | 90.0 | 50.0 | 20.0 |
        MetaBIN mean rho: 0.875 (1 = all BatchNorm, 0 = all InstanceNorm)
    """
    target = target if target is not None else next(iter(metabin["targets"]))
    lines = [
        f"Held-out style {target} (never seen in training), seed {metabin['seed']}, "
        f"{metabin['iterations']} iterations each; metrics in %{ranking_note(metabin)}:",
        "| model | R-1 | R-5 | mAP | mINP |",
        "|---|---|---|---|---|",
    ]
    for label, run in (("BN", bn), ("MetaBIN", metabin)):
        entry = run["targets"][target]
        lines.append(f"| {label} | " + " | ".join(f"{100 * entry[k]:.1f}" for k in ("rank1", "rank5", "mAP", "mINP")) + " |")
    rho = metabin.get("mean_rho")
    if rho is None and metabin.get("rho_per_layer"):
        rho = sum(r["mean"] for r in metabin["rho_per_layer"]) / len(metabin["rho_per_layer"])
    if rho is not None:
        lines.append(f"MetaBIN mean rho: {rho:.3f} (1 = all BatchNorm, 0 = all InstanceNorm)")
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], output: Path, echo: bool = True, plots: Optional[bool] = None) -> None:
    """``results.json``, ``results.md`` (each written atomically) and the plots of one run.

    ``results["test_splits"]`` (optional) adds the "authors' splits" column and, when a target's
    splits are not the authors', a line saying the numbers are not comparable to the paper's.

    Args:
        results: the run's results: ``norm``, ``seed``, ``iterations`` and ``targets`` (per
            target, its metrics and ``cmc``) are required; ``test_splits`` and ``rho_per_layer``
            are optional. Everything must be JSON-serialisable.
        output: the run's folder (must exist); ``rho.png`` (with ``rho_per_layer``) and
            ``cmc.png`` are written when plotting.
        echo: print the caption (``results_caption``) and the table.
        plots: draw ``rho.png`` and ``cmc.png``; None: when matplotlib is installed (silently
            skipped otherwise: the caller says so once, with ``PLOTS_NOTICE``).

    Examples:
        >>> import contextlib, io, json, tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.report import write_results
        >>> m = {"rank1": 0.5, "rank5": 0.7, "rank10": 0.8, "mAP": 0.4, "mINP": 0.2, "cmc": [0.5, 0.7]}
        >>> out = Path(tempfile.mkdtemp())
        >>> write_results({"norm": "bn", "seed": 0, "iterations": 10, "targets": {"style4": m}}, out, plots=False)
        BN (seed 0, 10 iterations) on style4, metrics in %:
        | target | rank1 | rank5 | rank10 | mAP | mINP |
        |---|---|---|---|---|---|
        | style4 | 50.0 | 70.0 | 80.0 | 40.0 | 20.0 |
        >>> print((out / "results.md").read_text())
        # bn (seed 0, 10 iterations)
        <BLANKLINE>
        | target | rank1 | rank5 | rank10 | mAP | mINP |
        |---|---|---|---|---|---|
        | style4 | 50.0 | 70.0 | 80.0 | 40.0 | 20.0 |
        <BLANKLINE>
        >>> json.loads((out / "results.json").read_text())["targets"]["style4"]["mAP"]
        0.4
    """
    output = Path(output)
    write_text_atomic(output / "results.json", json.dumps(results, indent=2))
    table = results_table(results["targets"], results.get("test_splits"))
    notice = split_notice(results.get("test_splits"))
    if notice:
        table += "\n\n" + notice
    header = f"# {results['norm']} (seed {results['seed']}, {results['iterations']} iterations)\n\n"
    note = ranking_note(results)
    footer = f"\n\nMetrics{note}.\n" if note else "\n"
    write_text_atomic(output / "results.md", header + table + footer)
    if echo:
        print(results_caption(results) + "\n" + table, flush=True)
    if plots is None:
        plots = matplotlib_available()
    if not plots:
        return
    if results.get("rho_per_layer"):
        plot_rho(results["rho_per_layer"], output / "rho.png")
    plot_cmc(results["targets"], output / "cmc.png")
