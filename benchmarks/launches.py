"""Kernel launches per layer call, counted without a GPU: ATen ops plus Triton launches.

Every ATen op that is not a view (views, ``detach`` included, only relabel memory) is at most one
kernel launch on CUDA, and every Triton launch is one; allocations (``empty*``) launch nothing
but are counted too, and shown apart. On the CPU the Triton kernels run in Triton's
interpreter, whose own torch calls are not counted.

    python benchmarks/launches.py                    # MetaBIN2d(64) on (8, 64, 16, 8), every backend
    python benchmarks/launches.py --device cuda      # the same with compiled kernels
    python benchmarks/launches.py --json counts.json

``LaunchCounter`` is the counter (the iteration benchmark counts its phases with it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import metabin_layers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402

from metabin_layers import MetaBIN2d  # noqa: E402

BN = "BatchNorm2d"
SHAPE = (8, 64, 16, 8)
ALLOCATIONS = ("aten.empty", "aten.empty_like", "aten.new_empty", "aten.empty_strided")


class LaunchCounter(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched inside the block (``ops``, by name) and the Triton
    kernels launched (``triton``, by kernel name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.triton: collections.Counter[str] = collections.Counter()
        self._paused = 0
        self._undo: list[Callable[[], None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()

    @property
    def aten(self) -> int:
        return sum(self.ops.values())

    @property
    def allocations(self) -> int:
        return sum(v for k, v in self.ops.items() if any(k == a or k.startswith(a + ".") for a in ALLOCATIONS))

    @property
    def launches(self) -> int:
        return sum(self.triton.values())

    def _patch_triton(self) -> None:
        if "triton" not in sys.modules:
            return
        classes = []
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        counter = self
        for cls in classes:
            original = cls.run

            def run(fn, *args, _original=original, **kwargs):
                if kwargs.get("warmup"):
                    return _original(fn, *args, **kwargs)
                name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "kernel")
                counter.triton[name] += 1
                counter._paused += 1  # the interpreter's own torch calls are not kernel launches
                try:
                    return _original(fn, *args, **kwargs)
                finally:
                    counter._paused -= 1

            cls.run = run
            self._undo.append(lambda cls=cls, original=original: setattr(cls, "run", original))


def count_fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """Launches of one forward and one backward of ``module`` (after a warm-up call), with the
    parameter gradients unset before, as ``zero_grad()`` leaves them (no accumulation)."""
    module(x.detach().requires_grad_()).backward(dy)  # first call: lazy set-up, compilation
    module.zero_grad(set_to_none=True)
    xx = x.detach().requires_grad_()
    with LaunchCounter() as fwd:
        y = module(xx)
    with LaunchCounter() as bwd:
        y.backward(dy)
    out: dict[str, Any] = {}
    for phase, c in (("fwd", fwd), ("bwd", bwd)):
        out[phase] = {"aten": c.aten, "allocations": c.allocations, "triton": c.launches, "ops": dict(c.ops)}
    out["total"] = out["fwd"]["aten"] + out["fwd"]["triton"] + out["bwd"]["aten"] + out["bwd"]["triton"]
    return out


def _naive(c: int) -> nn.Module:
    from bench_layer import NaiveBIN

    return NaiveBIN(c)


def candidates(c: int, device: torch.device) -> dict[str, Optional[Callable[[], nn.Module]]]:
    """Name -> module factory; None where the candidate cannot run here (Triton without CUDA or
    its interpreter)."""
    from metabin_layers import kernels

    out: dict[str, Optional[Callable[[], nn.Module]]] = {BN: lambda: nn.BatchNorm2d(c), "naive BN+IN mix": lambda: _naive(c)}
    for backend in ("fused", "composite", "triton"):
        ok = backend != "triton" or kernels.is_available(torch.empty(1, 1, 1, device=device))
        out[f"MetaBIN2d[{backend}]"] = (lambda b=backend: MetaBIN2d(c, rho_init=0.5, backend=b)) if ok else None
    return out


def layer_counts(device: str = "cpu", shape: tuple[int, ...] = SHAPE) -> dict[str, Any]:
    """Per candidate, the launches of one fwd+bwd in training mode on an input of ``shape``."""
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(shape, device=dev)
    dy = torch.randn_like(x)
    rows: dict[str, Any] = {}
    for name, make in candidates(shape[1], dev).items():
        if make is None:
            rows[name] = {"status": "unavailable: Triton needs CUDA or TRITON_INTERPRET=1"}
            continue
        rows[name] = {"status": "ok", **count_fwd_bwd(make().to(dev).train(), x, dy)}
    return {"device": device, "shape": list(shape), "rows": rows}


def render(counts: dict[str, Any]) -> str:
    shape = "x".join(map(str, counts["shape"]))
    rows = counts["rows"]
    bn = rows[BN]["total"]
    lines = [
        f"### Kernel launches per fwd+bwd: MetaBIN2d({counts['shape'][1]}) on a ({shape}) input, training mode",
        "",
        "ATen ops (views excluded; each at most one CUDA kernel launch; the allocations among them launch "
        "none) plus Triton launches, counted on "
        + ("the GPU." if counts["device"] == "cuda" else "the CPU (Triton's interpreter runs the kernels).")
        + " `xBN`: total / nn.BatchNorm2d's total.",
        "",
        "| candidate | fwd ATen (alloc) | fwd Triton | bwd ATen (alloc) | bwd Triton | total | xBN |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} | | | | | |")
            continue
        f, b = r["fwd"], r["bwd"]
        lines.append(
            f"| {name} | {f['aten']} ({f['allocations']}) | {f['triton']} | {b['aten']} ({b['allocations']}) | "
            f"{b['triton']} | {r['total']} | {r['total'] / bn:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> tuple[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="x".join(map(str, SHAPE)), help="N x C x H x W (default %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the counts as JSON")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        assert len(shape) == 4 and min(shape) > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"--shape: expected N x C x H x W of positive ints, got {args.shape!r}") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    counts = layer_counts(args.device, shape)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1)
    return render(counts), counts


if __name__ == "__main__":
    print(main()[0])
