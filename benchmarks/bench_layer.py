"""Layer benchmark: MetaBIN2d (every backend) against nn.BatchNorm2d, nn.InstanceNorm2d, the naive
composition ``rho * BN(x) + (1 - rho) * IN(x)``, its ``torch.compile`` and a raw copy, at ResNet-50
layer shapes and batches 8, 32 and 64.

    python benchmarks/bench_layer.py                        # CPU, batches 8, 32, 64, ResNet-50 shapes
    python benchmarks/bench_layer.py --batch 64 --threads 1
    python benchmarks/bench_layer.py --device cuda --dtypes float32,bfloat16
    python benchmarks/bench_layer.py --shapes small --batch 8 --compile-naive off   # a quick look

All candidates run in training mode in one process, interleaved, after warm-up; medians are
reported, with ratios against nn.BatchNorm2d (``xBN``) and against the compiled naive mix
(``xcompiled``) measured in the same run. A candidate that cannot run keeps its row, which says
why. Tables and JSON go to ``--output`` (default benchmarks/out/, untracked). See
benchmarks/README.md for the byte accounting behind the GB/s and %-of-copy columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import metabin_layers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

#: which statistic of the repeats the tables use (``--stat``): "median" or "min"
STAT = common.STAT

from metabin_layers import MetaBIN2d  # noqa: E402

# (name, C, H, W) for a 256x128 input; ResNet-50 with last stride 1 (MetaBIN's setting) keeps
# layer4 at 16x8, last stride 2 halves it to 8x4.
SHAPES = {
    "resnet50": [
        ("layer1 64@64x32", 64, 64, 32),
        ("layer1 256@64x32", 256, 64, 32),
        ("layer2 128@32x16", 128, 32, 16),
        ("layer2 512@32x16", 512, 32, 16),
        ("layer3 256@16x8", 256, 16, 8),
        ("layer3 1024@16x8", 1024, 16, 8),
        ("layer4 512@16x8 (last stride 1)", 512, 16, 8),
        ("layer4 512@8x4 (last stride 2)", 512, 8, 4),
        ("layer4 2048@16x8", 2048, 16, 8),
    ],
    "small": [
        ("64@16x8", 64, 16, 8),
        ("256@8x4", 256, 8, 4),
        ("128@32x16", 128, 32, 16),
    ],
    # the fixed per-call cost: at 1x2 the passes over the tensor cost next to nothing
    "overhead": [("512@1x2 (per-call cost)", 512, 1, 2), ("layer4 512@8x4 (last stride 2)", 512, 8, 4)],
    # for tests: one map small enough that every candidate (and its compilation) is quick
    "tiny": [("16@4x4", 16, 4, 4)],
    "layer1": [("layer1 64@64x32", 64, 64, 32), ("layer1 256@64x32", 256, 64, 32)],  # the bandwidth target
}

# Minimal memory traffic of a BatchNorm-type layer in units of T = one full tensor
# (N*C*H*W elements of the input dtype): forward reads x twice (statistics, normalisation) and
# writes y; backward reads (dy, x) for the reductions and again for dx, and writes dx.
BYTES_FACTOR = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
COPY_FACTOR = 2  # y.copy_(x): one read and one write

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

BN = "BatchNorm2d"
NAIVE = "naive BN+IN mix"
COMPILED_NAIVE = "naive BN+IN mix (torch.compile)"
#: MetaBIN2d inside torch.compile: what a user who compiles a converted model gets (under graph
#: capture the layer hands the compiler its composite ops)
COMPILED_LAYER = "MetaBIN2d (torch.compile)"
COMPILED = (COMPILED_LAYER, COMPILED_NAIVE)
COPY = "copy (floor)"
FUSED = "MetaBIN2d[fused]"

# The targets of the fused layer on CPU, per batch, at every shape (fwd+bwd).
CPU_TARGET_VS_BN = 1.00  # at or below nn.BatchNorm2d
CPU_TARGET_VS_COMPILED = 0.80  # at least 1.25x faster than the compiled naive mix


class NaiveBIN(nn.Module):
    """The authors' composition: a BN module and an IN module side by side, mixed by rho."""

    def __init__(self, c: int, rho: float = 0.5):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.inorm = nn.InstanceNorm2d(c, affine=True)
        self.rho = nn.Parameter(torch.full((c,), rho))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rho.view(1, -1, 1, 1)
        bn, inorm = self.bn(x), self.inorm(x)
        return r.to(bn.dtype) * bn + (1 - r).to(inorm.dtype) * inorm


def naive_mix(
    x: torch.Tensor,
    rho: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    in_weight: torch.Tensor,
    in_bias: torch.Tensor,
) -> torch.Tensor:
    """The naive composition as one function (what ``torch.compile`` gets to fuse)."""
    bn = torch.nn.functional.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, True, 0.1, 1e-5)
    inorm = torch.nn.functional.instance_norm(x, weight=in_weight, bias=in_bias, eps=1e-5)
    r = rho.view(1, -1, 1, 1)
    return r.to(bn.dtype) * bn + (1 - r).to(inorm.dtype) * inorm


def compile_naive_mix(mode: str, backend: str) -> Callable[..., torch.Tensor]:
    """``torch.compile(naive_mix)`` in torch's default mode; ``dynamic`` asks for dynamic shapes."""
    return torch.compile(naive_mix, backend=backend, dynamic=True if mode == "dynamic" else None)


class CompiledNaiveBIN(NaiveBIN):
    """NaiveBIN whose forward is a compiled ``naive_mix`` (see :func:`compile_naive_mix`)."""

    def __init__(self, c: int, fn: Callable[..., torch.Tensor], rho: float = 0.5):
        super().__init__(c, rho)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, inorm = self.bn, self.inorm
        return self.fn(x, self.rho, bn.weight, bn.bias, bn.running_mean, bn.running_var, inorm.weight, inorm.bias)


def backend_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why a MetaBIN backend cannot run on ``device`` at all (None: it is tried at every shape).

    The Triton backend is timed only as compiled GPU kernels: on the CPU it would run in Triton's
    interpreter, whose times mean nothing.
    """
    if backend == "triton":
        if device.type != "cuda":
            return "unavailable: no CUDA"
        if importlib.util.find_spec("triton") is None:
            return "unavailable: Triton is not installed"
    return None


def build_candidates(
    c: int,
    device: torch.device,
    backends: list[str],
    compiled_fn: Optional[Callable[[], Callable[..., torch.Tensor]]] = None,
    compile_layer: Optional[Callable[[nn.Module], nn.Module]] = None,
) -> tuple[dict[str, Optional[nn.Module]], dict[str, str]]:
    """The candidates at ``c`` channels, in table order, and the status of those that cannot run.

    ``compiled_fn`` returns the compiled naive mix and ``compile_layer`` compiles a module (None:
    no such row). Returns ``({name: module, or None for the copy}, {name: "unavailable: ..." |
    "failed: ..."})``.
    """
    makers: dict[str, Callable[[], Optional[nn.Module]]] = {}
    for b in backends:
        makers[f"MetaBIN2d[{b}]"] = lambda b=b: MetaBIN2d(c, rho_init=0.5, backend=b)
    if compile_layer is not None:
        makers[COMPILED_LAYER] = lambda: compile_layer(MetaBIN2d(c, rho_init=0.5))
    makers[BN] = lambda: nn.BatchNorm2d(c)
    makers["InstanceNorm2d(affine)"] = lambda: nn.InstanceNorm2d(c, affine=True)
    makers[NAIVE] = lambda: NaiveBIN(c)
    if compiled_fn is not None:
        makers[COMPILED_NAIVE] = lambda: CompiledNaiveBIN(c, compiled_fn())
    makers[COPY] = lambda: None
    cands: dict[str, Optional[nn.Module]] = {}
    status: dict[str, str] = {}
    for name, make in makers.items():
        why = backend_unavailable(name[len("MetaBIN2d[") : -1], device) if name.startswith("MetaBIN2d[") else None
        if why is not None:
            status[name] = why
            continue
        try:
            m = make()
        except Exception as e:  # noqa: BLE001  (reported in the candidate's row)
            status[name] = "failed: " + common.short_reason(e)
            continue
        cands[name] = m if m is None else m.to(device).train()
    return cands, status


def make_measure(module: Optional[nn.Module], x: torch.Tensor, dy: torch.Tensor) -> Callable[[], dict[str, float]]:
    dev = x.device
    if module is None:
        out = torch.empty_like(x)
        return lambda: {"fwd": common.timed(lambda: out.copy_(x), dev)}

    def run() -> dict[str, float]:
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        t_fb = common.timed(lambda: module(xx).backward(dy), dev)
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        holder: list[torch.Tensor] = []
        t_f = common.timed(lambda: holder.append(module(xx)), dev)
        t_b = common.timed(lambda: holder[0].backward(dy), dev)
        return {"fwd": t_f, "bwd": t_b, "fwd+bwd": t_fb}

    return run


def measure_shape(
    args: argparse.Namespace, dtype: torch.dtype, batch: int, c: int, h: int, w: int
) -> tuple[list[str], dict[str, dict[str, Any]], int]:
    """Every candidate at one (dtype, batch, shape): ``(names in table order, {name: row fields}, T bytes)``."""
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, c, h, w, device=device).mul_(1.5).add_(0.3)
    x = x.to(dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    compiled_fn = compile_layer = None
    if args.compile_naive == "static":
        # a fresh compilation per shape, as compiling a model at a fixed input size gives (and no
        # recompilation limit is reached over the shapes)
        torch._dynamo.reset()
        compiled_fn = lambda: compile_naive_mix("static", args.compile_backend)  # noqa: E731
    elif args.compile_naive == "dynamic":
        compiled_fn = lambda: args._dynamic_fn  # noqa: E731
    if compiled_fn is not None and args.compile_layer == "on":
        dynamic = True if args.compile_naive == "dynamic" else None
        compile_layer = lambda m: torch.compile(m, backend=args.compile_backend, dynamic=dynamic)  # noqa: E731
    cands, status = build_candidates(c, device, args.backends, compiled_fn, compile_layer)
    names = list(dict.fromkeys([*cands, *status]))
    order = [n for n in _table_order(args.backends, compiled_fn is not None, compile_layer is not None) if n in names]
    measures = {name: make_measure(m, x, dy) for name, m in cands.items()}
    # first call of each: lazy set-up and, for the compiled mix, tracing and compilation
    first, failed = common.first_calls(measures)
    status.update(failed)
    ran = {n: measures[n] for n in measures if n not in failed}
    stats = common.interleaved(ran, args.repeats, max(args.warmup - 1, 0))  # the first call was one warm-up
    rows: dict[str, dict[str, Any]] = {}
    for name in order:
        row: dict[str, Any] = {"status": status.get(name, "ok")}
        row.update(stats.get(name, {}))
        if name in COMPILED and name in first:
            row["first_call_s"] = first[name]
        rows[name] = row
    return order, rows, x.numel() * x.element_size()


def _table_order(backends: list[str], compiled: bool, compiled_layer: bool) -> list[str]:
    names = [f"MetaBIN2d[{b}]" for b in backends] + ([COMPILED_LAYER] if compiled_layer else [])
    names += [BN, "InstanceNorm2d(affine)", NAIVE]
    return names + ([COMPILED_NAIVE] if compiled else []) + [COPY]


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Measure every (dtype, batch, shape) of ``args``; returns the Markdown tables and the JSON payload."""
    global STAT
    STAT = args.stat
    device = torch.device(args.device)
    common.set_threads(args.threads)
    torch.manual_seed(0)
    env = common.environment(device)
    if args.compile_naive == "dynamic":
        args._dynamic_fn = compile_naive_mix("dynamic", args.compile_backend)
    results: list[dict[str, Any]] = []
    for dname in args.dtypes:
        for batch in args.batch:
            for label, c, h, w in SHAPES[args.shapes]:
                order, rows, t_bytes = measure_shape(args, DTYPES[dname], batch, c, h, w)
                for name in order:
                    results.append(
                        {"dtype": dname, "batch": batch, "shape": label, "size": [batch, c, h, w], "candidate": name,
                         "tensor_bytes": t_bytes, **rows[name]}
                    )  # fmt: skip
                if args.verbose:
                    fb = [
                        f"{n} {r['fwd+bwd' if 'fwd+bwd' in r else 'fwd'][STAT] * 1e3:.3f}ms"
                        for n, r in rows.items()
                        if r["status"] == "ok"
                    ]
                    print(f"[bench_layer] {dname} batch {batch} {label}: " + ", ".join(fb), file=sys.stderr, flush=True)
    payload = {
        "benchmark": "layer",
        "env": env,
        "config": {
            "batch": args.batch,
            "shapes": args.shapes,
            "stat": args.stat,
            "dtypes": args.dtypes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "channels_last": args.channels_last,
            "backends": args.backends,
            "compile_naive": args.compile_naive,
            "compile_layer": args.compile_layer,
            "compile_backend": args.compile_backend,
            "bytes_factor": BYTES_FACTOR,
            "copy_factor": COPY_FACTOR,
        },
        "results": results,
    }
    payload["summary"] = summarize(results)
    if not getattr(args, "no_launches", False):
        payload["launches"] = launch_counts(device)
    return render(payload), payload


def launch_counts(device: torch.device) -> dict[str, Any]:
    """Kernel launches per fwd+bwd of every candidate (``launches.py``). On the CPU in a fresh
    process, where Triton's interpreter runs the kernels (``TRITON_INTERPRET`` is read when Triton
    is imported); on CUDA here, with the compiled kernels."""
    import launches

    if device.type == "cuda":
        return launches.layer_counts("cuda")
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launches.py")
        subprocess.run([sys.executable, script, "--json", out], check=True, env=env, capture_output=True, timeout=600)
        with open(out) as f:
            return json.load(f)


# -- summaries ----------------------------------------------------------------------------------


def _find(results: list[dict[str, Any]], dtype: str, batch: int, shape: str, cand: str) -> Optional[dict[str, Any]]:
    for r in results:
        if r["dtype"] == dtype and r.get("batch") == batch and r["shape"] == shape and r["candidate"] == cand:
            return r
    return None


def _time(row: Optional[dict[str, Any]], metric: str = "fwd+bwd") -> Optional[float]:
    """The ``metric`` time of a row that ran, else None."""
    if row is None or row.get("status", "ok") != "ok" or metric not in row:
        return None
    return row[metric][STAT]


def _groups(results: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["dtype"], r["batch"]) for r in results))


def _shapes(results: list[dict[str, Any]], dtype: str, batch: int) -> list[str]:
    return list(dict.fromkeys(r["shape"] for r in results if r["dtype"] == dtype and r["batch"] == batch))


def _candidates(results: list[dict[str, Any]], dtype: str, batch: int) -> list[str]:
    return list(dict.fromkeys(r["candidate"] for r in results if r["dtype"] == dtype and r["batch"] == batch))


def _worst(pairs: list[tuple[float, str]], largest: bool = True) -> tuple[Optional[float], Optional[str]]:
    if not pairs:
        return None, None
    return max(pairs) if largest else min(pairs)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dtype and batch, per candidate, fwd+bwd ratios over the shapes where both ran:
    ``{dtype: {batch: {candidate: {...}}}}`` (batch as a string key, for JSON)."""
    summary: dict[str, Any] = {}
    for dname, batch in _groups(results):
        shapes = _shapes(results, dname, batch)
        per_cand: dict[str, Any] = {}
        for cand in _candidates(results, dname, batch):
            if cand == COPY:
                continue
            vs: dict[str, list[tuple[float, str]]] = {BN: [], NAIVE: [], COMPILED_NAIVE: []}
            total, total_bn, ran = 0.0, 0.0, 0
            for shape in shapes:
                t = _time(_find(results, dname, batch, shape, cand))
                if t is None:
                    continue
                ran += 1
                for base in vs:
                    tb = _time(_find(results, dname, batch, shape, base))
                    if tb:
                        vs[base].append((t / tb, shape))
                tbn = _time(_find(results, dname, batch, shape, BN))
                if tbn:
                    total += t
                    total_bn += tbn
            worst_bn, worst_bn_shape = _worst(vs[BN])
            worst_comp, worst_comp_shape = _worst(vs[COMPILED_NAIVE])
            worst_naive, _ = _worst(vs[NAIVE])
            per_cand[cand] = {
                "shapes_run": ran,
                "shapes": len(shapes),
                "geomean_ratio_vs_bn": common.geomean(q for q, _ in vs[BN]) if vs[BN] else None,
                "worst_ratio_vs_bn": worst_bn,
                "worst_shape": worst_bn_shape,
                "total_ratio_vs_bn": total / total_bn if total_bn else None,
                "geomean_ratio_vs_naive": common.geomean(q for q, _ in vs[NAIVE]) if vs[NAIVE] else None,
                "worst_ratio_vs_naive": worst_naive,
                "geomean_ratio_vs_compiled": common.geomean(q for q, _ in vs[COMPILED_NAIVE]) if vs[COMPILED_NAIVE] else None,
                "worst_ratio_vs_compiled": worst_comp,
                "worst_shape_vs_compiled": worst_comp_shape,
            }
        summary.setdefault(dname, {})[str(batch)] = per_cand
    return summary


def cuda_targets(payload: dict[str, Any], dname: str) -> list[dict[str, Any]]:
    """The CUDA layer targets, per MetaBIN backend, at every shape and batch of ``dname``:
    fwd+bwd <= 1.3x BatchNorm2d; >= 1.5x faster than ``torch.compile`` of the naive mix; faster
    than the naive mix; at batch 256 on the layer1 shapes, >= 60% of the copy bandwidth for the
    minimal traffic."""
    results = payload["results"]
    out = []
    cands = dict.fromkeys(r["candidate"] for r in results if r["dtype"] == dname and r["candidate"].startswith("MetaBIN2d["))
    for cand in cands:
        vs_bn, pct_copy, vs_naive, vs_compiled = [], [], [], []
        for d, batch in _groups(results):
            if d != dname:
                continue
            for shape in _shapes(results, dname, batch):
                where = f"batch {batch} {shape}"
                r = _find(results, dname, batch, shape, cand)
                t = _time(r)
                if t is None or r is None:
                    continue
                tb = _time(_find(results, dname, batch, shape, BN))
                if tb:
                    vs_bn.append((t / tb, where))
                cp = _find(results, dname, batch, shape, COPY)
                tc = _time(cp, "fwd")
                if tc and cp is not None:
                    rate = BYTES_FACTOR["fwd+bwd"] * r["tensor_bytes"] / t
                    pct_copy.append((rate / (COPY_FACTOR * cp["tensor_bytes"] / tc), where))
                tn = _time(_find(results, dname, batch, shape, NAIVE))
                if tn:
                    vs_naive.append((tn / t, where))
                tcomp = _time(_find(results, dname, batch, shape, COMPILED_NAIVE))
                if tcomp:
                    vs_compiled.append((tcomp / t, where))
        if not vs_bn:
            continue
        worst_bn = max(vs_bn)
        out.append(
            {"candidate": cand, "target": "fwd+bwd <= 1.3x BatchNorm2d at every shape", "met": worst_bn[0] <= 1.3,
             "figure": f"worst {worst_bn[0]:.2f}x, {worst_bn[1]}"}
        )  # fmt: skip
        big = [(v, w) for v, w in pct_copy if w.startswith("batch 256 layer1")]
        if big:  # the bandwidth target is for large, memory-bound problems
            worst_copy = min(big)
            out.append(
                {"candidate": cand, "target": ">= 60% of the copy bandwidth (8T per fwd+bwd), batch 256 layer1",
                 "met": worst_copy[0] >= 0.60, "figure": f"worst {100 * worst_copy[0]:.0f}%, {worst_copy[1]}"}
            )  # fmt: skip
        if vs_naive:
            worst = min(vs_naive)
            out.append(
                {"candidate": cand, "target": "faster than the naive mix", "met": worst[0] > 1.0,
                 "figure": f"worst {worst[0]:.2f}x, {worst[1]}"}
            )  # fmt: skip
        if vs_compiled:
            worst = min(vs_compiled)
            out.append(
                {"candidate": cand, "target": ">= 1.5x faster than torch.compile of the naive mix", "met": worst[0] >= 1.5,
                 "figure": f"worst {worst[0]:.2f}x, {worst[1]}"}
            )  # fmt: skip
    return out


# -- tables -------------------------------------------------------------------------------------

HEADERS = [
    "shape (C@HxW)",
    "candidate",
    "fwd",
    "bwd",
    "fwd+bwd",
    "xBN fwd+bwd",
    "xcompiled fwd+bwd",
    "xBN fwd",
    "xBN bwd",
    "GB/s fwd+bwd",
    "%copy",
]


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _shape_rows(results: list[dict[str, Any]], dname: str, batch: int, shape: str) -> list[list[str]]:
    bn = _find(results, dname, batch, shape, BN)
    comp = _find(results, dname, batch, shape, COMPILED_NAIVE)
    cp = _find(results, dname, batch, shape, COPY)
    t_copy = _time(cp, "fwd")
    copy_rate = COPY_FACTOR * cp["tensor_bytes"] / t_copy if cp is not None and t_copy else None
    rows = []
    group = [r for r in results if r["dtype"] == dname and r["batch"] == batch and r["shape"] == shape]
    for k, r in enumerate(group):
        cells = [shape if k == 0 else "", r["candidate"]]
        if r.get("status", "ok") != "ok":
            rows.append(cells + [r["status"]] + ["-"] * (len(HEADERS) - 3))
            continue
        if r["candidate"] == COPY:
            rate = f"{copy_rate / 1e9:.1f}" if copy_rate else "-"
            rows.append(cells + [common.ms(r["fwd"][STAT])] + ["-"] * 6 + [rate, "100%"])
            continue
        fb = r["fwd+bwd"][STAT]
        rate = BYTES_FACTOR["fwd+bwd"] * r["tensor_bytes"] / fb
        rows.append(
            cells
            + [
                common.ms(r["fwd"][STAT]),
                common.ms(r["bwd"][STAT]),
                common.ms(fb),
                common.ratio(fb, _time(bn)),
                common.ratio(fb, _time(comp)),
                common.ratio(r["fwd"][STAT], _time(bn, "fwd")),
                common.ratio(r["bwd"][STAT], _time(bn, "bwd")),
                f"{rate / 1e9:.1f}",
                f"{100 * rate / copy_rate:.0f}%" if copy_rate else "-",
            ]
        )
    return rows


def _met(value: Optional[float], limit: float) -> str:
    return "-" if value is None else ("met" if value <= limit else "**not met**")


def render(payload: dict[str, Any]) -> str:
    global STAT
    cfg, env, results = payload["config"], payload["env"], payload["results"]
    STAT = cfg.get("stat", common.STAT)
    batches = ", ".join(str(b) for b in cfg["batch"])
    lines = [
        f"### Layer benchmark: {cfg['shapes']} shapes, batch {batches}"
        + (", channels_last" if cfg["channels_last"] else "")
        + f", {cfg['repeats']} interleaved repeats ({STAT})",
        "",
        f"Machine: {common.describe(env)}.",
        "Training mode (batch statistics, running-stat update), input requires grad. Times in ms. "
        "`xBN`: time / nn.BatchNorm2d time, `xcompiled`: time / time of `torch.compile` of the naive mix, "
        "both measured in the same run (below 1: faster). GB/s counts the minimal traffic of a BN-type "
        "layer (fwd 3T, bwd 5T, fwd+bwd 8T; T = one tensor), `%copy`: that rate over the `y.copy_(x)` rate "
        "(2T per copy). A candidate that could not run says why in its row.",
        "",
    ]
    for dname, batch in _groups(results):
        rows = []
        for shape in _shapes(results, dname, batch):
            rows += _shape_rows(results, dname, batch, shape)
        lines += [f"#### {dname}, batch {batch}", "", common.md_table(HEADERS, rows, "ll" + "r" * (len(HEADERS) - 2)), ""]
        srows = []
        for cand, s in payload["summary"][dname][str(batch)].items():
            if s["shapes_run"] == 0:
                continue
            worst_bn = f"{_x(s['worst_ratio_vs_bn'])} ({s['worst_shape']})" if s["worst_shape"] else "-"
            worst_comp = (
                f"{_x(s['worst_ratio_vs_compiled'])} ({s['worst_shape_vs_compiled']})" if s["worst_shape_vs_compiled"] else "-"
            )
            srows.append(
                [
                    cand,
                    _x(s["geomean_ratio_vs_bn"]),
                    worst_bn,
                    _x(s["total_ratio_vs_bn"]),
                    _x(s["geomean_ratio_vs_naive"]),
                    _x(s["geomean_ratio_vs_compiled"]),
                    worst_comp,
                ]
            )
        headers = ["candidate", "xBN (geomean)", "xBN (worst shape)", "xBN (sum over shapes)", "xnaive (geomean)"]
        headers += ["xcompiled (geomean)", "xcompiled (worst shape)"]
        lines += [common.md_table(headers, srows, "lrrrrrr"), ""]
        for cname, what in ((COMPILED_LAYER, "torch.compile(MetaBIN2d)"), (COMPILED_NAIVE, "torch.compile(naive_mix)")):
            rows_c = [r for r in results if r["dtype"] == dname and r["batch"] == batch and r["candidate"] == cname]
            first = [r["first_call_s"] for r in rows_c if r.get("first_call_s") is not None]
            if first:
                lines += [
                    f"`{cname}`: `{what}` (default mode, backend {cfg['compile_backend']!r}, "
                    + ("one compilation per shape" if cfg["compile_naive"] == "static" else "dynamic shapes")
                    + f"); not in its times: its first calls (tracing, compilation, one run) took {sum(first):.1f} s "
                    f"in all (largest {max(first):.1f} s).",
                    "",
                ]
        if env["device"] == "cuda":
            for t in cuda_targets({"results": [r for r in results if r["batch"] == batch]}, dname):
                lines.append(f"- {t['candidate']}: {t['target']}: **{'met' if t['met'] else 'not met'}** ({t['figure']})")
            lines.append("")
    if payload.get("launches"):
        import launches

        lines += [launches.render(payload["launches"]).replace("### ", "#### ", 1), ""]
    if env["device"] != "cuda":
        lines += _fused_summary(payload)
    return "\n".join(lines)


def _fused_summary(payload: dict[str, Any]) -> list[str]:
    """MetaBIN2d[fused] at every batch, with the CPU targets: fwd+bwd at or below nn.BatchNorm2d
    and at least 1.25x faster than the compiled naive mix, at every shape."""
    rows = []
    for dname, per_batch in payload["summary"].items():
        for batch, per_cand in per_batch.items():
            s = per_cand.get(FUSED)
            if not s or s["shapes_run"] == 0:
                continue
            wb, wc = s["worst_ratio_vs_bn"], s["worst_ratio_vs_compiled"]
            rows.append(
                [
                    dname,
                    batch,
                    _x(s["geomean_ratio_vs_bn"]),
                    f"{_x(wb)} ({s['worst_shape']})" if wb is not None else "-",
                    _met(wb, CPU_TARGET_VS_BN),
                    _x(s["geomean_ratio_vs_compiled"]),
                    f"{_x(wc)} ({s['worst_shape_vs_compiled']})" if wc is not None else "-",
                    _met(wc, CPU_TARGET_VS_COMPILED),
                ]
            )
    if not rows:
        return []
    headers = ["dtype", "batch", "xBN (geomean)", "xBN (worst shape)", "<= 1.00x BN at every shape"]
    headers += ["xcompiled (geomean)", "xcompiled (worst shape)", "<= 0.80x compiled at every shape"]
    return [
        f"#### {FUSED} at every batch",
        "",
        "fwd+bwd; targets: at or below nn.BatchNorm2d, and at least 1.25x faster than the compiled naive mix "
        "(`xcompiled` <= 0.80), at every shape.",
        "",
        common.md_table(headers, rows, "lrrrlrrl"),
        "",
    ]


# -- command line -------------------------------------------------------------------------------


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    """The layer options (run_all.py offers the same ones, with the same defaults)."""
    default_batches = ",".join(map(str, common.LAYER_BATCHES))
    p.add_argument(
        "--batch", type=common.int_list, default=list(common.LAYER_BATCHES), help=f"batch sizes (default: {default_batches})"
    )
    p.add_argument("--shapes", default=common.LAYER_SHAPES, choices=sorted(SHAPES), help="default: %(default)s")
    p.add_argument(
        "--dtypes",
        default=",".join(common.LAYER_DTYPES),
        help="comma-separated: float32,bfloat16,float16,float64 (default: %(default)s)",
    )
    p.add_argument(
        "--backends",
        default=",".join(common.LAYER_BACKENDS),
        help="MetaBIN2d backends, one row each (default: %(default)s)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    p.add_argument("--no-launches", action="store_true", help="skip the kernel-launch count table (launches.py)")
    p.add_argument(
        "--compile-naive",
        default=common.COMPILE_NAIVE,
        choices=["static", "dynamic", "off"],
        help="the torch.compile rows (the naive mix, and MetaBIN2d inside torch.compile): compiled per "
        "shape (static), with dynamic shapes, or no such rows (default: %(default)s)",
    )
    p.add_argument(
        "--compile-layer",
        default=common.COMPILE_LAYER,
        choices=["on", "off"],
        help="include MetaBIN2d inside torch.compile among the torch.compile rows (default: %(default)s)",
    )
    p.add_argument(
        "--compile-backend", default=common.COMPILE_BACKEND, help="torch.compile backend of those rows (default: %(default)s)"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(p, "layer")
    add_layer_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the options and fill in the device-dependent defaults."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.repeats is None:
        args.repeats = common.REPEATS["layer"][args.device]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if isinstance(args.dtypes, str) else args.dtypes
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        raise SystemExit(f"--dtypes: expected some of {', '.join(DTYPES)}, got {','.join(args.dtypes)!r}")
    if isinstance(args.backends, str):
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def main(argv: Optional[list[str]] = None) -> tuple[str, dict[str, Any]]:
    args = finish_args(parser().parse_args(argv))
    text, payload = run(args)
    common.write_text(os.path.join(args.output, "layer.md"), text)
    common.write_json(os.path.join(args.output, "layer.json"), payload)
    if args.json:
        common.write_json(args.json, payload)
    return text, payload


if __name__ == "__main__":
    print(main()[0])
