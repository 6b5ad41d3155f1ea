"""Leaves holding a stack of matrices (batch axes, layer-stacked / scanned models): every
per-matrix quantity is per matrix, equal to the float64 reference applied per matrix, for
matrices, dense slices and per-layer scalars (layouts: test_batched_layouts.py; scanned
models: test_batched_scanned_models.py; merging: test_batched_merging.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests.optimizer.batched_helpers import _relative_error
from tests.optimizer.reference import DenseReference, FactoredReference, Hyper
from tests.optimizer.test_reference import _optimizer


def _opt(hp: Hyper, row_axes, **extra):
    return _optimizer(hp, row_axes=row_axes, **extra)


@pytest.mark.parametrize(
    "shape,axes,perm,adaptive",
    [
        ((3, 12, 10), umtam_jax.MatrixAxes(1, 1), (0, 1, 2), False),  # a scanned Dense kernel
        ((2, 2, 6, 2, 10), umtam_jax.MatrixAxes(2, 2), (0, 1, 2, 3, 4), True),  # N-D matrix
        # [d_in, L, d_out]: the layer axis second (MaxText's param_scan_axis=1).
        ((12, 3, 10), umtam_jax.MatrixAxes((1,), (0,)), (1, 0, 2), False),
        # Columns from two separated axes (0 and 3), batch axis in between.
        ((2, 6, 3, 10), umtam_jax.MatrixAxes((2,), (1,)), (2, 1, 0, 3), True),
    ],
)
def test_each_matrix_of_the_batch_follows_the_reference(shape, axes, perm, adaptive):
    """``perm`` takes the leaf to (batch, rows, cols): the matrices are those of
    ``np.transpose(leaf, perm)``, written out here independently of the layout code."""
    hp = Hyper(adaptive_rank=adaptive, rank=2, max_rank=4, rank_update_every=2)
    r = 4 if adaptive else 2
    nb, k = (a if isinstance(a, int) else len(a) for a in axes)
    ndim = len(shape)
    batch_shape = tuple(shape[i] for i in perm[:nb])
    reordered = perm != tuple(range(ndim))

    def canonical(x):  # a parameter-shaped array as (batch, rows, cols)
        return np.transpose(np.asarray(x), perm)

    def per_matrix(x, tail):  # a per-matrix state array (u, v, rank) as batch + tail
        x = np.asarray(x)
        if reordered:  # stored with the parameter's axes, size 1 where absent
            x = np.transpose(x, perm + tuple(range(ndim, x.ndim)))
        return x.reshape(batch_shape + tail)

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        scale = np.linspace(0.5, 50.0, int(np.prod(batch_shape))).reshape(batch_shape)
        scale = np.transpose(
            scale.reshape(batch_shape + (1,) * (ndim - nb)), tuple(np.argsort(perm))
        )
        params = {"w": jnp.asarray(rng.normal(size=shape))}
        opt = _opt(hp, lambda path, s: axes)
        state = opt.init(params)
        leaf = state[0].leaves["w"]
        if reordered:  # stored with the parameter's axes in its order, size 1 where absent
            batch, rows, cols = perm[:nb], perm[nb : nb + k], perm[nb + k :]

            def keep(axes):
                return tuple(d if i in axes else 1 for i, d in enumerate(shape))

            assert leaf.row.shape == keep(batch + rows) and leaf.col.shape == keep(batch + cols)
            assert leaf.u.shape == leaf.row.shape + (r,) and leaf.v.shape == leaf.col.shape + (r,)
            assert leaf.sigma.shape == keep(batch) + (r, r)
        else:
            assert leaf.sigma.shape == batch_shape + (r, r)
        u0, v0 = per_matrix(leaf.u, (-1, r)), per_matrix(leaf.v, (-1, r))
        refs = {}
        for index in np.ndindex(*batch_shape):
            refs[index] = FactoredReference(u0[index], v0[index], canonical(params["w"])[index], hp)
        step = jax.jit(opt.update)
        for _ in range(8):
            # Gradient scales differ per matrix: clipping norms and ε_t must be per matrix.
            g = rng.normal(size=shape) * scale
            w = rng.normal(size=shape)
            updates, state = step({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(w)})
            assert updates["w"].shape == shape
            for index, ref in refs.items():
                expected = -ref.step(canonical(g)[index], canonical(w)[index])
                assert _relative_error(canonical(updates["w"])[index], expected) < 1e-8, index
        for quantity, fn in [
            ("saliency", umtam_jax.saliency),
            ("curvature", umtam_jax.curvature),
            ("momentum", umtam_jax.momentum),
        ]:
            got = fn(state)["w"]
            assert got.shape == shape
            for index, ref in refs.items():
                error = _relative_error(canonical(got)[index], getattr(ref, quantity))
                assert error < 1e-8, quantity
        if adaptive:
            ranks = per_matrix(state[0].leaves["w"].rank, ())
            want = [refs[index].active for index in np.ndindex(*batch_shape)]
            np.testing.assert_array_equal(ranks, np.reshape(want, batch_shape))


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


def test_a_stacked_per_layer_scalar_is_one_value_per_layer():
    """A gate per layer, stacked by nnx.scan into ``[L]``: each layer clips and scales its
    own gradient (float64 reference per layer), as the unscanned model's L scalars do:
    a vector leaf follows ``row_axes`` too, not one dense leaf."""
    hp = Hyper()
    with jax.enable_x64(True):
        params = {"blocks": {"gate": jnp.asarray([0.5, -0.25, 2.0])}}
        opt = _opt(hp, umtam_jax.scanned("blocks"))
        state = opt.init(params)
        refs = [DenseReference(np.asarray(params["blocks"]["gate"][i]), hp) for i in range(3)]
        rng = np.random.default_rng(2)
        for _ in range(3):
            g = rng.normal(size=3) * np.array([100.0, 1e-4, 2.0])
            updates, state = opt.update({"blocks": {"gate": jnp.asarray(g)}}, state, params)
            for i, ref in enumerate(refs):
                expected = -ref.step(g[i], np.asarray(params["blocks"]["gate"][i]))
                assert _relative_error(updates["blocks"]["gate"][i], expected) < 1e-8
    assert umtam_jax.scanned("blocks")((jax.tree_util.DictKey("blocks"),), (3,)) == (
        umtam_jax.MatrixAxes(1, 0)
    )


def test_the_statistics_of_a_stack_of_no_matrices_are_empty():
    """momentum() inferred the matrix size from an empty array (division by zero)."""
    params = {"blocks": {"k": jnp.ones((1, 2, 3)), "e": jnp.ones((0, 4, 4))}}
    opt = umtam_jax.umtam(
        1.0, rank=2, min_dim_size_to_factor=1, row_axes=umtam_jax.scanned("blocks")
    )
    state = opt.init(params)
    _, state = opt.update(jax.tree.map(lambda x: 0.5 * x, params), state, params)
    stats = umtam_jax.statistics(state)
    for extract in (umtam_jax.momentum, umtam_jax.curvature, umtam_jax.saliency):
        out = extract(stats)
        assert out["blocks"]["e"].shape == (0, 4, 4)
        assert out["blocks"]["k"].shape == (1, 2, 3)
