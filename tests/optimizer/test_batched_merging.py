"""Batched (per-matrix) statistics of a layer stack in merging and checkpoints: merged as
the same stack with the layer axis first, restored unchanged, one curvature per matrix,
and validated before merging."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.batched_helpers import _relative_error
from umtam_jax import merging


def _trained_experts(axes, move):
    """Two experts of a ``(3, 12, 10)`` stack trained from one base by ``umtam`` with the
    view ``axes``, every array laid out by ``move`` (identity, or the layer axis moved)."""
    rng = np.random.default_rng(2)
    base = {"w": jnp.asarray(move(rng.normal(size=(3, 12, 10))), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4, row_axes=lambda p, s: axes)
    update = jax.jit(opt.update)
    experts, stats = [], []
    for seed in range(2):
        params, state = base, opt.init(base)
        g_rng = np.random.default_rng(10 + seed)
        for _ in range(3):
            g = {"w": jnp.asarray(move(g_rng.normal(size=(3, 12, 10))), jnp.float32)}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        experts.append(params)
        stats.append(umtam_jax.statistics(state))
    return base, experts, stats


@pytest.mark.parametrize("layer_axis", [0, 1])
def test_merging_and_checkpoints_take_batched_statistics(tmp_path, layer_axis):
    from umtam_jax import checkpoint

    if layer_axis == 0:
        axes, move = umtam_jax.MatrixAxes(1, 1), lambda x: x
    else:  # [d_in, L, d_out]: statistics stored in the parameter's axis order
        axes, move = umtam_jax.MatrixAxes((1,), (0,)), lambda x: np.moveaxis(x, 0, 1)
    base, experts, stats = _trained_experts(axes, move)
    shape = move(np.zeros((3, 12, 10))).shape
    merged = merging.umtam(base, experts, stats, density=0.3)
    assert merged["w"].shape == shape and np.all(np.isfinite(merged["w"]))
    if layer_axis:  # the same merge as with the layer axis first, up to float32 rounding
        lead_inputs = _trained_experts(umtam_jax.MatrixAxes(1, 1), lambda x: x)
        lead = merging.umtam(*lead_inputs, density=0.3)
        np.testing.assert_allclose(merged["w"], move(lead["w"]), rtol=1e-5, atol=1e-6)
    # Per-matrix statistics restore from a checkpoint unchanged and merge identically.
    path = checkpoint.save_checkpoint(tmp_path / "e0", experts[0], statistics=stats[0])
    restored = checkpoint.restore_statistics(path)
    assert restored["w"].sigma.shape == stats[0]["w"].sigma.shape
    again = merging.umtam(base, experts, [restored, stats[1]], density=0.3)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(merged["w"]))
    # One curvature per matrix: scaling one matrix's gradients leaves the others' alone.
    curv = umtam_jax.curvature(stats[0])["w"]
    assert curv.shape == shape
    for i in range(3):
        row = np.asarray(stats[0]["w"].row, np.float64)
        col = np.asarray(stats[0]["w"].col, np.float64)
        if layer_axis:  # row (12, 3, 1), col (1, 3, 10)
            row, col, got = row[:, i, 0], col[0, i, :], np.asarray(curv)[:, i, :]
        else:
            row, col, got = row[i], col[i], np.asarray(curv)[i]
        assert _relative_error(got, np.outer(row, col) / row.sum()) < 1e-6


def test_parameter_ordered_statistics_are_validated_before_merging():
    axes, move = umtam_jax.MatrixAxes((1,), (0,)), lambda x: np.moveaxis(x, 0, 1)
    base, experts, stats = _trained_experts(axes, move)
    node = stats[1]["w"]
    bad_u = {"w": node._replace(u=node.u[..., :1])}  # rank 1 beside a rank-2 core
    with pytest.raises(ValueError, match=re.escape("statistics[1]['w'].v: expected (1, 3, 10, 1)")):
        merging.umtam(base, experts, [stats[0], bad_u], density=0.3)
    bad_row = {"w": node._replace(row=jnp.ones((12, 2, 1)))}  # 2 layers, not 3
    with pytest.raises(
        ValueError, match=re.escape("statistics shape mismatch at statistics[1]['w']")
    ):
        merging.umtam(base, experts, [stats[0], bad_row], density=0.3)
