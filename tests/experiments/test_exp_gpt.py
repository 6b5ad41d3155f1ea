"""Tests of the small GPT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from umtam_jax.experiments.models import gpt

CFG = gpt.GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=4)


def test_shapes_and_param_tree():
    params = gpt.init_gpt(jax.random.key(0), CFG)
    assert isinstance(params, dict) and "lm_head" not in params
    assert params["block_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
    assert params["block_1"]["mlp"]["fc"]["kernel"].shape == (32, 128)
    assert all(leaf.ndim <= 2 for leaf in jax.tree.leaves(params))
    tokens = jnp.zeros((3, 10), jnp.int32)
    out = jax.eval_shape(lambda p, t: gpt.gpt_apply(p, t, config=CFG), params, tokens)
    assert out.shape == (3, 10, 64)

    untied = gpt.GPTConfig(**{**CFG.__dict__, "tie_embeddings": False})
    p2 = jax.eval_shape(lambda k: gpt.init_gpt(k, untied), jax.random.key(0))
    assert p2["lm_head"]["kernel"].shape == (32, 64)
    with pytest.raises(ValueError, match="context"):
        gpt.gpt_apply(params, jnp.zeros((1, 17), jnp.int32), config=CFG)


def test_causal():
    params = gpt.init_gpt(jax.random.key(1), CFG)
    a = jax.random.randint(jax.random.key(2), (1, 12), 0, 64)
    b = a.at[0, 8:].set((a[0, 8:] + 1) % 64)
    apply = jax.jit(lambda p, t: gpt.gpt_apply(p, t, config=CFG))
    la, lb = apply(params, a), apply(params, b)
    np.testing.assert_allclose(la[:, :8], lb[:, :8], atol=1e-5)
    assert not np.allclose(la[:, 8:], lb[:, 8:])


def test_loss_decreases_with_adamw():
    params = gpt.init_gpt(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    # A learnable stream: a fixed random cycle of 20 tokens.
    cycle = rng.integers(0, 64, 20)
    stream = np.tile(cycle, 50)
    batch = jnp.asarray(np.stack([stream[s : s + 17] for s in rng.integers(0, 900, 8)]))
    loss0 = jax.jit(lambda p, b: gpt.gpt_loss(p, b, config=CFG))(params, batch)
    assert abs(float(loss0) - np.log(64)) < 0.5
    tx = optax.adamw(3e-3, weight_decay=0.01)
    state = tx.init(params)
    step = gpt.make_gpt_train_step(tx, config=CFG)
    losses = []
    for _ in range(25):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
