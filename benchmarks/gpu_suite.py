"""The CUDA suite: correctness tests, layer and iteration benchmarks and a recipe smoke run on one
GPU, every table written to an output folder. ``benchmarks/gpu_suite.sh OUTDIR`` runs it.

    benchmarks/gpu_suite.sh results/h100            # on a CUDA machine (about 5-7 minutes on an H100)
    benchmarks/gpu_suite.sh /tmp/dry --dry-run      # CPU, tiny settings: checks the plumbing only

Steps (each a subprocess with its own time limit; a failing step is recorded and the next runs):

1. ``pytest -m gpu tests``: every backend against float64 references on CUDA (tests/test_cuda.py,
   tests/test_triton_kernels.py); ``pytest_gpu.txt``, ``pytest_gpu.xml``. When it passes,
   ``cuda_validation.json`` holds the record for ``metabin_layers.kernels.CUDA_VALIDATION``.
2. layer benchmark (bench_layer.py) at the ResNet-50 shapes, batch 64, fp32 and bf16, NCHW and
   channels_last, with ``torch.compile`` of the naive mix: ``layer_nchw.md``, ``layer_channels_last.md``.
3. iteration benchmark (bench_iteration.py): ResNet-50 at 256x128, batch 80, AMP bf16, plain /
   authors' structure / ours, eager (per phase, launches, peak memory) and in one CUDA graph:
   ``iteration.md``; the three compiled (``torch.compile``): ``iteration_compiled.md``; ours
   again with the Triton backend: ``iteration_triton.md``.
4. ``metabin-reid train --quick`` on CUDA: ``train_quick.log`` and ``train_quick/``.

``summary.md`` / ``summary.json``: status and time of each step and every target (met / not met).
Without CUDA (and without ``--dry-run``) it exits at once with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Suite:
    def __init__(self, out: str, budget_s: float, dry_run: bool):
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.t0 = time.perf_counter()
        self.steps: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, cmd: list[str], log: str, limit_s: float, env: Optional[dict] = None) -> bool:
        """Run ``cmd`` (cwd = repository root), stdout + stderr into ``log``; record the outcome."""
        limit = min(limit_s, max(0.0, self.left()))
        step: dict[str, Any] = {"step": name, "command": " ".join(cmd), "log": os.path.basename(log)}
        if limit < 5:
            step.update(status="skipped (time budget spent)", seconds=0.0)
            self.steps.append(step)
            print(f"[gpu_suite] {name}: skipped, time budget spent", flush=True)
            return False
        print(f"[gpu_suite] {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        with open(log, "w") as f:
            try:
                run_env = env or _python_env()
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit, env=run_env).returncode
                status = "passed" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"failed (time limit {limit:.0f} s)"
        step.update(status=status, seconds=round(time.perf_counter() - t, 1))
        self.steps.append(step)
        print(f"[gpu_suite] {name}: {status} in {step['seconds']} s", flush=True)
        return status == "passed"


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable ({type(e).__name__})"
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        env["timm"] = "unavailable"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    import metabin_layers

    env["metabin_layers"] = metabin_layers.__version__
    return env


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: check that every step runs")
    p.add_argument("--budget-s", type=float, default=420.0, help="total time; later steps are skipped past it (default 420)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: pytest,layer,iteration,train")
    args = p.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_suite: CUDA is not available (torch.cuda.is_available() is False): this suite needs an NVIDIA GPU. "
            "Use --dry-run for a CPU smoke run of the plumbing.",
            file=sys.stderr,
        )
        return 2
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        print(f"gpu_suite: {out} is not empty; choose a new folder or pass --overwrite", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    env = environment(device)
    with open(os.path.join(out, "environment.json"), "w") as f:
        json.dump(env, f, indent=1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    py = sys.executable
    suite = Suite(out, args.budget_s, args.dry_run)
    o = lambda name: os.path.join(out, name)  # noqa: E731

    # 1. correctness on CUDA
    pytest_ok = False
    if "pytest" not in skip and importlib.util.find_spec("pytest") is None:
        suite.steps.append(
            {"step": "pytest -m gpu", "command": "-", "log": "-", "seconds": 0.0,
             "status": "failed (pytest is not installed: pip install --no-index --find-links WHEEL_DIR pytest)"}
        )  # fmt: skip
    elif "pytest" not in skip:
        targets = ["tests/test_cuda.py"] if args.dry_run else ["tests"]
        cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs"]
        cmd += ["--junitxml", o("pytest_gpu.xml"), *targets]
        pytest_ok = suite.run("pytest -m gpu", cmd, o("pytest_gpu.txt"), 200)
        if pytest_ok and not args.dry_run:
            record = {
                "version": env["metabin_layers"],
                "date": env["date"][:10],
                "gpu": env["gpu"],
                "torch": env["torch"],
                "triton": env["triton"],
            }
            with open(o("cuda_validation.json"), "w") as f:
                json.dump(record, f, indent=1)

    # 2. layer benchmark
    if "layer" not in skip:
        if args.dry_run:
            base = ["--device", "cpu", "--shapes", "tiny", "--batch", "2", "--repeats", "2", "--warmup", "0"]
            base += ["--compile-naive", "dynamic", "--compile-backend", "eager"]
        else:
            base = ["--device", "cuda", "--batch", "64", "--repeats", "20", "--warmup", "3", "--compile-naive", "dynamic"]
        # MetaBIN2d inside torch.compile costs an Inductor compilation per shape and dtype: beyond
        # this step's time on the GPU machine, so only the naive mix is compiled there
        base += ["--compile-layer", "off"]
        for layout in ("nchw", "channels_last"):
            dtypes = ("float32" if layout == "nchw" else "bfloat16") if args.dry_run else "float32,bfloat16"
            cmd = [py, os.path.join(HERE, "bench_layer.py"), *base, "--dtypes", dtypes]
            cmd += ["--json", o(f"layer_{layout}.json"), "--verbose", "--output", o(f"raw/layer_{layout}")]
            cmd += ["--channels-last"] if layout == "channels_last" else []
            if args.dry_run and layout == "channels_last":
                cmd += ["--no-launches"]  # the dry run checks the launch table once (Triton's interpreter is slow)
            if suite.run(f"layer benchmark ({layout})", cmd, o(f"layer_{layout}.log"), 150):
                _markdown_from_log(o(f"layer_{layout}.log"), o(f"layer_{layout}.md"))
        # the bandwidth target: batch 256 on the layer1 shapes
        big = list(base)
        big[big.index("--batch") + 1] = "2" if args.dry_run else "256"
        cmd = [py, os.path.join(HERE, "bench_layer.py"), *big, "--shapes", "tiny" if args.dry_run else "layer1"]
        cmd += ["--dtypes", "float32" if args.dry_run else "float32,bfloat16", "--json", o("layer_batch256.json")]
        cmd += ["--output", o("raw/layer_batch256"), "--no-launches"]
        if suite.run("layer benchmark (batch 256, layer1)", cmd, o("layer_batch256.log"), 90):
            _markdown_from_log(o("layer_batch256.log"), o("layer_batch256.md"))

    # 3. iteration benchmark
    if "iteration" not in skip:
        if args.dry_run:
            # fp32: bf16 convolutions are slow on CPUs without bf16 units
            base = ["--device", "cpu", "--arch", "resnet18", "--batch", "40", "--height", "64", "--width", "32"]
            base += ["--ids-per-domain", "2", "--repeats", "1", "--warmup", "0", "--no-memory"]
        else:
            base = ["--device", "cuda", "--arch", "resnet50", "--batch", "80", "--height", "256", "--width", "128"]
            base += ["--repeats", "15", "--warmup", "3", "--amp", "--amp-dtype", "bfloat16"]
        configs = ["--configs", "a_plain,b_naive_split,c_ours_split"]
        cmd = [py, os.path.join(HERE, "bench_iteration.py"), *base, *configs, "--modes", "eager,graph"]
        cmd += ["--output", o("raw/iteration")]
        if suite.run("iteration benchmark", cmd + ["--json", o("iteration.json")], o("iteration.log"), 180):
            _markdown_from_log(o("iteration.log"), o("iteration.md"))
        # Compiled (inductor; on a CPU the compile would take minutes: not in a dry run)
        if not args.dry_run:
            cmd = [py, os.path.join(HERE, "bench_iteration.py"), *base, *configs, "--modes", "compile", "--no-launches"]
            cmd += ["--no-memory", "--json", o("iteration_compiled.json"), "--output", o("raw/iteration_compiled")]
            if suite.run("iteration benchmark (compiled)", cmd, o("iteration_compiled.log"), 300):
                _markdown_from_log(o("iteration_compiled.log"), o("iteration_compiled.md"))
        from metabin_layers import kernels

        # Ours with the Triton kernels (on CPU Triton's interpreter would take minutes: not in a dry run)
        if kernels.triton_importable() and not args.dry_run:
            cmd = [py, os.path.join(HERE, "bench_iteration.py"), *base, "--configs", "c_ours_split", "--backend", "triton"]
            cmd += ["--json", o("iteration_triton.json"), "--output", o("raw/iteration_triton")]
            if suite.run("iteration benchmark (triton)", cmd, o("iteration_triton.log"), 90):
                _markdown_from_log(o("iteration_triton.log"), o("iteration_triton.md"))

    # 4. the recipe end to end
    if "train" not in skip:
        cmd = [py, "-m", "metabin_layers.reid.cli", "train", "--quick", "--no-progress", "--output", o("train_quick")]
        cmd += ["--set", f"device={device}"] + (["max_iters=2", "syn_test_ids=4"] if args.dry_run else [])
        suite.run("metabin-reid train --quick", cmd, o("train_quick.log"), 120)

    summary = _summary(suite, env, out)
    with open(o("summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    failed = [s for s in suite.steps if s["status"] != "passed"]
    return 1 if failed else 0


def _markdown_from_log(log: str, md: str) -> None:
    """The tables a benchmark printed on stdout (from its first Markdown heading on)."""
    with open(log) as f:
        text = f.read()
    start = text.find("### ")
    with open(md, "w") as f:
        f.write(text[start:] if start >= 0 else text)


def _summary(suite: Suite, env: dict[str, Any], out: str) -> str:
    import bench_iteration
    import bench_layer
    import common

    where = env.get("gpu") or "CPU (dry run: tiny settings, numbers meaningless)"
    lines = [
        "# CUDA suite",
        "",
        f"{where}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, timm {env['timm']}, "
        f"metabin-layers {env['metabin_layers']}; {env['date']}. Total {time.perf_counter() - suite.t0:.0f} s.",
        "",
        common.md_table(
            ["step", "status", "seconds", "log"], [[s["step"], s["status"], s["seconds"], s["log"]] for s in suite.steps], "llrl"
        ),
        "",
    ]
    targets: list[dict[str, Any]] = []
    for layout in ("nchw", "channels_last", "batch256"):
        path = os.path.join(out, f"layer_{layout}.json")
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
            for dname in payload["config"]["dtypes"]:
                for t in bench_layer.cuda_targets(payload, dname):
                    targets.append(dict(t, scope=f"layer {dname} {layout}"))
    for name in ("iteration.json", "iteration_triton.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
            for t in bench_iteration.cuda_targets(payload):
                targets.append(dict(t, scope=f"iteration, backend {payload['config'].get('backend', 'auto')}", candidate="(c)"))
    if targets:
        rows = [[t["scope"], t["candidate"], t["target"], "met" if t["met"] else "**not met**", t["figure"]] for t in targets]
        lines += ["## Targets", "", common.md_table(["scope", "candidate", "target", "result", "figure"], rows, "lllll"), ""]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"env": env, "steps": suite.steps, "targets": targets}, f, indent=1, default=str)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
