"""Trees shared by the Orbax checkpoint tests (``test_orbax_*.py``): a tiny model's
parameters, and statistics and optimizer states built by hand from the UMTAM NamedTuples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from umtam_jax.optimizer._state import (
    DenseLeafState,
    DenseStatistics,
    FactoredLeafState,
    FactoredStatistics,
    ScaleByUmtamState,
)


def tiny_params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "hidden": {
            "kernel": (0.3 * jax.random.normal(k1, (8, 6))).astype(dtype),
            "bias": jnp.zeros((6,), dtype),
        },
        "out": {"kernel": (0.3 * jax.random.normal(k2, (6, 6))).astype(dtype)},
        "scale": (1.0 + 0.1 * jax.random.normal(k3, (6,))).astype(dtype),
    }


def hand_statistics():
    """A statistics pytree with factored, dense, None fields, MaskedNode and bfloat16."""
    return {
        "enc": {
            "kernel": FactoredStatistics(
                u=jnp.arange(8.0).reshape(4, 2),
                sigma=jnp.diag(jnp.array([2.0, 1.0])),
                v=jnp.ones((3, 2)),
                row=jnp.full((4,), 0.5),
                col=jnp.full((3,), 0.25),
                saliency=jnp.linspace(0, 1, 12).reshape(4, 3),
            ),
            "bias": DenseStatistics(
                mu=jnp.array([1.0, -1.0, 0.5], jnp.bfloat16), nu=jnp.ones(3), saliency=None
            ),
        },
        "frozen": optax.MaskedNode(),
        "head": FactoredStatistics(
            u=jnp.ones((2, 1)),
            sigma=jnp.ones((1, 1)),
            v=jnp.ones((5, 1)),
            row=jnp.ones(2),
            col=jnp.ones(5),
            saliency=None,
        ),
    }


def hand_opt_state():
    """An optax.chain-like state built from the UMTAM NamedTuples, with None fields."""
    leaves = {
        "w": FactoredLeafState(
            u=jnp.ones((4, 2)),
            sigma=jnp.eye(2),
            v=jnp.full((3, 2), 0.5),
            dense_momentum=None,
            row=jnp.ones(4),
            col=jnp.ones(3),
            saliency=jnp.zeros((4, 3)),
            initial=jnp.arange(12.0).reshape(4, 3),
            rank=jnp.int32(2),
        ),
        "b": DenseLeafState(
            mu=jnp.ones(3, jnp.bfloat16), nu=jnp.ones(3), saliency=None, initial=None
        ),
        "m": optax.MaskedNode(),
    }
    return (
        ScaleByUmtamState(count=jnp.int32(3), leaves=leaves),
        optax.EmptyState(),
        optax.ScaleByScheduleState(count=jnp.int32(7)),
    )
