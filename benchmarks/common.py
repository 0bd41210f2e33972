"""Shared helpers of the benchmarks: timing, environment description, tables, peak memory.

Timing rules used everywhere:

* every candidate gets ``warmup`` untimed calls first;
* candidates are *interleaved*: repeat ``r`` runs candidate 1, 2, ..., k once each (the order is
  rotated every repeat), so slow drifts of the machine (other processes, frequency changes) hit
  every candidate alike;
* the reported value is the **median** over repeats (the minimum is kept too);
* on CUDA every timed region is measured with CUDA events recorded around it, after
  ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

# -- defaults shared by every entry point (bench_layer.py, bench_iteration.py, run_all.py) -------

HERE = os.path.dirname(os.path.abspath(__file__))
#: where runs write their tables and JSON unless told otherwise (untracked: listed in .gitignore)
OUTPUT_DIR = os.path.join(HERE, "out")
#: the committed results the docs cite; only ``run_all.py --update-results`` writes here
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_STEM = "latest"

#: torch.set_num_threads; None keeps torch's default (one thread per physical core)
THREADS: Optional[int] = None
STAT = "median"
#: interleaved repeats and untimed warm-up calls per candidate, by benchmark and device type
REPEATS = {"layer": {"cpu": 15, "cuda": 50}, "iteration": {"cpu": 7, "cuda": 20}}
WARMUP = {"layer": 3, "iteration": 2}

LAYER_BATCHES = (8, 32, 64)
LAYER_SHAPES = "resnet50"
LAYER_DTYPES = ("float32",)
#: every MetaBIN2d backend gets a row; one that cannot run says why instead of vanishing
LAYER_BACKENDS = ("fused", "composite", "triton")
#: the torch.compile rows (the naive mix, MetaBIN2d): "static" compiles each shape on its own (as
#: compiling a model at a fixed input size does), "dynamic" with dynamic shapes, "off" skips them
COMPILE_NAIVE = "static"
#: whether the torch.compile rows include MetaBIN2d inside torch.compile ("on") or only the naive mix
COMPILE_LAYER = "on"
COMPILE_BACKEND = "inductor"

#: the iteration benchmark's model and batch, by device type
ITERATION = {
    "cpu": {"arch": "resnet18", "batch": 40, "height": 64, "width": 32},
    "cuda": {"arch": "resnet50", "batch": 80, "height": 256, "width": 128},
}

#: ``run_all.py --quick``: a smoke run of both benchmarks (defaults of run_all's options; any
#: option given explicitly still wins)
QUICK: dict[str, Any] = {
    "shapes": "small",
    "batch": [8],
    "layer_repeats": 5,
    "layer_warmup": 1,
    "iteration_repeats": 2,
    "iteration_warmup": 1,
    "configs": "a_plain,b_naive_split,c_ours_split",
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _threads_help() -> str:
    return f"torch.set_num_threads (default: torch's own choice, {torch.get_num_threads()} here)"


def add_run_arguments(p: argparse.ArgumentParser, benchmark: Optional[str]) -> None:
    """The options every entry point shares: device, threads, statistic, repeats, output folder."""
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--threads", type=int, default=THREADS, help=_threads_help())
    p.add_argument(
        "--stat",
        default=STAT,
        choices=["median", "min"],
        help="statistic of the repeats shown in the tables (default %(default)s; min on a noisy machine)",
    )
    if benchmark is not None:
        reps, warm = REPEATS[benchmark], WARMUP[benchmark]
        p.add_argument(
            "--repeats",
            type=int,
            default=None,
            help=f"interleaved repeats (default: {reps['cpu']} on CPU, {reps['cuda']} on CUDA)",
        )
        p.add_argument(
            "--warmup",
            type=int,
            default=warm,
            help="untimed calls per candidate first; the first one also tells whether it runs (default: %(default)s)",
        )
    p.add_argument(
        "--output",
        default=OUTPUT_DIR,
        metavar="DIR",
        help="folder of the tables and JSON (default: benchmarks/out/, not tracked by git)",
    )


def int_list(text: str) -> list[int]:
    """``"8,32,64"`` -> ``[8, 32, 64]`` (argparse type of the ``--batch`` options)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def short_reason(exc: BaseException, limit: int = 90) -> str:
    """One line saying why a candidate could not run: the exception type and its first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- timing -------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds taken by one call of ``fn``: wall clock on CPU; on CUDA the time between two
    CUDA events recorded around it on the current stream (queue drained first)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Stats(dict):
    """``{"median": s, "min": s, "n": k}`` in seconds (a dict, so it serialises to JSON)."""

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        return cls(median=statistics.median(samples), min=min(samples), n=len(samples))


def first_calls(candidates: Mapping[str, Callable[[], Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """Call each candidate once, untimed by the tables (lazy initialisation, compilation).

    Returns the wall-clock seconds of that call for every candidate that ran, and
    ``"failed: <reason>"`` for every one that raised (it is then left out of the timing, and the
    tables show the reason in its row).
    """
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (any failure is reported, not raised)
            failed[name] = "failed: " + short_reason(e)
            continue
        seconds[name] = time.perf_counter() - t0
    return seconds, failed


def interleaved(
    candidates: Mapping[str, Callable[[], Mapping[str, float]]],
    repeats: int,
    warmup: int = 2,
) -> dict[str, dict[str, Stats]]:
    """Run each candidate ``warmup`` times, then ``repeats`` rounds in rotated order.

    Each candidate is a callable that runs one measurement and returns ``{metric: seconds}``
    (e.g. ``{"fwd": .., "bwd": .., "fwd+bwd": ..}``). Returns ``{candidate: {metric: Stats}}``.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for metric, sec in candidates[name]().items():
                samples[name].setdefault(metric, []).append(sec)
    return {n: {m: Stats.of(v) for m, v in samples[n].items()} for n in names}


# -- environment --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def describe(env: Mapping[str, Any]) -> str:
    """One line for table headers."""
    where = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    load = f", load avg {env['load_average_1min']}" if "load_average_1min" in env else ""
    return f"{where}; torch {env['torch']}; {env['date']}{load}"


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


# -- memory -------------------------------------------------------------------------------------


def read_vm_hwm_kib() -> Optional[int]:
    """Peak resident set size of this process (``VmHWM`` of /proc/self/status), KiB; None if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def read_vm_rss_kib() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_vm_hwm() -> bool:
    """Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_json_subprocess(args: Sequence[str], timeout: float = 600) -> dict[str, Any]:
    """Run ``python args...`` and parse the last stdout line as JSON (used for per-config memory)."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(__file__) or "."
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])


# -- tables -------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column (l, r, c)."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ms(seconds: Optional[float], digits: int = 3) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1e3:.{digits}f}"


def ratio(a: Optional[float], b: Optional[float], digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}x"


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def write_json(path: str, payload: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
