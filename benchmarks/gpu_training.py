"""Training on one GPU through ``metabin-reid train``: AMP and ``torch.compile`` speed runs at the
paper's sizes, and a long-run BN / BIN / BIN-half / MetaBIN comparison on the synthetic data.
``benchmarks/gpu_training.sh OUTDIR`` runs it.

    benchmarks/gpu_training.sh results/training          # on a CUDA machine (about 8 minutes)
    benchmarks/gpu_training.sh /tmp/dry --dry-run        # CPU, tiny settings: checks the plumbing only

1. Speed runs: ResNet-50 at 256x128, the authors' batch composition (base batch 80 = 20
   identities x 4; meta batch 80 over 5 source domains, split 3 / 2), 200 iterations each (``--speed-iters``):
   BN and MetaBIN with AMP bf16 and with AMP fp16 + GradScaler, MetaBIN (bf16) with
   ``compile=inductor`` (the base and the meta steps compiled), and BN and MetaBIN (bf16) with
   ``cuda_graph=true`` (each iteration replayed from one CUDA graph). Reported: iterations/s after
   warm-up, the time to iteration 10 (for the compiled run that includes compilation; the
   difference to the eager run is the compile time), peak CUDA memory
   (``torch.cuda.max_memory_allocated``), whether every weight is finite and the range of rho
   (must lie in [0, 1]).
2. Long runs: BN, BIN, BIN-half and MetaBIN on the synthetic data (ResNet-18 at 64x32, the
   recipe's synthetic preset with ``iters_per_epoch=500``: 3,000 iterations, 10x the default
   run, same schedule shape), for each seed, several runs at a time on the GPU. Reported:
   held-out R-1 and mAP per seed and their mean, the mean rho per layer group.

Synthetic images are rendered once by a process pool over all cores into ``OUTDIR/cache`` and
loaded into the renderer's in-memory cache of each run (the recipe renders lazily otherwise),
so rendering is not the bottleneck. Every run is ``python -m metabin_layers.reid.cli train`` in its
own process; a run past its time limit or the total budget (``--budget-s``) is stopped and
reported as such. Tables: ``OUTDIR/training.md`` and ``training.json``; each run's output and
log under ``OUTDIR/speed`` and ``OUTDIR/long``. Without CUDA (and without ``--dry-run``) it exits
at once with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT_TAG = "@@RESULT "

SPEED_RUNS = [
    ("bn-bf16", "BN, AMP bf16", {"norm": "bn", "amp_dtype": "bfloat16"}),
    ("metabin-bf16", "MetaBIN, AMP bf16", {"norm": "metabin", "amp_dtype": "bfloat16"}),
    ("bn-fp16", "BN, AMP fp16 + GradScaler", {"norm": "bn", "amp_dtype": "float16"}),
    ("metabin-fp16", "MetaBIN, AMP fp16 + GradScaler", {"norm": "metabin", "amp_dtype": "float16"}),
    (
        "metabin-bf16-compile",
        "MetaBIN, AMP bf16, torch.compile (base and meta steps)",
        {"norm": "metabin", "amp_dtype": "bfloat16", "compile": "inductor"},
    ),
    ("bn-bf16-graph", "BN, AMP bf16, one CUDA graph per iteration", {"norm": "bn", "amp_dtype": "bfloat16", "cuda_graph": True}),
    (
        "metabin-bf16-graph",
        "MetaBIN, AMP bf16, one CUDA graph per iteration",
        {"norm": "metabin", "amp_dtype": "bfloat16", "cuda_graph": True},
    ),
]
DRY_SPEED_RUNS = ("bn-fp16", "metabin-bf16", "metabin-bf16-compile")
LONG_NORMS = ("bn", "bin", "bin-half", "metabin")


def speed_settings(dry: bool, iterations: int = 200) -> dict[str, Any]:
    if dry:
        return {
            "device": "cpu", "backbone": "test_resnet", "height": 32, "width": 16, "pad": 2, "batch_size": 40,
            "meta_batch_size": 40, "syn_styles": 6, "syn_held_out": [5], "syn_train_ids": 40, "syn_images_per_id": 4,
            "syn_test_ids": 4, "syn_distractor_ids": 0, "max_iters": 3, "first_inner_loop": 1, "log_every": 1,
            "checkpoint_every": 100000, "workers": 0, "amp": True, "seed": 0,
        }  # fmt: skip
    return {
        "device": "cuda", "backbone": "resnet50", "height": 256, "width": 128, "pad": 10, "batch_size": 80,
        "meta_batch_size": 80, "num_instances": 4, "syn_styles": 6, "syn_held_out": [5], "syn_train_ids": 200,
        "syn_images_per_id": 8, "syn_test_ids": 20, "syn_distractor_ids": 0, "max_iters": iterations, "log_every": 10,
        "checkpoint_every": 100000, "workers": 6, "amp": True, "seed": 0,
    }  # fmt: skip


def long_settings(dry: bool, seed: int, iterations: int) -> dict[str, Any]:
    if dry:
        return {
            "device": "cpu", "backbone": "test_resnet", "height": 32, "width": 16, "pad": 2,
            "syn_train_ids": 40, "syn_images_per_id": 4, "syn_test_ids": 4, "syn_distractor_ids": 0,
            "max_iters": 2, "first_inner_loop": 1, "log_every": 1, "checkpoint_every": 100000, "seed": seed,
        }  # fmt: skip
    # the synthetic preset, 10x longer with the same schedule shape (6 epochs, milestone at 4)
    return {
        "device": "cuda", "iters_per_epoch": iterations // 6, "epochs": 6, "amp": False, "log_every": 100,
        "checkpoint_every": 100000, "workers": 1, "seed": seed,
    }  # fmt: skip


def _set_args(settings: dict[str, Any]) -> list[str]:
    out = []
    for k, v in settings.items():
        v = ",".join(map(str, v)) if isinstance(v, list) else v
        out.append(f"{k}={v}")
    return out


# -- rendering cache -------------------------------------------------------------------------


def _synthetic_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """The SyntheticReID arguments the recipe derives from these settings (same code path)."""
    from metabin_layers.reid.config import load_config

    cfg = load_config(overrides={k: v for k, v in settings.items()})
    return {
        "num_train_ids": cfg.syn_train_ids,
        "num_test_ids": cfg.syn_test_ids,
        "num_styles": cfg.syn_styles,
        "held_out_styles": tuple(cfg.syn_held_out),
        "images_per_id_per_style": cfg.syn_images_per_id,
        "height": cfg.height,
        "width": cfg.width,
        "seed": cfg.seed,
        "num_distractor_ids": cfg.syn_distractor_ids,
    }


_WORKER_SYN: Any = None


def _init_worker(kwargs: dict[str, Any]) -> None:
    global _WORKER_SYN
    from metabin_layers.reid.synthetic import SyntheticReID

    _WORKER_SYN = SyntheticReID(cache=False, **kwargs)


def _render(path: str) -> np.ndarray:
    return _WORKER_SYN.render(path)


def prerender(settings: dict[str, Any], cache_dir: Path, processes: int) -> Path:
    """Render every image of the dataset these settings describe; ``cache_dir/<key>.npy`` + ``.json``."""
    import multiprocessing as mp

    from metabin_layers.reid.synthetic import SyntheticReID

    kwargs = _synthetic_kwargs(settings)
    key = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:12]
    npy = cache_dir / f"synthetic-{key}.npy"
    if npy.exists():
        return npy
    syn = SyntheticReID(cache=False, **kwargs)
    paths = [it.img_path for it in syn.train]
    for s in syn.held_out_styles:
        paths += [it.img_path for it in syn.query[s] + syn.gallery[s]]
    paths = list(dict.fromkeys(paths))
    with mp.get_context("fork").Pool(processes, initializer=_init_worker, initargs=(kwargs,)) as pool:
        images = pool.map(_render, paths, chunksize=max(1, len(paths) // (4 * processes)))
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(npy, np.stack(images))
    npy.with_suffix(".json").write_text(json.dumps(paths))
    return npy


# -- one run (child process) -------------------------------------------------------------------


def child(cache: str, argv: list[str]) -> int:
    """Run ``metabin-reid`` with ``argv`` in this process, the renderer's cache pre-filled from
    ``cache``; then print one line ``@@RESULT {json}`` with peak memory and checks of the model."""
    import torch

    from metabin_layers.reid import cli
    from metabin_layers.reid import train as recipe
    from metabin_layers.reid.checkpoint import load_checkpoint

    if cache:
        images = np.load(cache)
        paths = json.loads(Path(cache).with_suffix(".json").read_text())
        build_data = recipe.build_data

        def build_data_cached(cfg):
            data = build_data(cfg)
            source = getattr(data.train_set, "source", None)
            if source is not None and source._cache is not None and (source.height, source.width) == images.shape[1:3]:
                for path, img in zip(paths, images):
                    img.setflags(write=False)
                    source._cache[path] = img
            return data

        recipe.build_data = build_data_cached  # the Trainer looks it up in its module
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = cli.main(argv)
    result: dict[str, Any] = {"seconds": time.perf_counter() - t0}
    result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    output = Path(argv[argv.index("--output") + 1])
    state = load_checkpoint(output / "checkpoint.pt")["model"]  # the recipe's format, loaded safely
    floats = [v for v in state.values() if v.is_floating_point()]
    result["finite"] = bool(all(torch.isfinite(v).all() for v in floats))
    rhos = {k: v for k, v in state.items() if k.endswith(".rho") and k.startswith("backbone.")}
    if rhos:
        flat = torch.cat([v.flatten() for v in rhos.values()])
        result["rho_min"], result["rho_max"], result["rho_mean"] = float(flat.min()), float(flat.max()), float(flat.mean())
        groups: dict[str, list[torch.Tensor]] = {}
        for k, v in rhos.items():
            part = k.split(".")[1]
            groups.setdefault(part if part.startswith("layer") else "stem", []).append(v.flatten())
        result["rho_groups"] = {g: float(torch.cat(vs).mean()) for g, vs in sorted(groups.items())}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return rc


def _child_cmd(cache: Optional[Path], name_dir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--_child", str(cache or ""), "--"]
    cmd += ["train", "--no-progress", "--output", str(name_dir), "--set", *_set_args({**settings, **extra})]
    return cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_IT = re.compile(r"(?:^|\s)it=(\d+)(?:\s|$)")


def speed_run(cmd: list[str], log: Path, limit_s: float) -> dict[str, Any]:
    """Run one child, time-stamping its log lines as they arrive; parse the iteration marks."""
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    result: dict[str, Any] = {}
    start_line: Optional[float] = None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    watchdog = threading.Timer(limit_s, proc.kill)  # also when the run stops printing
    watchdog.start()
    status = "passed"
    with open(log, "w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            f.write(f"[{now:8.2f}s] {line}")
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG) :])
                continue
            m = _IT.search(line)
            if m:
                marks.append((int(m.group(1)), now))
            elif start_line is None and line.startswith("SyntheticReID"):
                start_line = now  # printed once the model is built, right before training
    rc = proc.wait()
    watchdog.cancel()
    if time.perf_counter() - t0 >= limit_s and rc != 0:
        status = f"stopped at the time limit ({limit_s:.0f} s)"
    elif rc != 0:
        status = f"failed (exit {rc})"
    out: dict[str, Any] = {"status": status, "wall_s": round(time.perf_counter() - t0, 1), **result}
    if start_line is not None and marks:
        out["train_start_s"] = start_line
        first_it, first_t = marks[0]
        out["first_mark"] = [first_it, round(first_t - start_line, 2)]
    steady = [(i, t) for i, t in marks if i >= 2 * marks[0][0]] if marks else []
    if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
        out["it_per_s"] = (steady[-1][0] - steady[0][0]) / (steady[-1][1] - steady[0][1])
        out["steady_range"] = [steady[0][0], steady[-1][0]]
    return out


# -- driver ------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        cut = argv.index("--")
        return child(argv[1], argv[cut + 1 :])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: check that every step runs")
    p.add_argument("--budget-s", type=float, default=480.0, help="total time (default 480); runs past it are stopped")
    p.add_argument("--seeds", default=None, help="long-run seeds (default 0,1,2; dry run 0)")
    p.add_argument("--speed-iters", type=int, default=200, help="speed-run iterations (default 200, at least 30)")
    p.add_argument("--long-iters", type=int, default=3000, help="long-run iterations (default 3000, a multiple of 6)")
    p.add_argument("--jobs", type=int, default=None, help="long runs at a time (default 12 on CUDA, 4 in a dry run)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: speed,long")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    args = p.parse_args(argv)
    if args.long_iters < 6 or args.long_iters % 6:
        p.error(f"--long-iters must be a positive multiple of 6 (6 epochs), got {args.long_iters}")
    if args.speed_iters < 30:
        p.error(f"--speed-iters must be at least 30 (10 warm-up iterations, then the timed ones), got {args.speed_iters}")

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_training: CUDA is not available (torch.cuda.is_available() is False): these runs need an NVIDIA GPU. "
            "Use --dry-run for a CPU smoke run of the plumbing.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"gpu_training: {out} is not empty; choose a new folder or pass --overwrite", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    seeds = [int(s) for s in (args.seeds or ("0" if args.dry_run else "0,1,2")).split(",")]
    jobs = args.jobs or (4 if args.dry_run else 12)
    procs = os.cpu_count() or 1
    env = _environment(args.dry_run)
    report: dict[str, Any] = {"env": env, "speed": {}, "long": {}, "settings": {}}

    speed = speed_settings(args.dry_run, args.speed_iters)
    if "speed" not in skip:
        report["settings"]["speed"] = speed
        t = time.perf_counter()
        cache = prerender(speed, out / "cache", procs)
        report["prerender_speed_s"] = round(time.perf_counter() - t, 1)
        (out / "speed").mkdir(exist_ok=True)
        # a dry run checks each code path once: fp16 (BN), bf16 (MetaBIN), compile against eager
        runs = [r for r in SPEED_RUNS if r[0] in DRY_SPEED_RUNS] if args.dry_run else SPEED_RUNS
        for key, label, extra in runs:
            extra = dict(extra)
            if args.dry_run and "compile" in extra:
                extra["compile"] = "eager"  # the plumbing only: inductor would compile for minutes on a CPU
            left = deadline - time.perf_counter()
            if left < 20:
                report["speed"][key] = {"label": label, "status": "skipped (time budget spent)"}
                continue
            limit = min(left, 360.0 if "compile" in extra else 150.0)
            cmd = _child_cmd(cache, out / "speed" / key, speed, extra)
            print(f"[gpu_training] speed run {label} (limit {limit:.0f} s)", flush=True)
            r = speed_run(cmd, out / "speed" / f"{key}.log", limit)
            report["speed"][key] = {"label": label, **r}
            print(f"[gpu_training]   {r.get('status')}, {r.get('it_per_s', float('nan')):.2f} it/s", flush=True)

    if "long" not in skip:
        report["settings"]["long"] = long_settings(args.dry_run, 0, args.long_iters)
        t = time.perf_counter()
        caches = {s: prerender(long_settings(args.dry_run, s, args.long_iters), out / "cache", procs) for s in seeds}
        report["prerender_long_s"] = round(time.perf_counter() - t, 1)
        report["long"] = long_runs(args, seeds, caches, out / "long", jobs, deadline)

    report["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=1, default=str))
    text = render(report, args.dry_run)
    (out / "training.md").write_text(text)
    print(text)
    ok = all(r.get("status") == "passed" for r in report["speed"].values())
    ok = ok and all(r.get("status") == "passed" for runs in report["long"].values() for r in runs.values())
    return 0 if ok else 1


def long_runs(args, seeds: list[int], caches: dict[int, Path], root: Path, jobs: int, deadline: float) -> dict[str, Any]:
    """Every (norm, seed) run, ``jobs`` at a time (seed by seed), until the deadline."""
    root.mkdir(exist_ok=True)
    queue = [(norm, seed) for seed in seeds for norm in LONG_NORMS]
    running: dict[tuple[str, int], tuple[subprocess.Popen, Any, float]] = {}
    done: dict[str, dict[str, Any]] = {norm: {} for norm in LONG_NORMS}
    while queue or running:
        while queue and len(running) < jobs and deadline - time.perf_counter() > 10:
            norm, seed = queue.pop(0)
            settings = long_settings(args.dry_run, seed, args.long_iters)
            cmd = _child_cmd(caches[seed], root / norm / f"seed{seed}", settings, {"norm": norm})
            log = open(root / f"{norm}-seed{seed}.log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
            running[(norm, seed)] = (proc, log, time.perf_counter())
            print(f"[gpu_training] long run {norm} seed {seed} started", flush=True)
        if not running and queue:  # budget spent before these could start
            for norm, seed in queue:
                done[norm][str(seed)] = {"status": "skipped (time budget spent)"}
            break
        time.sleep(0.5)
        for (norm, seed), (proc, log, t0) in list(running.items()):
            over = time.perf_counter() > deadline
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                status = "stopped at the time budget"
            else:
                status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            log.close()
            done[norm][str(seed)] = {"status": status, "wall_s": round(time.perf_counter() - t0, 1)}
            done[norm][str(seed)].update(_long_result(root, norm, seed))
            del running[(norm, seed)]
            print(f"[gpu_training] long run {norm} seed {seed}: {status}", flush=True)
    return done


def _long_result(root: Path, norm: str, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text = (root / f"{norm}-seed{seed}.log").read_text()
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            out.update(json.loads(line[len(RESULT_TAG) :]))
    res = root / norm / f"seed{seed}" / "results.json"
    if res.exists():
        r = json.loads(res.read_text())
        out["iterations"] = r["iterations"]
        out["targets"] = {t: {"rank1": v["rank1"], "mAP": v["mAP"]} for t, v in r["targets"].items()}
        out["train_seconds"] = r.get("train_seconds")
    return out


def _environment(dry: bool) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "dry_run": dry,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = "unavailable"
    if torch.cuda.is_available() and not dry:
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(report: dict[str, Any], dry: bool) -> str:
    env = report["env"]
    where = env.get("gpu") or "CPU (dry run: tiny settings, numbers meaningless)"
    lines = [
        "# Training on the GPU",
        "",
        f"{where}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}; {env['date']}. "
        f"Total {report.get('total_s', 0):.0f} s.",
        "",
    ]
    if report["speed"]:
        s = report["settings"]["speed"]
        lines += [
            f"## Speed: {s['backbone']} at {s['height']}x{s['width']}, base batch {s['batch_size']}, meta batch "
            f"{s['meta_batch_size']}, {s['max_iters']} iterations (`metabin-reid train`)",
            "",
            "it/s: iterations (base step + meta step for MetaBIN) per second after warm-up, from the time stamps "
            "of the log lines. to it N: seconds from the start of training to iteration N (model built; includes "
            "cuDNN autotuning and, with torch.compile, compilation). Peak: `torch.cuda.max_memory_allocated`.",
            "",
        ]
        bn = {k: v.get("it_per_s") for k, v in report["speed"].items()}
        rows = []
        for key, r in report["speed"].items():
            ref = {"metabin-bf16": "bn-bf16", "metabin-fp16": "bn-fp16"}.get(key)
            rel = f"{bn[ref] / r['it_per_s']:.2f}x" if ref and bn.get(ref) and r.get("it_per_s") else "-"
            first = r.get("first_mark")
            rho = f"[{r['rho_min']:.3f}, {r['rho_max']:.3f}]" if "rho_min" in r else "-"
            in_range = "rho_min" in r and 0.0 <= r["rho_min"] and r["rho_max"] <= 1.0
            rho_ok = "" if "rho_min" not in r else (" ok" if in_range else " **OUT OF [0, 1]**")
            rows.append(
                [
                    r["label"],
                    r["status"],
                    _fmt(r.get("it_per_s"), ".2f"),
                    rel,
                    f"{first[1]:.1f} s (it {first[0]})" if first else "-",
                    _fmt(r.get("peak_mib"), ".0f"),
                    {True: "yes", False: "**no**"}.get(r.get("finite"), "-"),  # type: ignore[call-overload]
                    rho + rho_ok,
                ]
            )
        lines.append(
            _table(["run", "status", "it/s", "time / BN's", "to it N", "peak MiB", "all weights finite", "rho range"], rows)
        )
        eager, comp = report["speed"].get("metabin-bf16", {}), report["speed"].get("metabin-bf16-compile", {})
        if eager.get("first_mark") and comp.get("first_mark") and eager["first_mark"][0] == comp["first_mark"][0]:
            lines += [
                "",
                f"torch.compile: compile time about {comp['first_mark'][1] - eager['first_mark'][1]:.0f} s (time to "
                f"iteration {comp['first_mark'][0]} compiled minus eager); after it "
                f"{_fmt(comp.get('it_per_s'), '.2f')} it/s against {_fmt(eager.get('it_per_s'), '.2f')} eager.",
            ]
        lines.append("")
    if report["long"]:
        s = report["settings"]["long"]
        lines += [
            "## Long runs on the synthetic data",
            "",
            f"The recipe's synthetic preset with {', '.join(f'{k}={v}' for k, v in s.items() if k != 'seed')}; "
            "held-out style R-1 / mAP in %, per seed, then mean ± std over the seeds that finished.",
            "",
        ]
        rows, rho_rows = [], []
        for norm, runs in report["long"].items():
            r1s, maps = [], []
            cells = []
            for seed, r in runs.items():
                if "targets" in r:
                    t = next(iter(r["targets"].values()))
                    r1s.append(100 * t["rank1"])
                    maps.append(100 * t["mAP"])
                    cells.append(f"seed {seed}: {100 * t['rank1']:.1f} / {100 * t['mAP']:.1f} ({r.get('iterations')} it)")
                else:
                    cells.append(f"seed {seed}: {r['status']}")
                if r.get("rho_groups"):
                    rho_rows.append([norm, seed] + [f"{v:.3f}" for v in r["rho_groups"].values()])
            mean = f"{np.mean(r1s):.1f} ± {np.std(r1s):.1f} / {np.mean(maps):.1f} ± {np.std(maps):.1f}" if r1s else "-"
            rows.append([norm, "; ".join(cells), mean])
        lines += [_table(["norm", "R-1 / mAP per seed", "mean R-1 / mAP"], rows), ""]
        if rho_rows:
            groups = next(r["rho_groups"] for runs in report["long"].values() for r in runs.values() if r.get("rho_groups"))
            lines += ["Mean rho per layer group at the end:", "", _table(["norm", "seed", *groups], rho_rows), ""]
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
