"""Scanned Flax models: an nnx.scan model (layer axis first or second) trains like the
same model with one leaf per layer, with the same per-layer statistics, and its update
lowered for a GPU does not grow with its layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import umtam_jax

L, D = 3, 16


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class Scanned(nnx.Module):
    """L blocks whose parameters are stacked along axis ``axis`` (0: ``[L, d_in, d_out]``;
    1: ``[d_in, L, d_out]`` kernels and ``[d, L]`` biases, as MaxText's
    ``param_scan_axis=1``), run by nnx.scan."""

    def __init__(self, rngs: nnx.Rngs, axis: int = 0):
        self.axis = axis

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


class Unrolled(nnx.Module):
    """The same blocks as separate modules (one leaf per layer)."""

    def __init__(self, scanned: Scanned):
        state = nnx.state(scanned.blocks, nnx.Param)
        self.layers = nnx.List([Block(nnx.Rngs(0)) for _ in range(L)])
        for i, layer in enumerate(self.layers):
            nnx.update(layer, jax.tree.map(lambda x, i=i: jnp.take(x, i, scanned.axis), state))

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _train(model, tx, batches):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for x, y in batches:
        step(model, optimizer, x, y)
    return optimizer


@pytest.mark.parametrize("axis", [0, 1])
def test_nnx_scan_model_trains_like_the_unrolled_model(axis):
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
        )
        for _ in range(4)
    ]
    scanned = Scanned(nnx.Rngs(0), axis)
    unrolled = Unrolled(scanned)
    kwargs = dict(rank=3, min_dim_size_to_factor=4, svd_method="exact")
    row_axes = umtam_jax.scanned("blocks", axis=axis)
    opt_s = _train(scanned, umtam_jax.umtam(1e-2, row_axes=row_axes, **kwargs), batches)
    opt_u = _train(unrolled, umtam_jax.umtam(1e-2, **kwargs), batches)
    got = nnx.state(scanned, nnx.Param)["blocks"]["lin"]
    layer = lambda x, i: np.take(np.asarray(x), i, axis)  # noqa: E731
    for i in range(L):
        want = nnx.state(unrolled, nnx.Param)["layers"][i]["lin"]
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(
                layer(got[name][...], i), want[name][...], rtol=2e-5, atol=2e-6
            )
    # The statistics of layer i of the scanned model are those of the unrolled layer i, up
    # to float32 rounding: relative to each statistic's scale, so that an entry near 0 (a
    # momentum's) is not held to a relative bound that rounding alone can break.
    for fn in (umtam_jax.saliency, umtam_jax.curvature, umtam_jax.momentum):
        stat_s = fn(opt_s.opt_state)["blocks"]["lin"]
        stat_u = fn(opt_u.opt_state)["layers"]
        for i in range(L):
            for name in ("kernel", "bias"):
                want = np.asarray(stat_u[i]["lin"][name])
                scale = float(np.abs(want).max())
                assert scale > 0, (fn.__name__, i, name)
                np.testing.assert_allclose(
                    layer(stat_s[name], i), want, rtol=1e-3, atol=1e-5 * scale
                )


def _lowered_ops(blocks: int, axis: int = 0) -> int:
    """Operations in the update of a scanned model whose layer axis is ``axis``, lowered for
    a GPU (no GPU needed)."""
    import re

    from jax import export

    d = 128
    params = {
        "blocks": {
            "kernel": jax.ShapeDtypeStruct(np.insert([d, d], axis, blocks), jnp.float32),
            "bias": jax.ShapeDtypeStruct(np.insert([d], axis, blocks), jnp.float32),
        },
        "head": jax.ShapeDtypeStruct((d, 8), jnp.float32),
    }
    opt = umtam_jax.umtam(1e-3, rank=8, row_axes=umtam_jax.scanned("blocks", axis=axis))
    state = jax.eval_shape(opt.init, params)
    lowered = export.export(jax.jit(opt.update), platforms=("cuda",))(params, state, params)
    return len(re.findall(r"= \"?[a-z_]+\.[a-z_]+", lowered.mlir_module()))


@pytest.mark.parametrize("axis", [0, 1])
def test_update_of_a_scanned_model_does_not_grow_with_its_layers(axis):
    assert _lowered_ops(12, axis) == _lowered_ops(2, axis)
