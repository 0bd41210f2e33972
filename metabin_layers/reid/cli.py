"""``metabin-reid``: train, evaluate and compare normalization variants.

    metabin-reid train                       # BN and MetaBIN on the synthetic data: held-out style table, plots
    metabin-reid train --norm metabin        # one variant (runs/synthetic-metabin)
    metabin-reid train --quick               # a smoke run of well under a minute
    metabin-reid train --preset market-to-duke --data-root datasets   # a paper setting (reproducibility.md)
    metabin-reid train --data-root datasets --sources market1501 dukemtmcreid cuhk02 cuhk03_detected cuhksysu \
                       --targets grid viper prid ilids --set backbone=resnet50 pretrained=resnet50.pth
    metabin-reid train --resume runs/synthetic/metabin --set max_iters=600   # continue a run (folder or checkpoint)
    metabin-reid eval --checkpoint runs/synthetic/metabin/checkpoint.pt      # results in runs/synthetic/metabin/eval
    metabin-reid eval --checkpoint DG-resnet/model_final.pth --data-root datasets   # the authors' release
    metabin-reid eval --checkpoint runs/synthetic/metabin/checkpoint.pt --rerank --query-expansion \
                      --set rerank_k1=20 precise_bn_iters=100 --output runs/synthetic/metabin/eval-rerank
    metabin-reid compare --seeds 0 1 2       # BN / IN / BIN-half / BIN / MetaBIN on the same data
    torchrun --nproc_per_node 4 -m metabin_layers.reid.cli train ...   # DDP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import RANKING_KEYS, TrainConfig, default_output, load_config, parse_overrides, read_config_file
from .errors import OutputFolderError, RecipeError
from .model import NORM_VARIANTS
from .presets import PAPER_PRESETS, paper_preset
from .validation import validate_config

__all__ = ["main", "build_parser", "EVAL_KEYS", "EVAL_DATA_KEYS"]

#: ``--set`` keys that ``eval`` honours: which data it tests on and how it evaluates.
EVAL_KEYS = (
    "data_root",
    "targets",
    "num_splits",
    "device",
    "workers",
    "eval_flip",
    "metric",
    "eval_batch_size",
    "eval_invalid_as_zero",
    *RANKING_KEYS,
    "output",
)
#: Keys that ``eval`` also honours for an authors' checkpoint, which holds no config of its own.
EVAL_DATA_KEYS = (
    "height",
    "width",
    "seed",
    "syn_train_ids",
    "syn_test_ids",
    "syn_styles",
    "syn_held_out",
    "syn_images_per_id",
    "syn_distractor_ids",
)


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


#: Top-level modules of the ``reid`` extra (``pip install metabin-layers[reid]``).
RECIPE_DEPENDENCIES = ("torchvision", "timm", "PIL", "tqdm", "yaml", "matplotlib", "scipy", "h5py")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (see metabin_layers.reid.config.TrainConfig)")
    _add_set(p, "override config keys, e.g. lr=0.02 (may be repeated; a later value of a key wins)")
    p.add_argument("--data-root", help="folder holding the real datasets (default: synthetic data)")
    p.add_argument("--sources", nargs="+", help="source datasets (each one domain)")
    p.add_argument("--targets", nargs="+", help="target datasets")
    p.add_argument("--output", help="where results go")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output (refused otherwise)")
    p.add_argument("--quick", action="store_true", help="tiny synthetic run (< 1 minute on 2 CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    _add_debug(p, argparse.SUPPRESS)


def _add_debug(p: argparse.ArgumentParser, default: Any) -> None:
    # before or after the sub-command; SUPPRESS keeps a sub-parser from resetting the global value
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """The ``metabin-reid`` argument parser: sub-commands ``train``, ``eval`` and ``compare``.

    Returns:
        The parser; ``parse_args`` gives the options of one sub-command (``command`` names it).

    Examples:
        >>> from metabin_layers.reid.cli import build_parser
        >>> args = build_parser().parse_args(["train", "--quick", "--norm", "bn", "--set", "lr=0.02", "max_iters=2"])
        >>> args.command, args.quick, args.norm, args.set
        ('train', True, 'bn', ['lr=0.02', 'max_iters=2'])
        >>> build_parser().parse_args(["compare"]).seeds
        [0, 1, 2]
    """
    parser = argparse.ArgumentParser(
        prog="metabin-reid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train", help="train and evaluate: BN and MetaBIN side by side on the synthetic data, else one variant"
    )
    _add_common(p_train)
    p_train.add_argument(
        "--norm",
        choices=NORM_VARIANTS,
        help="train this variant alone (default: metabin; on the synthetic data without --norm, BN and MetaBIN)",
    )
    p_train.add_argument("--resume", help="checkpoint.pt, or the run folder, to continue from (default --output: its folder)")
    p_train.add_argument(
        "--allow-config-change", action="store_true", help="resume although the config differs from the checkpoint's"
    )
    p_train.add_argument("--preset", choices=sorted(PAPER_PRESETS), help="a paper setting (docs/reproducibility.md)")
    # eval takes only what it uses: argparse refuses every other option
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint on its targets (results in <its folder>/eval)")
    p_eval.add_argument("--checkpoint", required=True, help="a recipe checkpoint.pt or an authors' release")
    _add_set(p_eval, f"evaluation keys: {', '.join(EVAL_KEYS)} (an authors' checkpoint also: {', '.join(EVAL_DATA_KEYS)})")
    p_eval.add_argument("--data-root", help="folder holding the real datasets (default: the checkpoint's data)")
    p_eval.add_argument("--targets", nargs="+", help="target datasets (default: the checkpoint's)")
    p_eval.add_argument("--output", help="where results go (default: <checkpoint folder>/eval); never a training run's folder")
    p_eval.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output")
    p_eval.add_argument(
        "--rerank",
        action="store_true",
        help="k-reciprocal re-ranking (Zhong et al. 2017; --set rerank_k1=20 rerank_k2=6 rerank_lambda=0.3)",
    )
    p_eval.add_argument(
        "--query-expansion",
        action="store_true",
        help="average query expansion, as fast-reid's (--set query_expansion_k=5 query_expansion_alpha=3)",
    )
    p_cmp = sub.add_parser("compare", help="train every normalization variant on the same data and seeds")
    _add_common(p_cmp)
    p_cmp.add_argument("--preset", choices=sorted(PAPER_PRESETS), help="a paper setting (docs/reproducibility.md)")
    p_cmp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_cmp.add_argument("--norms", nargs="+", choices=NORM_VARIANTS, default=list(NORM_VARIANTS))
    return parser


def _check_config_file(path: str) -> None:
    """A ``--config`` that is no readable YAML file is one error line, not a traceback."""
    import yaml

    try:
        read_config_file(path)
    except OSError as err:
        raise RecipeError(f"--config {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"--config {path}: not valid YAML ({first})") from err
    except (KeyError, ValueError):
        pass  # reported with the key by load_config's caller


def _config(args: argparse.Namespace, extra: Optional[dict[str, Any]] = None) -> TrainConfig:
    if args.config is not None:
        _check_config_file(args.config)
    try:
        overrides = parse_overrides(args.set)
    except KeyError as err:  # an unknown key: the message lists the known ones
        raise RecipeError(f"--set: {err.args[0]}") from err
    except ValueError as err:
        raise RecipeError(f"--set: {err}") from err
    output = args.output
    resume = getattr(args, "resume", None)
    if output is None and resume:  # continue in the run's own folder
        output = resume if Path(resume).is_dir() else str(Path(resume).parent)
    for key, value in (
        ("data_root", args.data_root),
        ("sources", args.sources),
        ("targets", args.targets),
        ("norm", getattr(args, "norm", None)),
        ("output", output),
    ):
        if value is not None:
            overrides[key] = value
    if resume and not extra:
        return _resume_config(args, overrides)
    overrides.update(extra or {})
    if output is None and (_with_baseline(args) or args.command == "compare") and overrides.get("data_root") is None:
        overrides["output"] = default_output(None, quick=args.quick)  # several variants in one folder
    preset = getattr(args, "preset", None)
    if preset:
        if overrides.get("data_root") is None:
            raise RecipeError(f"--preset {preset} trains on the real datasets: pass --data-root")
        # the preset's values first; --config, --set and the other options override them
        values = {k: v for k, v in paper_preset(preset).to_dict().items() if k not in ("data_root", "output")}
        if args.config is not None:
            import yaml

            with open(args.config) as f:
                values = {k: v for k, v in values.items() if k not in (yaml.safe_load(f) or {})}
        overrides = {**values, **overrides}
        if output is None:  # one folder per preset (and variant), as the synthetic runs have
            overrides["output"] = default_output(overrides.get("norm", "metabin"), synthetic=False, preset=preset)
    try:
        cfg = load_config(args.config, overrides, quick=args.quick, main_job=_with_baseline(args))
        validate_config(cfg)  # and the device, backbone and datasets, before anything is read or written
    except KeyError as err:
        raise RecipeError(f"{args.config}: {err.args[0]}") from err
    except ValueError as err:
        raise RecipeError(f"config: {err}") from err
    return cfg


def _resume_config(args: argparse.Namespace, overrides: dict[str, Any]) -> TrainConfig:
    """A resumed run's config: the one it was started with, then what the command line sets."""
    from .train import read_resume

    _, saved, source = read_resume(args.resume)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    if args.config is not None:
        try:
            values.update(read_config_file(args.config))
        except KeyError as err:
            raise RecipeError(f"{args.config}: {err.args[0]}") from err
        except ValueError as err:
            raise RecipeError(f"{args.config}: {err}") from err
    values.update(overrides)  # --set and the options given (--output: default the run's folder)
    try:
        cfg = TrainConfig(**values)
        validate_config(cfg)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"resume {source}: config: {err}") from err
    ignored = [flag for flag, given in (("--quick", args.quick), ("--preset", getattr(args, "preset", None))) if given]
    if ignored:
        print(f"metabin-reid: note: {' and '.join(ignored)} ignored: a resumed run keeps its own config", file=sys.stderr)
    return cfg


def _explicit_keys(args: argparse.Namespace) -> set[str]:
    """Config keys the user set: ``--set`` pairs and the ``--config`` file's keys."""
    keys = {pair.split("=", 1)[0].strip() for pair in args.set}
    if getattr(args, "config", None):
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f)
        except OSError:
            loaded = None  # load_config reports it
        if isinstance(loaded, dict):
            keys |= set(loaded)
    return keys


def _with_baseline(args: argparse.Namespace) -> bool:
    """``train`` with no variant chosen, on the synthetic data: MetaBIN and its BN baseline."""
    if args.command != "train" or args.norm or args.resume or args.preset or args.data_root:
        return False
    return not ({"norm", "data_root"} & _explicit_keys(args))


def _plots_notice() -> None:
    from .report import PLOTS_NOTICE, matplotlib_available

    if not matplotlib_available():
        print(PLOTS_NOTICE, flush=True)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import distributed_from_env, train

    cfg = _config(args)
    _plots_notice()
    if _with_baseline(args):
        from .baseline import train_with_baseline

        with distributed_from_env():
            return train_with_baseline(cfg, progress=not args.no_progress and sys.stderr.isatty(), overwrite=args.overwrite)
    with distributed_from_env():
        return train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress and sys.stderr.isatty(),  # a log file gets log lines
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )


def _eval_overrides(args: argparse.Namespace, allowed: Sequence[str]) -> dict[str, Any]:
    """``--set`` of ``eval``: keys it honours, typed; any other key is refused by name."""
    try:
        overrides = parse_overrides(args.set)
    except KeyError as err:
        raise RecipeError(f"--set: {err.args[0]}") from err
    except ValueError as err:
        raise RecipeError(f"--set: {err}") from err
    refused = [k for k in overrides if k not in allowed]
    if refused:
        raise RecipeError(
            f"--set {', '.join(refused)}: eval cannot change {'this key' if len(refused) == 1 else 'these keys'} "
            f"(the checkpoint fixes the model and its data); it honours {', '.join(allowed)}"
        )
    overrides.update({k: v for k, v in (("data_root", args.data_root), ("targets", args.targets), ("output", args.output)) if v})
    for key in ("rerank", "query_expansion"):  # the flags say yes; --set key=false cannot undo them
        if getattr(args, key):
            overrides[key] = True
    return overrides


def _eval_output(args: argparse.Namespace, overrides: dict[str, Any]) -> Path:
    """Where ``eval`` writes: ``--output`` or ``<checkpoint folder>/eval[-<stem>]``; never a training run's folder."""
    from .train import check_output

    checkpoint = Path(args.checkpoint)
    default = checkpoint.parent / ("eval" if checkpoint.stem == "checkpoint" else f"eval-{checkpoint.stem}")
    out = Path(overrides.get("output") or default)
    training = [name for name in ("checkpoint.pt", "config.json", "log.txt") if (out / name).exists()]
    if training:
        raise OutputFolderError(
            f"output {out}: holds a training run ({', '.join(training)}); eval never writes over it: choose another --output"
        )
    check_output(out, overwrite=args.overwrite)
    return out


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from .authors_checkpoint import evaluate_authors_checkpoint, is_authors_checkpoint

    if is_authors_checkpoint(args.checkpoint):  # a released model of the MetaBIN authors
        overrides = _eval_overrides(args, EVAL_KEYS + EVAL_DATA_KEYS)
        out = _eval_output(args, overrides)
        overrides["output"] = str(out)
        try:
            cfg = load_config(None, overrides)
            validate_config(cfg)
        except ValueError as err:
            raise RecipeError(f"config: {err}") from err
        _plots_notice()
        return evaluate_authors_checkpoint(args.checkpoint, cfg)  # the folder is made once results are due

    import torch

    from metabin_layers import metabin_modules

    from .checkpoint import load_checkpoint
    from .checks import check_images, check_targets
    from .data import build_data
    from .model import ReIDModel
    from .report import write_results
    from .train import _device, evaluate_model, precise_bn, replacing_results
    from .visualize import save_ranked_pictures

    overrides = _eval_overrides(args, EVAL_KEYS)
    out = _eval_output(args, overrides)
    state = load_checkpoint(args.checkpoint)
    saved = dict(state["config"])
    saved.update(overrides)
    saved["output"] = str(out)  # beside the training run's own results by default, never over them
    try:
        cfg = TrainConfig(**saved)
        validate_config(cfg)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"config: {err}") from err
    data = build_data(cfg)
    check_targets(data)
    check_images(data)  # every query and gallery image opens, before the model runs
    device = _device(cfg.device)
    model = ReIDModel(cfg.backbone, data.num_classes, norm=cfg.norm, last_stride=cfg.last_stride).to(device)
    model.load_state_dict(state["model"])
    _plots_notice()
    precise = precise_bn(model, data, cfg, device)  # the running statistics as the run's final evaluation had them
    distances: dict[str, dict[str, Any]] = {}
    metrics = evaluate_model(model, data, cfg, device, distances=distances)
    layers = metabin_modules(model.backbone)
    rhos = [m.rho.detach() for m in layers]
    results = {
        "config": cfg.to_dict(),
        "checkpoint": str(args.checkpoint),
        "seed": cfg.seed,
        "norm": cfg.norm,
        "iterations": state["iteration"],
        "targets": metrics,
        "test_splits": data.test_splits,
        "mean_rho": float(torch.cat([r.flatten() for r in rhos]).mean()) if rhos else None,
        "rho_per_layer": [
            {"layer": i, "mean": float(r.mean()), "min": float(r.min()), "max": float(r.max())} for i, r in enumerate(rhos)
        ],
        "precise_bn_batches": precise,
    }
    with replacing_results(out):  # an earlier evaluation there stays until this one is written
        write_results(results, out)
        save_ranked_pictures(distances, out, f"{cfg.norm} checkpoint")
    print(f"Results and plots: {out}", flush=True)
    return results


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from .report import comparison_table, write_text_atomic
    from .train import train

    base = _config(args)
    _plots_notice()
    root = Path(base.output) / "compare"
    runs: dict[str, list[dict[str, Any]]] = {}
    for norm in args.norms:
        for seed in args.seeds:
            cfg = _config(args, {"norm": norm, "seed": seed, "output": str(root / norm / f"seed{seed}")})
            print(f"== {norm}, seed {seed} ==", flush=True)
            result = train(cfg, progress=not args.no_progress, overwrite=args.overwrite, verbose=False)
            result.pop("history", None)
            runs.setdefault(norm, []).append(result)
    table = comparison_table(runs)
    command = "metabin-reid " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("metabin-reid") else "metabin-reid compare ..."
    write_text_atomic(root / "compare.md", f"# Normalization comparison\n\n`{command}`\n\n{table}\n")
    write_text_atomic(root / "compare.json", json.dumps(runs, indent=2))
    print(table, flush=True)
    return runs


def _user_error_line(err: BaseException) -> Optional[str]:
    """The one line for an error of the user's files met while running: a disk that cannot take
    a file (full, read-only, over quota), or an image that cannot be decoded; None for others."""
    from .datasets import UnreadableImageError
    from .disk import disk_error, find_disk_error

    disk = find_disk_error(err)
    if disk is not None:
        return str(disk_error(disk.filename or "a file of the run", disk))
    if isinstance(err, UnreadableImageError):
        # From a loader worker the message holds the worker's traceback: its last line is ours.
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else type(err).__name__
        return last.split(f"{type(err).__name__}: ", 1)[-1]
    return None


def _interrupted(stop: KeyboardInterrupt) -> str:
    """The lines printed after Ctrl-C: where training stopped and how to continue."""
    from .train import TrainingInterrupted

    if not isinstance(stop, TrainingInterrupted):
        return "metabin-reid: interrupted (outside the training iterations)"
    if stop.checkpoint_iteration is None:
        saved = "no checkpoint was saved yet, a resume starts again from iteration 0"
    else:
        saved = f"the last checkpoint is from iteration {stop.checkpoint_iteration} ({Path(stop.output) / 'checkpoint.pt'})"
    return (
        f"metabin-reid: interrupted at iteration {stop.iteration} of {stop.max_iters}; {saved}\n"
        f"resume with: {stop.resume_command}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``metabin-reid``; a problem with the user's files, folders, config or data is one line on
    stderr and exit status 2 (no traceback; ``--debug`` shows it).

    Ctrl-C (or SIGTERM) while training prints the iteration reached, the last checkpoint and the
    command that resumes the run, and returns 130 (143 after SIGTERM); a checkpoint being written
    is discarded, never left partial.

    Args:
        argv: The command-line arguments after the program name; ``None``: ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 after a user error (the message is on stderr), 130
        after Ctrl-C, 143 after SIGTERM.

    Raises:
        SystemExit: From argparse, for ``--help`` (status 0) or arguments it cannot parse (status 2).

    Examples:
        >>> from metabin_layers.reid.cli import main
        >>> main(["train", "--preset", "market-to-duke"])  # a paper preset needs --data-root
        2
        >>> try:
        ...     main(["train", "--norm", "layernorm"])
        ... except SystemExit as stop:
        ...     print("exit status", stop.code)
        exit status 2
    """
    args = build_parser().parse_args(argv)
    received: list[int] = []

    def terminate(signum: int, frame: Any) -> None:  # SIGTERM stops training as Ctrl-C does
        received.append(signum)
        raise KeyboardInterrupt

    # signal handlers can only be set from the main thread
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main_thread:
        signal.signal(signal.SIGTERM, terminate)
    try:
        {"train": _train, "eval": _eval, "compare": _compare}[args.command](args)
    except RecipeError as err:
        if args.debug:
            raise
        print(f"metabin-reid: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in RECIPE_DEPENDENCIES:
            raise
        print(f"metabin-reid: error: install metabin-layers[reid] (the recipe needs {err.name})", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk, an image that cannot be decoded: the user's to fix
        line = None if args.debug else _user_error_line(err)
        if line is None:
            raise
        print(f"metabin-reid: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        print(_interrupted(stop), file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
