"""One intra-op thread for the neuron tests: their tensors are tiny, and on shared 2-core machines a second
spinning OpenMP thread makes them several times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
