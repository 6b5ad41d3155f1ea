"""Fixtures shared by the optimizer's tests."""

from __future__ import annotations

import pytest

from tests.optimizer.platforms import take_default_branches


@pytest.fixture(params=["cpu", "gpu_tpu"])
def code_path(request, monkeypatch):
    """Runs a test on the CPU code of the step and on its GPU/TPU code, forced here: the
    conditional-free orthonormalisation, the one-pass overflow-safe sums and the full
    ``‖W‖`` read of ε_t instead of CPU's conditionals."""
    if request.param == "gpu_tpu":
        take_default_branches(monkeypatch)
    return request.param
