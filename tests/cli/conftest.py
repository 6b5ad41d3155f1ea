"""The checkpoints the mergekit configuration tests merge: a base and two experts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.merging import helpers as H
from umtam_jax import checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    rng = np.random.default_rng(3)
    base, experts = H.random_experts(rng, 2, dtype=np.float32)
    paths = {"base": str(root / "base"), "a": str(root / "a"), "b": str(root / "b")}
    checkpoint.save_checkpoint(paths["base"], base)
    for name, expert in zip("ab", experts, strict=True):
        checkpoint.save_checkpoint(paths[name], expert)
    return {"paths": paths, "base": base, "experts": experts}
