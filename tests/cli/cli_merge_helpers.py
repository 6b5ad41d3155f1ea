"""Shared by the ``umtam-merge`` end-to-end tests (``test_cli_merge_*.py``): the Orbax
checkpoints they merge, the tolerance of their comparisons and a configuration writer."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from tests.merging import helpers as H

# Out-of-core and in-memory merges in float32: equal dtypes, values up to rounding.
TOL = {"rtol": 1e-6, "atol": 1e-7}

checkpoint = pytest.importorskip("umtam_jax.checkpoint")


def save_ckpts(root):
    """A base, two experts with UMTAM statistics, one without, and two Fisher checkpoints,
    saved under ``root``: each module's module-scoped ``ckpts`` fixture."""
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, 3, dtype=np.float32)
    stats = H.random_statistics(rng, 2, dtype=np.float32)
    fishers = [H.random_params(rng, dtype=np.float32) for _ in range(2)]
    fishers = [jax.tree.map(np.abs, f) for f in fishers]
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i in range(2):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], experts[i], statistics=stats[i])
        paths[f"f{i}"] = str(root / f"f{i}")
        checkpoint.save_checkpoint(paths[f"f{i}"], fishers[i])
    paths["plain"] = str(root / "plain")
    checkpoint.save_checkpoint(paths["plain"], experts[2])
    return {"paths": paths, "base": base, "experts": experts, "stats": stats, "fishers": fishers}


def _write(tmp_path, text):
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)
