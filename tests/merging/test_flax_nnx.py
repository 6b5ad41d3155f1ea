"""Merging ``flax.nnx`` states: Variables line up with the statistics of ``nnx.Optimizer``."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import umtam_jax
from umtam_jax import merging


def _model():
    return nnx.Sequential(
        nnx.Linear(12, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 3, rngs=nnx.Rngs(1))
    )


def _expert(seed):
    model = _model()
    tx = umtam_jax.umtam(0.05, rank=2, min_dim_size_to_factor=8)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(seed), (8, 12))
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads)
    return nnx.state(model, nnx.Param), umtam_jax.statistics(optimizer.opt_state)


@pytest.fixture(scope="module")
def states():
    base = nnx.state(_model(), nnx.Param)
    (e1, s1), (e2, s2) = _expert(1), _expert(2)
    return base, [e1, e2], [s1, s2]


def _pure(state):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


METHODS = {
    "umtam": lambda b, e, s: merging.umtam(b, e, s, density=0.5),
    "ties": lambda b, e, s: merging.ties(b, e, density=0.5),
    "task_arithmetic": lambda b, e, s: merging.task_arithmetic(b, e, scaling=0.5),
    "ota": lambda b, e, s: merging.ota(b, e, [umtam_jax.curvature(x) for x in s]),
    "fisher": lambda b, e, s: merging.fisher(b, e, [umtam_jax.curvature(x) for x in s]),
    "prune": lambda b, e, s: merging.prune(b, e[0], umtam_jax.saliency(s[0]), density=0.5),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nnx_states_merge_like_their_pure_dicts_and_come_back_as_states(states, method):
    base, experts, stats = states
    merged = METHODS[method](base, experts, stats)
    expected = METHODS[method](_pure(base), [_pure(e) for e in experts], stats)
    assert isinstance(merged, nnx.State)
    assert isinstance(merged["layers"][0]["kernel"], nnx.Param)
    chex.assert_trees_all_equal(_pure(merged), expected)
    # An nnx base with experts restored as pure dicts (e.g. from checkpoints) lines up too.
    mixed = METHODS[method](base, [_pure(e) for e in experts], stats)
    chex.assert_trees_all_equal(_pure(mixed), expected)


def test_merged_state_updates_a_model(states):
    base, experts, stats = states
    model = _model()
    nnx.update(model, merging.umtam(base, experts, stats))
    want = merging.umtam(_pure(base), [_pure(e) for e in experts], stats)
    chex.assert_trees_all_equal(_pure(nnx.state(model, nnx.Param)), want)
