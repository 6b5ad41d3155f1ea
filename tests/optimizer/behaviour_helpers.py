"""The small parameter tree, its gradients and the loop of steps shared by the
``test_behaviour_*.py`` modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SMALL = dict(rank=4, min_dim_size_to_factor=8)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
    }


def _grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(opt, params, steps=6, jit=True):
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    outs = []
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        outs.append(updates)
    return outs, state, update
