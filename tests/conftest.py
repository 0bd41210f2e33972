import pytest
import torch
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
