"""Leaves holding a stack of matrices (batch axes, layer-stacked / scanned models): every
per-matrix quantity is per matrix, equal to the float64 reference applied per matrix and
to the same model with one leaf per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import umtam_jax
from tests.optimizer.reference import DenseReference, FactoredReference, Hyper
from tests.optimizer.test_reference import _optimizer
from umtam_jax import merging


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300)


def _opt(hp: Hyper, row_axes, **extra):
    return _optimizer(hp, row_axes=row_axes, **extra)


@pytest.mark.parametrize(
    "shape,axes,adaptive",
    [
        ((3, 12, 10), umtam_jax.MatrixAxes(1, 1), False),  # a scanned Dense kernel
        ((2, 2, 6, 2, 10), umtam_jax.MatrixAxes(2, 2), True),  # two batch axes, N-D matrix
    ],
)
def test_each_matrix_of_the_batch_follows_the_reference(shape, axes, adaptive):
    hp = Hyper(adaptive_rank=adaptive, rank=2, max_rank=4, rank_update_every=2)
    nb = axes.batch
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        scale = np.linspace(0.5, 50.0, int(np.prod(shape[:nb]))).reshape(shape[:nb])
        scale = scale.reshape(shape[:nb] + (1,) * (len(shape) - nb))
        params = {"w": jnp.asarray(rng.normal(size=shape))}
        opt = _opt(hp, lambda path, s: axes)
        state = opt.init(params)
        leaf = state[0].leaves["w"]
        assert leaf.sigma.shape == shape[:nb] + (4 if adaptive else 2,) * 2
        refs = {}
        for index in np.ndindex(*shape[:nb]):
            u0 = np.asarray(leaf.u[index]).reshape(-1, leaf.u.shape[-1])
            v0 = np.asarray(leaf.v[index]).reshape(-1, leaf.v.shape[-1])
            refs[index] = FactoredReference(u0, v0, np.asarray(params["w"][index]), hp)
        step = jax.jit(opt.update)
        for _ in range(8):
            # Gradient scales differ per matrix: clipping norms and ε_t must be per matrix.
            g = rng.normal(size=shape) * scale
            w = rng.normal(size=shape)
            updates, state = step({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(w)})
            for index, ref in refs.items():
                expected = -ref.step(g[index], w[index])
                assert _relative_error(updates["w"][index], expected) < 1e-8, index
        for quantity, fn in [
            ("saliency", umtam_jax.saliency),
            ("curvature", umtam_jax.curvature),
            ("momentum", umtam_jax.momentum),
        ]:
            got = fn(state)["w"]
            assert got.shape == shape
            for index, ref in refs.items():
                assert _relative_error(got[index], getattr(ref, quantity)) < 1e-8, quantity
        if adaptive:
            ranks = np.asarray(state[0].leaves["w"].rank)
            assert ranks.shape == shape[:nb]
            want = [refs[index].active for index in np.ndindex(*shape[:nb])]
            np.testing.assert_array_equal(ranks, np.reshape(want, shape[:nb]))


def test_stacked_dense_leaf_clips_each_slice():
    hp = Hyper()
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        params = {"b": jnp.asarray(rng.normal(size=(3, 5)))}
        opt = _opt(hp, umtam_jax.scanned())
        assert isinstance(opt.init(params)[0].leaves["b"], umtam_jax.DenseLeafState)
        opt = _opt(hp, lambda p, s: umtam_jax.MatrixAxes(1, 0))
        state = opt.init(params)
        refs = [DenseReference(np.asarray(params["b"][i]), hp) for i in range(3)]
        for _ in range(4):
            g = rng.normal(size=(3, 5)) * np.array([[0.1], [1.0], [100.0]])
            updates, state = opt.update({"b": jnp.asarray(g)}, state, params)
            for i, ref in enumerate(refs):
                expected = -ref.step(g[i], np.asarray(params["b"][i]))
                assert _relative_error(updates["b"][i], expected) < 1e-8


def test_scanned_helper_marks_only_named_subtrees():
    fn = umtam_jax.scanned("blocks")
    blocks = (jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey("kernel"))
    head = (jax.tree_util.DictKey("head"), jax.tree_util.DictKey("kernel"))
    assert fn(blocks, (4, 16, 8)) == umtam_jax.MatrixAxes(1, 1)
    assert fn(blocks, (4, 3, 3, 16, 8)) == umtam_jax.MatrixAxes(1, 3)  # scanned conv
    assert fn(head, (3, 3, 16, 8)) == 3  # a plain conv keeps the default view
    with pytest.raises(ValueError, match="batch"):
        umtam_jax.scanned("blocks", batch=0)
    opt = umtam_jax.umtam(1e-3, row_axes=lambda p, s: umtam_jax.MatrixAxes(2, 2))
    with pytest.raises(ValueError, match="exceed"):
        opt.init({"w": jnp.ones((2, 2, 3))})


# ----------------------------------------------------------------------------- Flax

L, D = 3, 16


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class Scanned(nnx.Module):
    """L blocks whose parameters are stacked along a leading axis, run by nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


class Unrolled(nnx.Module):
    """The same blocks as separate modules (one leaf per layer)."""

    def __init__(self, scanned: Scanned):
        state = nnx.state(scanned.blocks, nnx.Param)
        self.layers = nnx.List([Block(nnx.Rngs(0)) for _ in range(L)])
        for i, layer in enumerate(self.layers):
            nnx.update(layer, jax.tree.map(lambda x, i=i: x[i], state))

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


def test_nnx_scan_model_trains_like_the_unrolled_model():
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
        )
        for _ in range(4)
    ]
    scanned = Scanned(nnx.Rngs(0))
    unrolled = Unrolled(scanned)
    kwargs = dict(rank=3, min_dim_size_to_factor=4, svd_method="exact")
    opt_s = _train(
        scanned, umtam_jax.umtam(1e-2, row_axes=umtam_jax.scanned("blocks"), **kwargs), batches
    )
    opt_u = _train(unrolled, umtam_jax.umtam(1e-2, **kwargs), batches)
    got = nnx.state(scanned, nnx.Param)["blocks"]["lin"]
    for i in range(L):
        want = nnx.state(unrolled, nnx.Param)["layers"][i]["lin"]
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(got[name][...][i], want[name][...], rtol=2e-5, atol=2e-6)
    # The statistics of layer i of the scanned model are those of the unrolled layer i.
    sal_s = umtam_jax.saliency(opt_s.opt_state)["blocks"]["lin"]["kernel"]
    sal_u = umtam_jax.saliency(opt_u.opt_state)["layers"]
    for i in range(L):
        np.testing.assert_allclose(sal_s[i], sal_u[i]["lin"]["kernel"], rtol=1e-3, atol=1e-12)


def test_merging_and_checkpoints_take_batched_statistics(tmp_path):
    from umtam_jax import checkpoint

    rng = np.random.default_rng(2)
    base = {"w": jnp.asarray(rng.normal(size=(3, 12, 10)), jnp.float32)}
    opt = umtam_jax.umtam(
        1e-2, rank=2, min_dim_size_to_factor=4, row_axes=lambda p, s: umtam_jax.MatrixAxes(1, 1)
    )
    experts, stats = [], []
    for seed in range(2):
        params, state = base, opt.init(base)
        g_rng = np.random.default_rng(10 + seed)
        for _ in range(3):
            g = {"w": jnp.asarray(g_rng.normal(size=(3, 12, 10)), jnp.float32)}
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
        experts.append(params)
        stats.append(umtam_jax.statistics(state))
    merged = merging.umtam(base, experts, stats, density=0.3)
    assert merged["w"].shape == (3, 12, 10) and np.all(np.isfinite(merged["w"]))
    # Per-matrix statistics restore from a checkpoint unchanged and merge identically.
    path = checkpoint.save_checkpoint(tmp_path / "e0", experts[0], statistics=stats[0])
    restored = checkpoint.restore_statistics(path)
    assert restored["w"].sigma.shape == (3, 2, 2)
    again = merging.umtam(base, experts, [restored, stats[1]], density=0.3)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(merged["w"]))
    # One curvature per matrix: scaling one matrix's gradients leaves the others' alone.
    curv = umtam_jax.curvature(stats[0])["w"]
    assert curv.shape == (3, 12, 10)
    for i in range(3):
        row = np.asarray(stats[0]["w"].row[i], np.float64)
        col = np.asarray(stats[0]["w"].col[i], np.float64)
        want = np.outer(row, col) / row.sum()
        assert _relative_error(curv[i], want) < 1e-6


def _lowered_ops(blocks: int) -> int:
    """Operations in the update of a scanned model, lowered for a GPU (no GPU needed)."""
    import re

    from jax import export

    d = 128
    params = {
        "blocks": {
            "kernel": jax.ShapeDtypeStruct((blocks, d, d), jnp.float32),
            "bias": jax.ShapeDtypeStruct((blocks, d), jnp.float32),
        },
        "head": jax.ShapeDtypeStruct((d, 8), jnp.float32),
    }
    opt = umtam_jax.umtam(1e-3, rank=8, row_axes=umtam_jax.scanned("blocks"))
    state = jax.eval_shape(opt.init, params)
    lowered = export.export(jax.jit(opt.update), platforms=("cuda",))(params, state, params)
    return len(re.findall(r"= \"?[a-z_]+\.[a-z_]+", lowered.mlir_module()))


def test_update_of_a_scanned_model_does_not_grow_with_its_layers():
    assert _lowered_ops(12) == _lowered_ops(2)
