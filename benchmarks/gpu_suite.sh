#!/usr/bin/env bash
# The CUDA suite (correctness tests, layer and iteration benchmarks, recipe smoke run) on one GPU.
#
#   benchmarks/gpu_suite.sh OUTDIR              # on a CUDA machine; every table goes to OUTDIR
#   benchmarks/gpu_suite.sh OUTDIR --dry-run    # CPU, tiny settings: checks the plumbing
#
# Needs python3 with torch, Triton and timm; no network. The package is used from this checkout
# (PYTHONPATH), or install it first: python3 -m pip install --no-deps --no-build-isolation -e .
# Options after OUTDIR go to benchmarks/gpu_suite.py (--help lists them).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUTDIR [--dry-run] [--budget-s S] [--skip pytest,layer,iteration,train] [--overwrite]" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_suite.py" "$@"
