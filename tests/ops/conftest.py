"""Shared by the Triton op tests: the interpreter switch and NaN-poisoned fresh buffers."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def interpret(monkeypatch):
    """Without CUDA, run this test's kernels under Triton's interpreter (``TRITON_INTERPRET=1`` for the test
    only; the op modules decorate their kernels at first use in that mode); with CUDA they run compiled."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


class _PoisonTorch:
    """Stands in for ``torch`` inside an op module: every fresh float buffer starts as NaN, so a kernel that
    leaves any element unwritten fails the comparison."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poison_buffers(monkeypatch):
    """``poison_buffers(module)``: ``module``'s ``torch.empty`` / ``empty_like`` return NaN-filled buffers for
    the rest of the test."""
    def poison(module) -> None:
        monkeypatch.setattr(module, "torch", _PoisonTorch())
    return poison
