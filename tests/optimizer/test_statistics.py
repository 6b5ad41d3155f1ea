"""Merging statistics read from UMTAM optimizer states: through Optax wrappers and
``flax.nnx``, and parameter trees whose names coincide with the state's fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.test_behaviour import SMALL, _params, _run


def test_statistics_through_masked_and_partition():
    params = _params()
    masked = optax.masked(umtam_jax.umtam(0.1, **SMALL), {"dense": {"kernel": True}, "bias": False})
    _, state, _ = _run(masked, params, steps=2, jit=False)
    stats = umtam_jax.statistics(state)
    assert isinstance(stats["dense"]["kernel"], umtam_jax.FactoredStatistics)
    assert isinstance(stats["bias"], optax.MaskedNode)
    assert umtam_jax.curvature(state)["dense"]["kernel"].shape == (16, 12)

    labels = {"dense": {"kernel": "a"}, "bias": "b"}
    both = optax.partition(
        {"a": umtam_jax.umtam(0.1, **SMALL), "b": umtam_jax.umtam(0.2, **SMALL)}, labels
    )
    _, state, _ = _run(both, params, steps=2, jit=False)
    stats = umtam_jax.statistics(state)
    assert isinstance(stats["dense"]["kernel"], umtam_jax.FactoredStatistics)
    assert isinstance(stats["bias"], umtam_jax.DenseStatistics)


def test_statistics_of_a_chain_match_the_state():
    params = _params()
    opt = optax.chain(optax.clip_by_global_norm(1.0), umtam_jax.umtam(0.1, **SMALL))
    _, state, _ = _run(opt, params, steps=3)
    leaf = state[1][0].leaves["dense"]["kernel"]
    stats = umtam_jax.statistics(state)["dense"]["kernel"]
    np.testing.assert_array_equal(stats.row, leaf.row)
    np.testing.assert_array_equal(umtam_jax.saliency(state)["dense"]["kernel"], leaf.saliency)
    assert umtam_jax.statistics(stats) is stats


def test_statistics_of_a_foreign_state_is_an_error():
    with pytest.raises(ValueError, match="no UMTAM optimizer state"):
        umtam_jax.statistics(optax.adam(1e-3).init(_params()))


# ----------------------------------------------------------------------------- Flax


def test_trains_a_flax_nnx_model_with_nnx_optimizer():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 32, rngs=rngs)
            self.out = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.gelu(self.hidden(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, umtam_jax.umtam(3e-3, rank=4, min_dim_size_to_factor=8), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = float(train_step(model, optimizer))
    for _ in range(300):
        last = float(train_step(model, optimizer))
    assert last < 0.2 * first
    stats = umtam_jax.statistics(optimizer.opt_state)
    assert isinstance(stats["hidden"]["kernel"], umtam_jax.FactoredStatistics)
