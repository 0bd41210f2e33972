"""Compile every Triton kernel variant the dispatcher can choose for NVIDIA GPUs, without a GPU,
and report registers, spills and occupancy: static compile data from Triton and ptxas.

    python benchmarks/kernel_registers.py                       # sm_80 and sm_90, Markdown table
    python benchmarks/kernel_registers.py --arch 90 --json regs.json
    python benchmarks/kernel_registers.py --check               # exit 1 if any variant spills

Variants: the four kernels of ``metabin_layers.kernels.triton_bin`` x input dtype (fp16, bf16,
fp32, fp64) x layout (NC*-contiguous, channels-last) x every ``(BLOCK_C, BLOCK_M, num_warps)``
of ``launch_configs`` x two integer specialisations (``C`` and ``M`` multiples of 16, as Triton
specialises them at run time, or not). Triton compiles each to PTX for ``GPUTarget("cuda",
arch, 32)``; Triton's bundled ``ptxas -v`` then reports registers per thread and spill bytes.
Occupancy is the resident warps per SM that the register file (64 K registers, allocated per
warp in units of 256), the 64-warp and 32-block limits and the shared memory allow, over 64.
"""

from __future__ import annotations

import os

# Compiled mode: Triton fixes interpreter or compiler mode when it is first imported.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import metabin_layers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
KINDS = ("fwd_stats", "fwd_apply", "bwd_sums", "bwd_apply")
# Argument types by name: tensors of the input dtype, the workspace (statistics dtype), the
# parameters and running statistics (fp32; fp64 in fp64 layers), the batch counter; the rest
# are fp32 scalars (FLOATS) or int32.
INPUT_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
PARAM_PTRS = {"rho_ptr", "w_b_ptr", "b_b_ptr", "w_i_ptr", "b_i_ptr", "rmean_ptr", "rvar_ptr", "grad_ptr"}
FLOATS = {"eps", "eps_lo", "momentum", "momentum_lo"}
ALIGNED_INTS = {"C", "M", "PER", "PER2", "sxn", "sxc", "sxm", "sdn", "sdc", "sdm"}  # divisible by 16 when "aligned"
# the unit stride of each layout, which Triton specialises to the constant 1 at run time
UNIT_STRIDES = {False: ("sxm", "sdm"), True: ("sxc", "sdc")}
SM = {80: {"shared": 164 * 1024}, 90: {"shared": 228 * 1024}}
REGS_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32


def ptxas_path() -> str:
    import triton.backends.nvidia as nv

    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found at {path} (set TRITON_PTXAS_PATH)")
    return path


def occupancy(regs: int, warps: int, shared: int, arch: int) -> float:
    """Resident warps per SM over 64 for a kernel of ``regs`` registers per thread."""
    warp_regs = max(256, -(-regs * 32 // 256) * 256)
    blocks = min(MAX_BLOCKS, MAX_WARPS // warps, (REGS_PER_SM // warp_regs) // warps)
    if shared:
        blocks = min(blocks, SM[arch]["shared"] // shared)
    return blocks * warps / MAX_WARPS


def _arg_type(name: str, dtype: str) -> str:
    acc = "fp64" if dtype == "float64" else "fp32"
    if name in INPUT_PTRS:
        return "*" + DTYPES[dtype]
    if name == "ws_ptr":
        return "*" + acc
    if name in PARAM_PTRS:
        return "*" + acc
    if name == "nbt_ptr":
        return "*i64"
    return "fp32" if name in FLOATS else "i32"


def compile_variant(kind: str, dtype: str, channels_last: bool, cfg: dict, flags: dict, aligned: bool, arch: int) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from metabin_layers.kernels import triton_bin as tb

    fn = tb.KERNELS[kind]
    blocks = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    consts: dict[str, Any] = {**flags, **blocks, "ACC": tl.float64 if dtype == "float64" else tl.float32}
    consts.update({name: 1 for name in UNIT_STRIDES[channels_last] if name in fn.arg_names})
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = _arg_type(name, dtype)
        if sig[name].startswith("*") or (aligned and name in ALIGNED_INTS):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg["num_warps"], **({"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {})},
    )
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu_name = target.group(1).rstrip(",") if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas_path(), "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = run.stdout + run.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))  # type: ignore[union-attr]
    spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))  # type: ignore[union-attr]
    spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))  # type: ignore[union-attr]
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))  # type: ignore[union-attr]
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    return {
        "kernel": kind,
        "dtype": dtype,
        "layout": "channels_last" if channels_last else "nchw",
        **blocks,
        "num_warps": cfg["num_warps"],
        "flags": ",".join(k for k, v in flags.items() if v) or "-",
        "aligned": aligned,
        "arch": gpu_name,
        "registers": regs,
        "spill_store_bytes": spill_st,
        "spill_load_bytes": spill_ld,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "occupancy": occupancy(regs, cfg["num_warps"], shared, arch),
    }


def _compile_one(variant: tuple) -> dict:
    return compile_variant(*variant)


def variants(kinds, dtypes, archs, all_flags: bool = False) -> list[tuple]:
    """Every tile the dispatcher can choose x dtype x layout x divisibility, with the heaviest
    constexpr flags; ``all_flags`` adds every flag combination at each kernel's first tile."""
    import torch

    from metabin_layers.kernels import triton_bin as tb

    out = []
    for arch in archs:
        for kind in kinds:
            flag_sets = tb.FLAG_VARIANTS[kind]
            for dtype in dtypes:
                for cl in (False, True):
                    for aligned in (True, False):
                        for cfg in tb.launch_configs(kind, cl, getattr(torch, dtype), aligned):
                            out.append((kind, dtype, cl, cfg, flag_sets[0], aligned, arch))
                    cfgs = tb.launch_configs(kind, cl, getattr(torch, dtype))
                    if all_flags:
                        out += [(kind, dtype, cl, cfgs[0], flags, True, arch) for flags in flag_sets[1:]]
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per (arch, kernel, dtype class): the register range, spills and the worst occupancy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["arch"], r["kernel"], "fp64" if r["dtype"] == "float64" else "fp16/bf16/fp32")
        groups.setdefault(key, []).append(r)
    out = []
    for (arch, kind, dclass), rs in groups.items():
        out.append(
            {
                "arch": arch,
                "kernel": kind,
                "dtypes": dclass,
                "variants": len(rs),
                "num_warps": sorted({r["num_warps"] for r in rs}),
                "registers_min": min(r["registers"] for r in rs),
                "registers_max": max(r["registers"] for r in rs),
                "spill_bytes": sum(r["spill_store_bytes"] + r["spill_load_bytes"] for r in rs),
                "occupancy_min": min(r["occupancy"] for r in rs),
                "occupancy_max": max(r["occupancy"] for r in rs),
            }
        )
    return out


def render(summary: list[dict], env: dict[str, Any]) -> str:
    lines = [
        f"Static compile data (no GPU): Triton {env['triton']}, `ptxas -v` {env['ptxas']}, {env['variants']} "
        f"variants compiled in {env['seconds']:.0f} s on {env['machine']}, {env['date']}.",
        "",
        "| arch | kernel | input dtypes | variants | warps | registers / thread | spills | occupancy |",
        "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        regs = str(s["registers_max"])
        if s["registers_min"] != s["registers_max"]:
            regs = f"{s['registers_min']}-{s['registers_max']}"
        occ = f"{100 * s['occupancy_min']:.0f}-{100 * s['occupancy_max']:.0f}%"
        if s["occupancy_min"] == s["occupancy_max"]:
            occ = f"{100 * s['occupancy_max']:.0f}%"
        warps = ",".join(map(str, s["num_warps"]))
        lines.append(
            f"| {s['arch']} | {s['kernel']} | {s['dtypes']} | {s['variants']} | {warps} | {regs} | {s['spill_bytes']} B | {occ} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--kernels", default=",".join(KINDS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--json", default=None, metavar="PATH", help="write every variant and the summary as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 if any variant spills registers")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per CPU core)")
    p.add_argument("--all-flags", action="store_true", help="also every constexpr flag combination (mode, affine, ...)")
    args = p.parse_args(argv)
    import datetime
    import platform

    import triton

    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    todo = variants(args.kernels.split(","), args.dtypes.split(","), archs, args.all_flags)
    t0 = time.perf_counter()
    # Each variant is one Triton compile plus one ptxas run: independent, so spread over the cores.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs or os.cpu_count() or 1) as pool:
        rows = list(pool.map(_compile_one, todo))
    seconds = time.perf_counter() - t0
    ptxas_version = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    env = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": ptxas_version[-1] if ptxas_version else "?",
        "machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU",
        "date": datetime.date.today().isoformat(),
        "variants": len(rows),
        "seconds": seconds,
    }
    summary = summarize(rows)
    print(render(summary, env))
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    for r in spilling:
        print(f"SPILL: {r}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "summary": summary, "variants": rows}, f, indent=1)
    return 1 if (args.check and spilling) else 0


if __name__ == "__main__":
    raise SystemExit(main())
