"""How a leaf is viewed as a stack of matrices: ``row_axes`` callables and ``scanned``
(the layer axis anywhere), Flax attention kernels, and invalid or negative ``MatrixAxes``
named with their leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import umtam_jax
from tests.optimizer.reference import FactoredReference, Hyper


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
        (umtam_jax.MatrixAxes(1.5, 1), "counts in \\[0, 3\\] or tuples"),
        (umtam_jax.MatrixAxes((0,), ("a",)), "counts in \\[0, 3\\] or tuples"),
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
