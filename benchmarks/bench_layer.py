"""Layer benchmark: MetaBIN2d (every available backend) against nn.BatchNorm2d, nn.InstanceNorm2d,
the naive composition ``rho * BN(x) + (1 - rho) * IN(x)`` and a raw copy, at ResNet-50 layer shapes.

    python benchmarks/bench_layer.py                       # CPU, batch 8, ResNet-50 shapes
    python benchmarks/bench_layer.py --batch 64            # the batch of the targets (slow on 2 cores)
    python benchmarks/bench_layer.py --device cuda --dtypes float32,bfloat16
    python benchmarks/bench_layer.py --json benchmarks/results/layer.json

All candidates run in training mode in one process, interleaved, after warm-up; medians are
reported, with ratios against nn.BatchNorm2d measured in the same run. See benchmarks/README.md
for the byte accounting behind the GB/s and %-of-copy columns.
"""

from __future__ import annotations

import argparse
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
STAT = "median"

from metabin_layers import MetaBIN2d  # noqa: E402
from metabin_layers.functional import BACKENDS  # noqa: E402

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
}

# Minimal memory traffic of a BatchNorm-type layer in units of T = one full tensor
# (N*C*H*W elements of the input dtype): forward reads x twice (statistics, normalisation) and
# writes y; backward reads (dy, x) for the reductions and again for dx, and writes dx.
BYTES_FACTOR = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
COPY_FACTOR = 2  # y.copy_(x): one read and one write

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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


class CompiledNaiveBIN(NaiveBIN):
    """NaiveBIN whose forward is ``torch.compile(naive_mix)``; one compiled function per process
    and setting, shared by every layer shape (``dynamic=True``) or specialised per shape."""

    _compiled: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}

    def __init__(self, c: int, mode: str, backend: str, rho: float = 0.5):
        super().__init__(c, rho)
        key = (mode, backend)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(naive_mix, dynamic=mode == "dynamic", backend=backend)
        self.fn = self._compiled[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, inorm = self.bn, self.inorm
        return self.fn(x, self.rho, bn.weight, bn.bias, bn.running_mean, bn.running_var, inorm.weight, inorm.bias)


def metabin_backends(device: torch.device) -> list[str]:
    """The backends of functional.BACKENDS that run on ``device`` (a tiny smoke call decides)."""
    out = []
    for b in BACKENDS:
        try:
            m = MetaBIN2d(4, rho_init=0.5, backend=b).to(device)
            x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
            m(x).sum().backward()
            out.append(b)
        except Exception:  # noqa: BLE001  (a backend that does not support this device)
            continue
    return out


COMPILED_NAIVE = "naive BN+IN mix (torch.compile)"


def build_candidates(
    c: int, device: torch.device, backends: list[str], compile_naive: str = "off", compile_backend: str = "inductor"
) -> dict[str, Optional[nn.Module]]:
    cands: dict[str, Optional[nn.Module]] = {}
    for b in backends:
        cands[f"MetaBIN2d[{b}]"] = MetaBIN2d(c, rho_init=0.5, backend=b)
    cands["BatchNorm2d"] = nn.BatchNorm2d(c)
    cands["InstanceNorm2d(affine)"] = nn.InstanceNorm2d(c, affine=True)
    cands["naive BN+IN mix"] = NaiveBIN(c)
    if compile_naive != "off":
        cands[COMPILED_NAIVE] = CompiledNaiveBIN(c, compile_naive, compile_backend)
    cands["copy (floor)"] = None
    for m in cands.values():
        if m is not None:
            m.to(device).train()
    return cands


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


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    global STAT
    STAT = args.stat
    device = torch.device(args.device)
    common.set_threads(args.threads)
    torch.manual_seed(0)
    backends = metabin_backends(device)
    env = common.environment(device)
    shapes = SHAPES[args.shapes]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    results: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for label, c, h, w in shapes:
            x = torch.randn(args.batch, c, h, w, device=device).mul_(1.5).add_(0.3)
            x = x.to(dtype=dtype).contiguous(memory_format=fmt)
            dy = torch.randn_like(x)
            cands = build_candidates(c, device, backends, args.compile_naive, args.compile_backend)
            measures = {name: make_measure(m, x, dy) for name, m in cands.items()}
            compile_s = None
            if COMPILED_NAIVE in cands:  # first call = tracing + compilation (+ one run), timed apart
                compile_s = sum(measures[COMPILED_NAIVE]().values())
            stats = common.interleaved(measures, repeats=args.repeats, warmup=args.warmup)
            t_bytes = x.numel() * x.element_size()
            for name, st in stats.items():
                row: dict[str, Any] = {
                    "dtype": dname,
                    "shape": label,
                    "size": [args.batch, c, h, w],
                    "candidate": name,
                    "tensor_bytes": t_bytes,
                }
                for metric, s in st.items():
                    row[metric] = s
                if name == COMPILED_NAIVE:
                    row["first_call_s"] = compile_s
                results.append(row)
            if args.verbose:
                fb = {n: st.get("fwd+bwd", st["fwd"])[STAT] for n, st in stats.items()}
                print(
                    f"[bench_layer] {dname} {label}: " + ", ".join(f"{n} {v * 1e3:.3f}ms" for n, v in fb.items()),
                    file=sys.stderr,
                    flush=True,
                )
    payload = {
        "benchmark": "layer",
        "env": env,
        "config": {
            "batch": args.batch,
            "shapes": args.shapes,
            "stat": args.stat,
            "dtypes": dtypes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "channels_last": args.channels_last,
            "backends": backends,
            "compile_naive": args.compile_naive,
            "compile_backend": args.compile_backend,
            "bytes_factor": BYTES_FACTOR,
            "copy_factor": COPY_FACTOR,
        },
        "results": results,
    }
    payload["summary"] = summarize(results, backends)
    return render(payload), payload


def _find(results, dtype, shape, cand):
    for r in results:
        if r["dtype"] == dtype and r["shape"] == shape and r["candidate"] == cand:
            return r
    return None


def summarize(results: list[dict[str, Any]], backends: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    dtypes = sorted({r["dtype"] for r in results}, key=lambda d: list(DTYPES).index(d))
    for dname in dtypes:
        shapes = list(dict.fromkeys(r["shape"] for r in results if r["dtype"] == dname))
        per_cand: dict[str, Any] = {}
        for cand in dict.fromkeys(r["candidate"] for r in results if r["dtype"] == dname):
            if cand == "copy (floor)":
                continue
            ratios_bn, ratios_naive, total, total_bn = [], [], 0.0, 0.0
            worst = (0.0, None)
            for shape in shapes:
                r = _find(results, dname, shape, cand)
                bn = _find(results, dname, shape, "BatchNorm2d")
                nv = _find(results, dname, shape, "naive BN+IN mix")
                t = r["fwd+bwd"][STAT]
                q = t / bn["fwd+bwd"][STAT]
                ratios_bn.append(q)
                ratios_naive.append(nv["fwd+bwd"][STAT] / t)
                total += t
                total_bn += bn["fwd+bwd"][STAT]
                if q > worst[0]:
                    worst = (q, shape)
            per_cand[cand] = {
                "geomean_ratio_vs_bn": common.geomean(ratios_bn),
                "worst_ratio_vs_bn": worst[0],
                "worst_shape": worst[1],
                "total_ratio_vs_bn": total / total_bn,
                "min_speedup_vs_naive": min(ratios_naive),
                "geomean_speedup_vs_naive": common.geomean(ratios_naive),
            }
        summary[dname] = per_cand
    return summary


def cuda_targets(payload: dict[str, Any], dname: str) -> list[dict[str, Any]]:
    """The CUDA layer targets, per MetaBIN backend, at every shape of ``dname``:
    fwd+bwd <= 1.10x BatchNorm2d; >= 70% of the copy bandwidth for the minimal traffic;
    >= 3x faster than the naive mix; faster than ``torch.compile`` of the naive mix."""
    results = payload["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in results if r["dtype"] == dname))
    out = []
    for cand in dict.fromkeys(r["candidate"] for r in results if r["dtype"] == dname):
        if not cand.startswith("MetaBIN2d["):
            continue
        vs_bn, pct_copy, vs_naive, vs_compiled = [], [], [], []
        for shape in shapes:
            r = _find(results, dname, shape, cand)
            t = r["fwd+bwd"][STAT]
            vs_bn.append((t / _find(results, dname, shape, "BatchNorm2d")["fwd+bwd"][STAT], shape))
            cp = _find(results, dname, shape, "copy (floor)")
            rate = BYTES_FACTOR["fwd+bwd"] * r["tensor_bytes"] / t
            pct_copy.append((rate / (COPY_FACTOR * cp["tensor_bytes"] / cp["fwd"][STAT]), shape))
            vs_naive.append((_find(results, dname, shape, "naive BN+IN mix")["fwd+bwd"][STAT] / t, shape))
            comp = _find(results, dname, shape, COMPILED_NAIVE)
            if comp is not None:
                vs_compiled.append((comp["fwd+bwd"][STAT] / t, shape))
        worst_bn, worst_copy, worst_naive = max(vs_bn), min(pct_copy), min(vs_naive)
        out.append(
            {"candidate": cand, "target": "fwd+bwd <= 1.10x BatchNorm2d at every shape", "met": worst_bn[0] <= 1.10,
             "figure": f"worst {worst_bn[0]:.2f}x, {worst_bn[1]}"}
        )  # fmt: skip
        out.append(
            {"candidate": cand, "target": ">= 70% of the copy bandwidth (8T per fwd+bwd)", "met": worst_copy[0] >= 0.70,
             "figure": f"worst {100 * worst_copy[0]:.0f}%, {worst_copy[1]}"}
        )  # fmt: skip
        out.append(
            {"candidate": cand, "target": ">= 3x faster than the naive mix", "met": worst_naive[0] >= 3.0,
             "figure": f"worst {worst_naive[0]:.2f}x, {worst_naive[1]}"}
        )  # fmt: skip
        if vs_compiled:
            worst = min(vs_compiled)
            out.append(
                {"candidate": cand, "target": "faster than torch.compile of the naive mix", "met": worst[0] > 1.0,
                 "figure": f"worst {worst[0]:.2f}x, {worst[1]}"}
            )  # fmt: skip
    return out


def render(payload: dict[str, Any]) -> str:
    cfg, env, results = payload["config"], payload["env"], payload["results"]
    lines = [
        f"### Layer benchmark: batch {cfg['batch']}, {cfg['shapes']} shapes"
        + (", channels_last" if cfg["channels_last"] else "")
        + f", {cfg['repeats']} interleaved repeats ({cfg.get('stat', 'median')})",
        "",
        f"Machine: {common.describe(env)}.",
    ]
    if env["device"] == "cpu" and cfg["batch"] < 64:
        lines.append(
            f"CPU run at batch {cfg['batch']} (the targets are stated for batch 64; pass `--batch 64` for them): "
            "the tensors are 8x smaller, so per-call overhead weighs more than at batch 64."
        )
    lines += [
        "Training mode (batch statistics, running-stat update), input requires grad. Times in ms. "
        "`xBN`: time / nn.BatchNorm2d time in the same run. GB/s counts the minimal traffic of a BN-type "
        "layer (fwd 3T, bwd 5T, fwd+bwd 8T; T = one tensor), `%copy`: that rate over the `y.copy_(x)` rate "
        "(2T per copy).",
        "",
    ]
    headers = [
        "shape (C@HxW)",
        "candidate",
        "fwd",
        "bwd",
        "fwd+bwd",
        "xBN fwd+bwd",
        "xBN fwd",
        "xBN bwd",
        "GB/s fwd+bwd",
        "%copy",
    ]
    for dname in cfg["dtypes"]:
        rows = []
        shapes = list(dict.fromkeys(r["shape"] for r in results if r["dtype"] == dname))
        for shape in shapes:
            bn = _find(results, dname, shape, "BatchNorm2d")
            cp = _find(results, dname, shape, "copy (floor)")
            copy_rate = COPY_FACTOR * cp["tensor_bytes"] / cp["fwd"][STAT]
            for k, r in enumerate(x for x in results if x["dtype"] == dname and x["shape"] == shape):
                label = shape if k == 0 else ""
                if r["candidate"] == "copy (floor)":
                    rows.append(
                        [
                            label,
                            r["candidate"],
                            common.ms(r["fwd"][STAT]),
                            "-",
                            "-",
                            "-",
                            "-",
                            "-",
                            f"{copy_rate / 1e9:.1f}",
                            "100%",
                        ]
                    )
                    continue
                fb = r["fwd+bwd"][STAT]
                rate = BYTES_FACTOR["fwd+bwd"] * r["tensor_bytes"] / fb
                rows.append(
                    [
                        label,
                        r["candidate"],
                        common.ms(r["fwd"][STAT]),
                        common.ms(r["bwd"][STAT]),
                        common.ms(fb),
                        common.ratio(fb, bn["fwd+bwd"][STAT]),
                        common.ratio(r["fwd"][STAT], bn["fwd"][STAT]),
                        common.ratio(r["bwd"][STAT], bn["bwd"][STAT]),
                        f"{rate / 1e9:.1f}",
                        f"{100 * rate / copy_rate:.0f}%",
                    ]
                )
        lines += [f"#### {dname}", "", common.md_table(headers, rows, "llrrrrrrrr"), ""]
        srows = []
        for cand, s in payload["summary"][dname].items():
            srows.append(
                [
                    cand,
                    f"{s['geomean_ratio_vs_bn']:.2f}x",
                    f"{s['worst_ratio_vs_bn']:.2f}x ({s['worst_shape']})",
                    f"{s['total_ratio_vs_bn']:.2f}x",
                    f"{s['geomean_speedup_vs_naive']:.2f}x",
                    f"{s['min_speedup_vs_naive']:.2f}x",
                ]
            )
        lines += [
            common.md_table(
                [
                    "candidate",
                    "fwd+bwd / BN (geomean)",
                    "worst shape / BN",
                    "sum over shapes / BN",
                    "speed-up over naive (geomean)",
                    "speed-up over naive (worst shape)",
                ],
                srows,
                "lrrrrr",
            ),
            "",
        ]
        compiled = [r for r in results if r["dtype"] == dname and r["candidate"] == COMPILED_NAIVE]
        if compiled:
            first = [r["first_call_s"] for r in compiled if r.get("first_call_s") is not None]
            lines += [
                f"`{COMPILED_NAIVE}`: `torch.compile(naive_mix, dynamic={cfg['compile_naive'] == 'dynamic'}, "
                f"backend={cfg['compile_backend']!r})`; compilation is excluded from its times: its first calls "
                f"(tracing, compiling, one run; forward, backward, then both) took {sum(first):.1f} s in all "
                f"for this dtype (largest {max(first):.1f} s).",
                "",
            ]
        if env["device"] == "cuda":
            for t in cuda_targets(payload, dname):
                lines.append(f"- {t['candidate']}: {t['target']}: **{'met' if t['met'] else 'not met'}** ({t['figure']})")
            lines.append("")
        fused = payload["summary"][dname].get("MetaBIN2d[fused]")
        if fused and env["device"] != "cuda":
            ok1 = fused["worst_ratio_vs_bn"] <= 1.5
            ok2 = fused["min_speedup_vs_naive"] >= 2.5
            lines += [
                f"Targets ({dname}, MetaBIN2d[fused]): fwd+bwd <= 1.5x BatchNorm2d at every shape: "
                f"**{'met' if ok1 else 'not met'}** (worst {fused['worst_ratio_vs_bn']:.2f}x, {fused['worst_shape']}); "
                f">= 2.5x faster than the naive composition at every shape: **{'met' if ok2 else 'not met'}** "
                f"(worst {fused['min_speedup_vs_naive']:.2f}x).",
                "",
            ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--shapes", default="resnet50", choices=sorted(SHAPES))
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 15 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    p.add_argument(
        "--stat",
        default="median",
        choices=["median", "min"],
        help="statistic of the repeats shown in the tables (default median; min on a noisy machine)",
    )
    p.add_argument(
        "--compile-naive",
        default="off",
        choices=["off", "dynamic", "static"],
        help="add torch.compile of the naive mix: one dynamic-shape compilation, or one per shape",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile-naive")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p


def main(argv: Optional[list[str]] = None) -> tuple[str, dict[str, Any]]:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.batch is None:
        args.batch = 64 if args.device == "cuda" else 8
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 15
    text, payload = run(args)
    if args.json:
        common.write_json(args.json, payload)
    return text, payload


if __name__ == "__main__":
    print(main()[0])
