import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The mode is fixed when triton is
# first imported, so set it before any test imports it (torch.compile may).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
