import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The mode is fixed when triton is
# first imported, so set it before any test imports it (torch.compile may).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn

import metabin_layers


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update({"torch": torch, "nn": nn})
    doctest_namespace.update({name: getattr(metabin_layers, name) for name in metabin_layers.__all__})
