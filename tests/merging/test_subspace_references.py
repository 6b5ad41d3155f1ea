"""TSV-Merge, Iso-C and Iso-CTS against their float64 NumPy references: in float64, float32
and bfloat16, with TSV's rank fraction counted as written, and on the matrices of Flax
attention kernels and of scanned stacks (a layer axis not first, a stacked kernel named
``out``)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests.merging.subspace_helpers import (
    CASES,
    FLOAT32,
    REFS,
    SHAPES,
    _assert_close,
    _random,
    _reference,
    ref_tsv,
)
from umtam_jax import merging


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_tsv_rank_fraction_counts_as_written(x64):
    """``k = ⌊r · rank_fraction / T⌋`` with the decimal fraction: r = 10, T = 3 and
    ``rank_fraction=0.6`` keep 2 directions per task (``10 * (0.6 / 3)`` is 1.999…), so
    the merged task vector has rank 6, as the float64 reference."""
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((10, 12))}
    experts = [{"w": base["w"] + rng.standard_normal((10, 12))} for _ in range(3)]
    got = np.asarray(merging.tsv_merge(base, experts, rank_fraction=0.6)["w"]) - base["w"]
    assert np.linalg.matrix_rank(got) == 6
    want = ref_tsv(base["w"], [e["w"] for e in experts], rank_fraction=0.6) - base["w"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,k,kwargs", CASES)
def test_matches_float64_reference(x64, name, k, kwargs):
    base, experts = _random(np.random.default_rng(k + len(kwargs)), k)
    got = getattr(merging, name)(base, experts, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(base)
    _assert_close(got, _reference(name, base, experts, kwargs), 1e-9, 1e-10)
    by_name = merging.merge(name, base, experts, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, by_name, got)


@pytest.mark.parametrize("name,kwargs", FLOAT32)
def test_float32_within_float32_tolerance(name, kwargs):
    base, experts = _random(np.random.default_rng(7), 2, np.float32)
    got = getattr(merging, name)(base, experts, **kwargs)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
    _assert_close(got, _reference(name, base, experts, kwargs), 1e-4, 2e-5)


@pytest.mark.parametrize("name", list(REFS))
def test_bfloat16_computed_in_float32_and_cast_back(name):
    base, experts = _random(np.random.default_rng(3), 2, np.float32)
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    got = getattr(merging, name)(cast(base), [cast(e) for e in experts])
    up = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
    want = getattr(merging, name)(up(cast(base)), [up(cast(e)) for e in experts])
    for n in SHAPES:
        assert got[n].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[n], jnp.asarray(want[n], jnp.bfloat16), err_msg=n)


# ------------------------------------------------------------------ layers


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("tsv_merge", {"rank_fraction": 0.6}),
        ("iso_c", {}),
        ("iso_cts", {"common_space_fraction": 0.5}),
    ],
)
def test_scanned_scope_merges_a_layer_axis_not_first_as_the_unrolled_model(x64, name, kwargs):
    """A ``[d_in, L, d_out]`` stack (MaxText's layer axis second) and its ``[d, L]`` bias:
    with ``scope=umtam_jax.scanned("blocks", axis=1)`` each layer is merged as its own
    matrix (by default the stack's last two axes, ``(L, d_out)``, would be the matrices)."""
    rng = np.random.default_rng(5)
    shapes = {"kernel": (6, 3, 5), "bias": (5, 3)}
    base = {"blocks": {n: rng.standard_normal(s) for n, s in shapes.items()}}
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape), base) for _ in range(3)]
    merge = getattr(merging, name)
    got = merge(base, experts, scope=umtam_jax.scanned("blocks", axis=1), **kwargs)
    for i in range(3):

        def layer(t, i=i):
            return jax.tree.map(lambda x: np.take(np.asarray(x), i, axis=1), t)

        alone = merge(layer(base), [layer(e) for e in experts], **kwargs)
        chex.assert_trees_all_close(layer(got), alone, rtol=1e-10, atol=1e-12)
    per_stack = merge(base, experts, **kwargs)["blocks"]["kernel"]
    assert not np.allclose(per_stack, got["blocks"]["kernel"])


@pytest.mark.parametrize("name,k,kwargs", CASES)
def test_flax_attention_kernels_are_merged_as_their_projection_matrices(x64, name, k, kwargs):
    """``nnx.MultiHeadAttention``'s ``query`` kernel ``(in, heads, head_dim)`` is the
    matrix ``(in, heads·head_dim)`` and its ``out`` kernel ``(heads, head_dim, out)`` the
    matrix ``(heads·head_dim, out)``, as FusionBench decomposes ``q_proj``/``o_proj``;
    per layer of a scanned stack of them with a scanned scope."""
    rng = np.random.default_rng(11)
    shapes = {"query": ((6, 2, 3), (6, 6)), "out": ((2, 3, 6), (6, 6))}
    base = {"attn": {n: {"kernel": rng.standard_normal(s)} for n, (s, _) in shapes.items()}}
    base["attn"]["query"]["bias"] = rng.standard_normal((2, 3))  # (heads, head_dim)
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape), base) for _ in range(k)]
    merge = getattr(merging, name)
    got = merge(base, experts, **kwargs)
    b0 = base["attn"]["query"]["bias"]
    mean = sum(e["attn"]["query"]["bias"] - b0 for e in experts) / k  # a vector: the mean
    np.testing.assert_allclose(
        got["attn"]["query"]["bias"], b0 + kwargs.get("scaling", 1.0) * mean, rtol=1e-12
    )
    for n, (shape, matrix) in shapes.items():
        ws = [e["attn"][n]["kernel"].reshape(matrix) for e in experts]
        want = REFS[name](base["attn"][n]["kernel"].reshape(matrix), ws, **kwargs)
        np.testing.assert_allclose(
            got["attn"][n]["kernel"], want.reshape(shape), rtol=1e-9, atol=1e-10, err_msg=n
        )
    stacked = [jax.tree.map(lambda *xs: np.stack(xs), t, t) for t in (base, *experts)]
    layers = merge(stacked[0], stacked[1:], scope=umtam_jax.scanned("attn"), **kwargs)
    for i in range(2):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], layers), got, rtol=1e-10, atol=1e-12
        )


def test_a_stacked_kernel_named_out_is_merged_per_layer():
    """``(L, in, out)`` under ``out`` with ``L · in ≠ out`` is a stack (an ``nn.scan``-ned
    Dense), merged per layer as other stacks, not as one attention matrix."""
    rng = np.random.default_rng(16)
    base = {"blocks": {"out": {"kernel": rng.standard_normal((3, 4, 5)).astype("f4")}}}
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype("f4"), base)]
    experts.append(jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype("f4"), base))
    got = merging.iso_c(base, experts)["blocks"]["out"]["kernel"]
    for i in range(3):
        alone = merging.iso_c(
            {"w": base["blocks"]["out"]["kernel"][i]},
            [{"w": e["blocks"]["out"]["kernel"][i]} for e in experts],
        )["w"]
        np.testing.assert_allclose(got[i], alone, rtol=1e-6, atol=1e-6)
