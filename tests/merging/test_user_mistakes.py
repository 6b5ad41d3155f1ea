"""Mistakes a user makes with the per-expert inputs and the Gram pass, each refused with
one error naming the input and what to do: an expert without statistics (trained with
AdamW), a missing Fisher, curvature or Gram pytree, and linen layers inside lifted
transforms (``remat``, ``scan``, ``vmap``), which ``input_grams`` cannot see."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from umtam_jax import merging


def _trees():
    rng = np.random.default_rng(0)
    tree = lambda: {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.ones(6)}  # noqa: E731
    return tree(), tree(), tree()


def _statistics(params):
    tx = umtam_jax.umtam(1e-3, rank=2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    return umtam_jax.statistics(state)


# ------------------------------------------------------------------ missing per-expert inputs


def test_an_expert_without_statistics_is_named_with_what_to_do():
    base, a, b = _trees()
    with pytest.raises(
        ValueError,
        match=r"statistics\[1\] is None: that expert has no UMTAM statistics .*AdamW.*"
        r"a merge method that needs no statistics .*train it with umtam",
    ):
        merging.umtam(base, [a, b], [_statistics(a), None], density=0.2)
    with pytest.raises(ValueError, match=r"statistics\[0\] is None"):
        merging.merge("umtam", base, [a, b], [None, _statistics(b)], density=0.2)


def test_a_missing_fisher_curvature_or_gram_is_named():
    base, a, b = _trees()
    ones = jax.tree.map(jnp.ones_like, base)
    with pytest.raises(ValueError, match=r"fishers\[1\] is None: compute that expert's Fisher"):
        merging.fisher(base, [a, b], [ones, None])
    with pytest.raises(ValueError, match=r"curvatures\[0\] is None: give that expert's"):
        merging.ota(base, [a, b], [None, ones])
    grams = {"w": jnp.eye(8)}
    with pytest.raises(ValueError, match=r"grams\[1\] is None: every expert needs Grams"):
        merging.regmean(base, [a, b], [grams, None])


def test_no_grams_at_all_still_averages():
    """``None`` for every expert's Grams is no mistake: every leaf is averaged."""
    base, a, b = _trees()
    merged = merging.regmean(base, [a, b], [None, None])
    np.testing.assert_allclose(merged["w"], (a["w"] + b["w"]) / 2, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ linen lifted transforms


class _Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(nn.Dense)(4, name="hidden")(x)
        return nn.Dense(2, name="out")(x)


class _Body(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return nn.Dense(3, name="dense")(carry), None


class _Scan(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(name="blocks")(x, None)[0]


class _Vmap(nn.Module):
    @nn.compact
    def __call__(self, x):
        vmap = nn.vmap(
            nn.Dense,
            variable_axes={"params": None},
            split_rngs={"params": False},
        )
        return vmap(3, name="dense")(x)


@pytest.mark.parametrize(
    "model, path", [(_Remat(), "hidden"), (_Scan(), "blocks/dense"), (_Vmap(), "dense")]
)
def test_linen_layers_inside_transforms_are_refused_clearly(model, path):
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(
        ValueError,
        match=f"input_grams cannot see the linen layer at {path}: layers inside "
        r"nnx/linen transforms \(scan, vmap, remat\) are not supported",
    ):
        merging.input_grams(model, params, [x])
    with pytest.raises(ValueError, match="inside nnx/linen transforms"):  # an apply function
        merging.input_grams(model.apply, {"params": params}, [x])


def test_linen_layers_outside_transforms_still_record():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(nn.Dense(4, name="hidden")(x))

    x = jnp.arange(6.0).reshape(2, 3)
    params = Plain().init(jax.random.key(0), x)["params"]
    grams = merging.input_grams(Plain(), params, [x])
    np.testing.assert_allclose(grams["hidden"]["kernel"], x.T @ x, rtol=1e-6)
    assert grams["out"]["kernel"].shape == (4, 4)
