#!/usr/bin/env bash
# The declared torch floor (pyproject.toml: torch>=2.13) on the torch 2.13.0 CPU wheel, in a
# virtual environment of its own: the tests of the layers, the functional API, the optimizer, the
# losses, the episode helpers, the samplers and the synchronised layers (2 gloo processes).
# torchvision 0.28 (CUDA build) cannot load its operators next to the CPU wheel, so the tests that
# need timm / torchvision (converter zoo, export, recipe) and the doctests run on the pinned torch
# only. About 1.5 minutes on 2 CPU cores (venv and installs ~35 s, tests ~60 s).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OLDER_TORCH_VENV:-/tmp/metabin-older-torch}"
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0" numpy pyyaml tqdm pillow pytest
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
OMP_NUM_THREADS=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
    -k "not recipe_sets_a_process_group_timeout" \
    tests/test_layers.py tests/test_functional.py tests/test_optim.py tests/test_losses.py \
    tests/test_episode.py tests/test_reid_sampler.py tests/test_distributed.py
