"""RegMean's Gram pass (``merging.input_grams``) on tiny flax models (nnx and linen) against
Grams computed by hand: padding masks and token axes, attention projections,
``DenseGeneral`` contracting axes, layers with batch axes; and nnx experts merged with
their Grams."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umtam_jax import merging

# ------------------------------------------------------------------ the Gram pass


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[0](jax.nn.relu(self.first(x)))


def _by_hand(k1, b1, xs, mask=None):
    x = np.concatenate([np.asarray(b).reshape(-1, 3) for b in xs]).astype(np.float64)
    h = np.maximum(x @ np.asarray(k1, np.float64) + np.asarray(b1, np.float64), 0)
    if mask is not None:
        m = np.concatenate([np.asarray(mi).reshape(-1) for mi in mask])[:, None]
        x, h = x * m, h * m
    return x.T @ x, h.T @ h


def test_nnx_grams_equal_the_inputs_gram_by_hand():
    model = _MLP(nnx.Rngs(0))
    rng = np.random.default_rng(8)
    batches = [jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3)]
    grams = merging.input_grams(model, None, batches)
    g1, g2 = _by_hand(model.first.kernel[...], model.first.bias[...], batches)
    assert grams["first"]["bias"] is None and grams["layers"][0]["bias"] is None
    np.testing.assert_allclose(np.asarray(grams["first"]["kernel"]), g1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grams["layers"][0]["kernel"]), g2, rtol=1e-5)
    one = merging.input_grams(model, None, [jnp.concatenate(batches)])
    chex.assert_trees_all_close(one, jax.tree.map(np.asarray, grams), rtol=1e-5)
    mean = merging.input_grams(model, None, batches, normalize=True)
    np.testing.assert_allclose(np.asarray(mean["first"]["kernel"]), g1 / 15, rtol=1e-5)
    # another point's parameters, as an nnx.State or a pure dict
    state = jax.tree.map(lambda x: 2 * x, nnx.state(model, nnx.Param))
    at_state = merging.input_grams(model, state, batches)
    at_dict = merging.input_grams(model, nnx.to_pure_dict(state), batches)
    g1, g2 = _by_hand(2 * model.first.kernel[...], 2 * model.first.bias[...], batches)
    np.testing.assert_allclose(np.asarray(at_state["layers"][0]["kernel"]), g2, rtol=1e-5)
    chex.assert_trees_all_close(at_dict, jax.tree.map(np.asarray, at_state), rtol=1e-6)


def test_nnx_grams_with_a_padding_mask_and_token_axes():
    model = _MLP(nnx.Rngs(1))
    rng = np.random.default_rng(9)
    batches = [
        {
            "x": jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32),
            "m": (rng.random((2, 4)) > 0.4),
        }
        for _ in range(3)
    ]

    class Wrapped(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, batch):
            return self.inner(batch["x"])

    grams = merging.input_grams(Wrapped(model), None, batches, mask=lambda b: b["m"])
    want = _by_hand(
        model.first.kernel[...],
        model.first.bias[...],
        [b["x"] for b in batches],
        [b["m"] for b in batches],
    )
    np.testing.assert_allclose(np.asarray(grams["inner"]["first"]["kernel"]), want[0], rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grams["inner"]["layers"][0]["kernel"]), want[1], rtol=1e-5
    )
    with pytest.raises(ValueError, match="mask has shape"):
        merging.input_grams(model, None, [jnp.ones((2, 3))], mask=lambda b: jnp.ones(3))
    with pytest.raises(ValueError, match="batches is empty"):
        merging.input_grams(model, None, [])


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(jax.nn.relu(nn.Dense(4, name="hidden")(x)))


def test_linen_grams_equal_the_inputs_gram_by_hand():
    module = _LinenMLP()
    rng = np.random.default_rng(10)
    batches = [jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    g1, g2 = _by_hand(params["hidden"]["kernel"], params["hidden"]["bias"], batches)
    for model in (module, lambda p, b: module.apply({"params": p}, b)):
        grams = merging.input_grams(model, params, batches)
        assert grams["hidden"]["bias"] is None
        np.testing.assert_allclose(np.asarray(grams["hidden"]["kernel"]), g1, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), g2, rtol=1e-5)
    with pytest.raises(ValueError, match="the layer at hidden has no kernel in params"):
        renamed = {"h": params["hidden"], "out": params["out"]}
        merging.input_grams(lambda p, b: module.apply({"params": params}, b), renamed, batches)


def test_nnx_experts_merge_with_their_grams():
    rng = np.random.default_rng(11)
    batches = [jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) for _ in range(2)]
    models = [_MLP(nnx.Rngs(i)) for i in range(2)]
    grams = [merging.input_grams(m, None, batches) for m in models]
    states = [nnx.state(m, nnx.Param) for m in models]
    merged = merging.regmean(None, states, grams, alpha=0.8)
    assert isinstance(merged, nnx.State)
    pure = merging.regmean(None, [nnx.to_pure_dict(s) for s in states], grams, alpha=0.8)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(merged), jax.tree.map(np.asarray, pure), rtol=0, atol=0
    )
    bias = (states[0]["first"]["bias"][...] + states[1]["first"]["bias"][...]) / 2
    np.testing.assert_allclose(np.asarray(pure["first"]["bias"]), bias, rtol=1e-6)


# ------------------------------------------------------------------ attention projections


def _attention_by_hand(xs, q_kernel, heads_out):
    """The Grams of the query projection's inputs ``x`` and of the output projection's
    inputs (the attention's per-head outputs, flattened to heads·head_dim)."""
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, q_kernel.shape[0]) for b in xs])
    h = np.concatenate([np.asarray(o, np.float64).reshape(len(o), -1) for o in heads_out])
    return x.T @ x, h.T @ h


def test_nnx_attention_grams_and_merge():
    rng = np.random.default_rng(13)
    batches = [jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2)]

    def model(seed):
        return nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(seed)
        )

    attention = model(0)
    grams = merging.input_grams(attention, None, batches)
    assert grams["query"]["kernel"].shape == (8, 8) and grams["out"]["kernel"].shape == (8, 8)
    heads_out = []  # what the output projection receives: (tokens, heads, head_dim)
    for b in batches:
        q, k, v = (attention.query(b), attention.key(b), attention.value(b))
        heads_out.append(nnx.dot_product_attention(q, k, v).reshape(-1, 2, 4))
    gq, go = _attention_by_hand(batches, attention.query.kernel[...], heads_out)
    np.testing.assert_allclose(np.asarray(grams["query"]["kernel"]), gq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), go, rtol=1e-4, atol=1e-4)
    models = [model(1), model(2)]
    states = [nnx.state(m, nnx.Param) for m in models]
    merged = merging.regmean(None, states, [merging.input_grams(m, None, batches) for m in models])
    assert merged["out"]["kernel"][...].shape == (2, 4, 8)


def test_linen_attention_grams():
    module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    rng = np.random.default_rng(14)
    batches = [jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    grams = merging.input_grams(module, params, batches)
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, 8) for b in batches])
    np.testing.assert_allclose(np.asarray(grams["key"]["kernel"]), x.T @ x, rtol=1e-5)
    heads_out = []  # what the output projection receives: (tokens, heads, head_dim)
    for b in batches:
        q, k, v = (
            jnp.einsum("btd,dhk->bthk", b, params[n]["kernel"]) + params[n]["bias"]
            for n in ("query", "key", "value")
        )
        heads_out.append(nn.dot_product_attention(q, k, v).reshape(-1, 8))
    h = np.concatenate([np.asarray(o, np.float64) for o in heads_out])
    np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), h.T @ h, rtol=1e-4, atol=1e-4)
    experts = [jax.tree.map(lambda p, i=i: p + 0.01 * i, params) for i in range(2)]
    merged = merging.regmean(None, experts, [grams, grams])
    assert merged["out"]["kernel"].shape == params["out"]["kernel"].shape


def test_dense_general_contracting_axes_in_any_order():
    """``DenseGeneral(axis=(-1, -2))`` contracts its inputs' last two axes in their own
    order (Flax sorts them): the Gram's features follow the kernel's rows."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(3, axis=(-1, -2), name="proj")(x)

    module = Model()
    rng = np.random.default_rng(15)
    batches = [jnp.asarray(rng.standard_normal((4, 2, 5)), jnp.float32) for _ in range(2)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    assert params["proj"]["kernel"].shape == (2, 5, 3)
    grams = merging.input_grams(module, params, batches)
    x = np.concatenate([np.asarray(b, np.float64).reshape(len(b), -1) for b in batches])
    np.testing.assert_allclose(np.asarray(grams["proj"]["kernel"]), x.T @ x, rtol=1e-5)


def test_a_layer_with_batch_axes_gets_no_gram_and_the_others_do():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.per_head = nnx.LinearGeneral(3, 2, batch_axis={0: 4}, rngs=rngs)
            self.head = nnx.Linear(2, 1, rngs=rngs)

        def __call__(self, x):  # x: (4, batch, 3)
            return self.head(self.per_head(x))

    batches = [jnp.ones((4, 5, 3))]
    grams = merging.input_grams(Model(nnx.Rngs(0)), None, batches)
    assert grams["per_head"]["kernel"] is None
    assert grams["head"]["kernel"].shape == (2, 2)
