"""Leaves holding a stack of matrices (batch axes, layer-stacked / scanned models): every
per-matrix quantity is per matrix, equal to the float64 reference applied per matrix and
to the same model with one leaf per layer."""

from __future__ import annotations

import re

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


def test_a_row_axes_callable_failing_on_a_vector_names_the_leaf():
    """row_axes sees vectors too: a callable written for matrices (``shape[-2]``) fails
    there, with the leaf named instead of a bare IndexError."""
    opt = umtam_jax.umtam(1e-3, row_axes=lambda p, s: 1 if s[-2] > 0 else 0)
    with pytest.raises(ValueError, match=r"row_axes raised IndexError for \['b'\] of shape \(3,\)"):
        opt.init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})


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


def test_scanned_helper_takes_the_layer_axis_anywhere():
    fn = umtam_jax.scanned("blocks", axis=1)  # MaxText's param_scan_axis=1
    blocks = (jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey("kernel"))
    head = (jax.tree_util.DictKey("head"), jax.tree_util.DictKey("kernel"))
    assert fn(blocks, (16, 4, 8)) == umtam_jax.MatrixAxes((1,), (0,))
    assert fn(blocks, (16, 4)) == umtam_jax.MatrixAxes((1,), ())  # a stacked bias [d, L]
    assert fn(blocks, (16, 4, 2, 8)) == umtam_jax.MatrixAxes((1,), (0, 2))  # [d, L, h, k]
    assert fn(head, (16, 8)) == 1
    with pytest.raises(ValueError, match="axis"):
        umtam_jax.scanned("blocks", axis=-1)
    # The inner view is checked against the shape without the stacking axes.
    for bad in (-1, 3, "1"):
        fn = umtam_jax.scanned("blocks", axis=1, inner=lambda p, s, bad=bad: bad)
        with pytest.raises(ValueError, match=r"scanned's inner returned .*\['blocks'\]"):
            fn(blocks, (16, 4, 8))


def test_flax_attention_query_key_value_kernels_are_fan_in_by_heads_times_head_dim():
    """nnx.MultiHeadAttention's (in, heads, head_dim) projections were viewed as
    (in · heads, head_dim), splitting the fan-out, and a head_dim below
    min_dim_size_to_factor left them dense (Adam's rule, no low-rank momentum). They are
    in × (heads · head_dim) matrices that follow the float64 reference; the output
    projection (heads, head_dim, out) keeps (heads · head_dim) × out."""
    mha = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    params = nnx.state(mha, nnx.Param)
    opt = umtam_jax.scale_by_umtam(rank=2, min_dim_size_to_factor=8, svd_method="exact")
    state = opt.init(params)
    for name in ("query", "key", "value"):
        leaf = state.leaves[name]["kernel"]
        assert (leaf.row.shape, leaf.col.shape) == ((8,), (2, 4)), name
    assert (state.leaves["out"]["kernel"].row.shape, state.leaves["out"]["kernel"].col.shape) == (
        (2, 4),
        (8,),
    )
    # A layer-stacked [L, in, out] query kernel (fewer layers than inputs) keeps the
    # all-but-last view, as any stacked kernel without scanned().
    query = (jax.tree_util.DictKey("query"), jax.tree_util.DictKey("kernel"))
    assert umtam_jax.default_row_axes(query, (12, 768, 768)) == 2
    assert umtam_jax.default_row_axes(query, (768, 12, 64)) == 1
    leaf = state.leaves["query"]["kernel"]
    w = np.asarray(params["query"]["kernel"][...], np.float64)
    ref = FactoredReference(
        np.asarray(leaf.u), np.asarray(leaf.v).reshape(8, 2), w.reshape(8, 8), Hyper(rank=2)
    )
    rng = np.random.default_rng(0)
    step = jax.jit(opt.update)
    for _ in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        updates, state = step(grads, state, params)
        g = np.asarray(grads["query"]["kernel"][...], np.float64).reshape(8, 8)
        want = ref.step(g, w.reshape(8, 8))
        got = np.asarray(updates["query"]["kernel"][...], np.float64).reshape(8, 8)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "axes,message",
    [
        (umtam_jax.MatrixAxes((0,), (0,)), "named twice"),
        (umtam_jax.MatrixAxes((3,), (0,)), "outside"),
        (umtam_jax.MatrixAxes((0,), 3), "exceed"),
        (umtam_jax.MatrixAxes(1.5, 1), "non-negative ints or tuples"),
        (umtam_jax.MatrixAxes((0,), ("a",)), "non-negative ints or tuples"),
    ],
)
def test_invalid_matrix_axes_name_the_leaf(axes, message):
    opt = umtam_jax.umtam(1e-3, row_axes=lambda p, s: axes)
    with pytest.raises(ValueError, match=message) as err:
        opt.init({"w": jnp.ones((4, 5, 6))})
    assert "['w']" in str(err.value) and "(4, 5, 6)" in str(err.value)


def test_a_negative_axis_position_counts_from_the_end():
    params = {"w": jnp.ones((6, 3, 5))}
    a = umtam_jax.umtam(
        1e-3,
        rank=2,
        min_dim_size_to_factor=2,
        row_axes=lambda p, s: umtam_jax.MatrixAxes((-2,), (0,)),
    )
    b = umtam_jax.umtam(
        1e-3,
        rank=2,
        min_dim_size_to_factor=2,
        row_axes=lambda p, s: umtam_jax.MatrixAxes((1,), (0,)),
    )
    shapes = lambda opt: jax.tree.map(jnp.shape, opt.init(params)[0].leaves["w"])  # noqa: E731
    assert shapes(a) == shapes(b)
    assert shapes(a).row == (6, 3, 1) and shapes(a).sigma == (1, 3, 1, 2, 2)


# ----------------------------------------------------------------------------- Flax

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


def _trained_experts(axes, move):
    """Two experts of a ``(3, 12, 10)`` stack trained from one base by ``umtam`` with the
    view ``axes``, every array laid out by ``move`` (identity, or the layer axis moved)."""
    rng = np.random.default_rng(2)
    base = {"w": jnp.asarray(move(rng.normal(size=(3, 12, 10))), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4, row_axes=lambda p, s: axes)
    update = jax.jit(opt.update)
    experts, stats = [], []
    for seed in range(2):
        params, state = base, opt.init(base)
        g_rng = np.random.default_rng(10 + seed)
        for _ in range(3):
            g = {"w": jnp.asarray(move(g_rng.normal(size=(3, 12, 10))), jnp.float32)}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        experts.append(params)
        stats.append(umtam_jax.statistics(state))
    return base, experts, stats


@pytest.mark.parametrize("layer_axis", [0, 1])
def test_merging_and_checkpoints_take_batched_statistics(tmp_path, layer_axis):
    from umtam_jax import checkpoint

    if layer_axis == 0:
        axes, move = umtam_jax.MatrixAxes(1, 1), lambda x: x
    else:  # [d_in, L, d_out]: statistics stored in the parameter's axis order
        axes, move = umtam_jax.MatrixAxes((1,), (0,)), lambda x: np.moveaxis(x, 0, 1)
    base, experts, stats = _trained_experts(axes, move)
    shape = move(np.zeros((3, 12, 10))).shape
    merged = merging.umtam(base, experts, stats, density=0.3)
    assert merged["w"].shape == shape and np.all(np.isfinite(merged["w"]))
    if layer_axis:  # the same merge as with the layer axis first, up to float32 rounding
        lead_inputs = _trained_experts(umtam_jax.MatrixAxes(1, 1), lambda x: x)
        lead = merging.umtam(*lead_inputs, density=0.3)
        np.testing.assert_allclose(merged["w"], move(lead["w"]), rtol=1e-5, atol=1e-6)
    # Per-matrix statistics restore from a checkpoint unchanged and merge identically.
    path = checkpoint.save_checkpoint(tmp_path / "e0", experts[0], statistics=stats[0])
    restored = checkpoint.restore_statistics(path)
    assert restored["w"].sigma.shape == stats[0]["w"].sigma.shape
    again = merging.umtam(base, experts, [restored, stats[1]], density=0.3)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(merged["w"]))
    # One curvature per matrix: scaling one matrix's gradients leaves the others' alone.
    curv = umtam_jax.curvature(stats[0])["w"]
    assert curv.shape == shape
    for i in range(3):
        row = np.asarray(stats[0]["w"].row, np.float64)
        col = np.asarray(stats[0]["w"].col, np.float64)
        if layer_axis:  # row (12, 3, 1), col (1, 3, 10)
            row, col, got = row[:, i, 0], col[0, i, :], np.asarray(curv)[:, i, :]
        else:
            row, col, got = row[i], col[i], np.asarray(curv)[i]
        assert _relative_error(got, np.outer(row, col) / row.sum()) < 1e-6


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


def test_parameter_ordered_statistics_are_validated_before_merging():
    axes, move = umtam_jax.MatrixAxes((1,), (0,)), lambda x: np.moveaxis(x, 0, 1)
    base, experts, stats = _trained_experts(axes, move)
    node = stats[1]["w"]
    bad_u = {"w": node._replace(u=node.u[..., :1])}  # rank 1 beside a rank-2 core
    with pytest.raises(ValueError, match=re.escape("statistics[1]['w'].v: expected (1, 3, 10, 1)")):
        merging.umtam(base, experts, [stats[0], bad_u], density=0.3)
    bad_row = {"w": node._replace(row=jnp.ones((12, 2, 1)))}  # 2 layers, not 3
    with pytest.raises(
        ValueError, match=re.escape("statistics shape mismatch at statistics[1]['w']")
    ):
        merging.umtam(base, experts, [stats[0], bad_row], density=0.3)
