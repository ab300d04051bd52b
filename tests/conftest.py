"""Shared by every test: tiny models on a shared 2-core machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny models gain nothing from two, and the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def compare_workspace(tmp_path_factory):
    """A scratch directory where ``bash examples/compare.sh`` ran at toy size (runs/compare/{dense, ...}): one
    run of the script for its own test and for the README's plot commands."""
    from readme_blocks import run_example_script

    root = tmp_path_factory.mktemp("readme")
    return root, run_example_script("compare.sh", root)
