"""Optional Triton kernels.

Nothing here imports Triton until a kernel is used, so the CPU and plain-PyTorch paths never
need it. ``from metabin_layers.kernels import TritonBIN`` (or ``triton_bin_forward``,
``triton_bin_backward``, ``plan``, ``Plan``) imports ``metabin_layers.kernels.triton_bin``;
``is_available``, ``triton_importable`` and ``cuda_validated`` do not.

``backend="auto"`` picks the compiled kernels on CUDA only once they have passed the library's
CUDA tests (``pytest -m gpu``) for this release: ``CUDA_VALIDATION`` records that run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Optional

__all__ = [
    "CUDA_VALIDATION",
    "cuda_validated",
    "is_available",
    "triton_importable",
    "TritonBIN",
    "triton_bin_forward",
    "triton_bin_backward",
    "plan",
    "Plan",
]

_LAZY = {"TritonBIN", "triton_bin_forward", "triton_bin_backward", "plan", "Plan"}
_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
_triton_ok: Optional[bool] = None

#: The run of the CUDA tests (``pytest -m gpu``) that validated the compiled kernels, or None.
#: A dict ``{"version": library version, "date": "YYYY-MM-DD", "gpu": name, "torch": .., "triton": ..}``;
#: ``backend="auto"`` uses the kernels on CUDA only while ``version`` is this library's version,
#: so each release needs its own passing run. None: ``auto`` keeps the fused path on CUDA. The
#: four-launch kernels of this release have not yet had that run.
CUDA_VALIDATION: Optional[dict[str, str]] = None


def cuda_validated() -> bool:
    """Whether ``CUDA_VALIDATION`` holds a passing CUDA run for this library version.

    Examples:
        >>> cuda_validated() == (CUDA_VALIDATION is not None and CUDA_VALIDATION["version"] == __version__)
        True
    """
    record = CUDA_VALIDATION
    if not record:
        return False
    from .. import __version__

    return record.get("version") == __version__


def triton_importable() -> bool:
    """True when ``import triton`` succeeds (checked once)."""
    global _triton_ok
    if _triton_ok is None:
        if importlib.util.find_spec("triton") is None:
            _triton_ok = False
        else:
            try:
                importlib.import_module("triton.language")
                _triton_ok = True
            except Exception:  # broken install, missing driver libraries, ...
                _triton_ok = False
    return _triton_ok


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpreter_active() -> bool:
    """Whether Triton runs (or, once imported, will run) in interpreter mode.

    Triton decides at import time: ``triton.language`` wraps its own library functions
    (``tl.zeros``, ``tl.sum``, ...) as interpreted or compiled functions according to
    ``TRITON_INTERPRET`` then. Once it is imported, that is the truth; before, the variable is.
    """
    lang = sys.modules.get("triton.language")
    if lang is None:
        return _env_interpret()
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(lang, "zeros", None), JITFunction)


def is_available(x: Any = None) -> bool:
    """Whether the Triton BIN kernels can run on ``x``.

    True when Triton imports and ``x`` is a CUDA tensor (compiled kernels) or Triton's
    interpreter is on (``TRITON_INTERPRET=1`` set before Triton is imported; CPU tensors too),
    and ``x`` has shape ``(N, C, *spatial)`` in fp16 / bf16 / fp32 / fp64. With ``x=None`` only
    Triton itself is checked.
    """
    if x is not None:
        if x.dim() < 3 or str(x.dtype).rpartition(".")[2] not in _SUPPORTED_DTYPES:
            return False
        if not (x.is_cuda or _interpreter_active()):
            return False
    return triton_importable() and (x is None or x.is_cuda or _interpreter_active())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = importlib.import_module(".triton_bin", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
