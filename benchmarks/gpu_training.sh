#!/usr/bin/env bash
# Training runs on one GPU through metabin-reid train: AMP and torch.compile speed runs at the
# paper's sizes, and a long-run BN / BIN / BIN-half / MetaBIN comparison on the synthetic data.
#
#   benchmarks/gpu_training.sh OUTDIR              # on a CUDA machine (about 8 minutes); tables go to OUTDIR
#   benchmarks/gpu_training.sh OUTDIR --dry-run    # CPU, tiny settings: checks the plumbing
#
# Needs python3 with torch, Triton and timm; no network. The package is used from this checkout
# (PYTHONPATH), or install it first: python3 -m pip install --no-deps --no-build-isolation -e .
# Options after OUTDIR go to benchmarks/gpu_training.py (--help lists them).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUTDIR [--dry-run] [--budget-s S] [--seeds 0,1,2] [--jobs N] [--skip speed,long] [--overwrite]" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_training.py" "$@"
