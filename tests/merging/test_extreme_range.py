"""Merges of float32 inputs whose squares or cubes pass float32's range: the methods that
are positively homogeneous give the scaled merge of the scaled inputs, as they do in
float64, instead of a NaN, an error or a wrong direction."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import umtam_jax
from umtam_jax import merging

from . import helpers as H

# Powers of two, so that scaling is exact. 2**66 ≈ 7e19: squares (norms) pass 3.4e38.
# 2**50 ≈ 1e15: task vectors of ~0.1 become ~1e14, whose cubes (the sign election's
# |Δ| · Δ²√ν) pass 3.4e38 while their squares (the saliency) do not.
NORMS, CUBES = 2.0**66, 2.0**50


def _scaled(tree, scale):
    return jax.tree.map(lambda x: np.asarray(x * scale, np.float32), tree)


def _inputs(k):
    rng = np.random.default_rng(7)
    base, experts = H.random_experts(rng, k, dtype=np.float32)
    stats = H.random_statistics(rng, k, tracked=False, dtype=np.float32)
    return base, experts, stats


def _assert_scaled(small, big, scale):
    want = jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, small)
    for got, expected in zip(jax.tree.leaves(big), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-5, atol=0)


MERGES = {
    "slerp": (NORMS, lambda b, e, s: merging.slerp(b, e[0], t=0.3)),
    "nuslerp": (NORMS, lambda b, e, s: merging.nuslerp(b, e[:2], weights=[1.0, 2.0])),
    "nuslerp_rows": (
        NORMS,
        lambda b, e, s: merging.nuslerp(b, e[:2], weights=[1.0, 2.0], nuslerp_flatten=False),
    ),
    "multislerp": (NORMS, lambda b, e, s: merging.multislerp(b, e)),
    "karcher": (NORMS, lambda b, e, s: merging.karcher(b, e)),
    "umtam": (CUBES, lambda b, e, s: merging.umtam(b, e, s, density=0.5)),
}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_scaled_inputs_give_the_scaled_merge(name):
    base, experts, stats = _inputs(3)
    scale, merge = MERGES[name]
    small = merge(base, experts, stats)
    big = merge(_scaled(base, scale), [_scaled(e, scale) for e in experts], stats)
    _assert_scaled(small, big, scale)


def test_norms_of_entries_near_float32s_largest_are_exact():
    """The scale of the overflow-safe norm is a power of two at or below the largest
    entry: the one above overflows (2**128) for entries beyond 1.7e38, which gave NaN."""
    from umtam_jax.merging._gta import scaled_norm

    x = np.array([2e38, 1.0, -1e38], np.float32)
    want = np.sqrt(np.sum(x.astype(np.float64) ** 2))  # 2.2e38: still a float32
    np.testing.assert_allclose(float(scaled_norm(x)), want, rtol=1e-6)
    np.testing.assert_allclose(scaled_norm(x[None], axis=-1), [want], rtol=1e-6)


def test_the_sign_election_keeps_small_entries_beside_huge_ones():
    """Scaled by the tensor's peak, the support of an entry 1e25 times smaller than it
    flushed to 0 (elected sign 0): both experts agreed, and the merge kept the base."""
    base = {"w": np.zeros(2, np.float32)}
    experts = [{"w": np.array([1e15, 1e-10], np.float32)},
               {"w": np.array([1e15, 2e-10], np.float32)}]  # fmt: skip
    ones = np.ones(2, np.float32)
    node = {"w": umtam_jax.DenseStatistics(mu=0 * ones, nu=ones, saliency=None)}
    merged = merging.umtam(base, experts, [node, node], density=1.0,
                           curvature_pruning=False, curvature_aggregation=False)  # fmt: skip
    np.testing.assert_allclose(merged["w"], [1e15, 1.5e-10], rtol=1e-6)
