"""The checkpoints the out-of-core merging tests (``test_streaming_*.py``) merge, made once
per module by their ``ckpts`` fixture."""

from __future__ import annotations

import jax
import numpy as np

from tests.merging import helpers as H
from umtam_jax import checkpoint

K = 3


def _quantized(rng, base, scale):
    """Task vectors on a coarse grid: many equal magnitudes within and across leaves."""
    return jax.tree.map(
        lambda b: (b + scale * rng.integers(-2, 3, np.shape(b))).astype(np.float32), base
    )


def make_ckpts(tmp_path_factory):
    """A base and K experts (with statistics, one untracked), K Fisher trees and K
    experts on a coarse grid (``tied``), saved, and their restored trees."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, K, dtype=np.float32)
    stats = H.random_statistics(rng, K, dtype=np.float32)
    stats[1] = H.random_statistics(rng, 1, tracked=False, dtype=np.float32)[0]
    fishers = [jax.tree.map(np.abs, H.random_params(rng, dtype=np.float32)) for _ in range(K)]
    tied = [_quantized(rng, base, 0.5) for _ in range(K)]
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i in range(K):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], experts[i], statistics=stats[i])
        paths[f"f{i}"] = str(root / f"f{i}")
        checkpoint.save_checkpoint(paths[f"f{i}"], fishers[i])
        paths[f"t{i}"] = str(root / f"t{i}")
        checkpoint.save_checkpoint(paths[f"t{i}"], tied[i])
    # Restored exactly as the in-memory CLI path restores them.
    restored = {
        "base": checkpoint.restore_params(paths["base"]),
        "experts": [checkpoint.restore_params(paths[f"e{i}"]) for i in range(K)],
        "stats": [checkpoint.restore_statistics(paths[f"e{i}"]) for i in range(K)],
        "fishers": [checkpoint.restore_params(paths[f"f{i}"]) for i in range(K)],
        "tied": [checkpoint.restore_params(paths[f"t{i}"]) for i in range(K)],
    }
    return {"paths": paths, **restored}


def _experts(p, prefix="e", n=K):
    return [p[f"{prefix}{i}"] for i in range(n)]
