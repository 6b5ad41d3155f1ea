"""The top-k keep masks of the sparsifying methods: exact counts, ties broken towards the
lower flat index, NaN and signed zeros ordered by their bits, per slice of a stacked leaf,
against NumPy's stable sort."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import umtam_jax
from tests.compilations import compilations
from tests.optimizer.platforms import take_default_branches
from umtam_jax import merging


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    data=st.data(),
    n=st.sampled_from([1, 6]),
    pool=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=4),
)
def test_topk_mask_matches_stable_argsort(data, n, pool):
    # Few distinct values (infinities included), so ties are common.
    from umtam_jax.merging._select import topk_mask

    idx = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    scores = np.asarray([pool[i] for i in idx], np.float32) + np.float32(0.0)  # no -0.0
    k = data.draw(st.integers(1, n))
    want = np.zeros(n, bool)
    want[np.argsort(-scores, kind="stable")[:k]] = True
    np.testing.assert_array_equal(np.asarray(topk_mask(jnp.asarray(scores), k)), want)
    with jax.enable_x64(True):
        got = topk_mask(jnp.asarray(scores.astype(np.float64)), k)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_an_empty_leaf_keeps_nothing_with_a_traced_count():
    """sce and breadcrumbs select with a traced count: an empty leaf divided by zero chunks."""
    from umtam_jax.merging import _select

    assert jax.jit(_select._topk_mask)(jnp.zeros((0, 3)), jnp.int32(2)).shape == (0, 3)
    base = {"w": jnp.zeros((0, 3)), "v": jnp.zeros(2)}
    experts = [{"w": jnp.zeros((0, 3)), "v": jnp.array([1.0, 2.0])},
               {"w": jnp.zeros((0, 3)), "v": jnp.array([3.0, -1.0])}]  # fmt: skip
    for merged in (
        merging.sce(base, experts, select_topk=0.5),
        merging.breadcrumbs(base, experts, density=0.5),
    ):
        assert merged["w"].shape == (0, 3)


# (k, chunk, narrow_up_to): one pass, or chunks (the last overlaps); the 8-bit digits of
# 1000 scores, or (narrow_up_to=0) the 16-bit ones of large leaves.
_KS = [1, 37, 500, 999, 1000, "boundary"]
_LARGE_CASES = [(k, chunk, 1 << 18) for k in _KS for chunk in [None, 7]]
_LARGE_CASES += [(k, None, 0) for k in [1, 500, 1000, "boundary"]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("k", "chunk", "narrow_up_to"), _LARGE_CASES)
def test_topk_mask_on_large_tensors_with_ties_nan_and_signed_zeros(
    retrace, dtype, k, chunk, narrow_up_to
):
    # 1000 scores from a few values: both the exact-fit path (every key equal to the k-th
    # largest is kept) and the tie-breaking path (only the first ones in flat order) occur.
    # Leaves beyond ``_CHUNK`` entries are read in chunks: small chunks take that path here.
    from umtam_jax.merging import _select

    retrace(_select, "_NARROW_DIGITS_UP_TO", narrow_up_to)

    def topk_mask(x, k):
        if chunk is None:
            return _select.topk_mask(x, k)
        return jax.jit(_select._topk_mask, static_argnums=(1, 2))(x, k, chunk)

    rng = np.random.default_rng(7)
    pool = np.asarray([np.nan, np.inf, 3.5, 1e-30, 0.0, -0.0, -2.0, -np.inf], dtype)
    scores = pool[rng.integers(0, len(pool), 1000)]
    scores[rng.integers(0, 1000, 200)] = rng.normal(size=200).astype(dtype)  # distinct ones
    if k == "boundary":  # the k-th largest is the last +inf: all its ties fit exactly
        k = int(np.isnan(scores).sum() + (scores == np.inf).sum())
    # Reference order: NaN first, then descending, -0.0 below +0.0, lower index first.
    order = sorted(
        range(scores.size),
        key=lambda i: (
            not np.isnan(scores[i]),
            0.0 if np.isnan(scores[i]) else -scores[i],
            bool(np.signbit(scores[i])),
            i,
        ),
    )
    want = np.zeros(scores.size, bool)
    want[order[:k]] = True
    with jax.enable_x64(dtype == np.float64):
        got = np.asarray(topk_mask(jnp.asarray(scores), k))
    assert got.sum() == k
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("selection", ["sorted", "mapped", "vmapped"])  # per slice
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(0,), (1,), (0, 2), (3,)])
def test_sliced_masks_match_topk_per_slice_with_ties_nan_and_signed_zeros(
    monkeypatch, retrace, selection, dtype, batch
):
    """A layout ``scope`` keeps, per slice over its batch axes (a layer of a stacked leaf),
    the mask ``topk_mask`` gives that slice alone (NaN first, −0.0 below +0.0, ties to the
    lower index within the slice), by each of its selections: sorted, or by the radix
    select one slice at a time (CPU) or all at once (GPU/TPU)."""
    from umtam_jax.merging import _select

    if selection == "vmapped":  # the radix select's GPU/TPU branch
        take_default_branches(monkeypatch)
    retrace(_select, "_SORTED_SLICE_SIZE", 1 << 16 if selection == "sorted" else 4)
    rng = np.random.default_rng(3)
    pool = np.asarray([np.nan, np.inf, 3.5, 0.0, -0.0, -2.0], dtype)
    scores = pool[rng.integers(0, len(pool), (2, 3, 4, 5))]
    scores[0, 0] = rng.normal(size=(4, 5)).astype(dtype)
    rest = [a for a in range(4) if a not in batch]
    moved = np.moveaxis(scores, batch, range(len(batch)))  # slices first, then the rest
    slices = moved.reshape(-1, *[scores.shape[a] for a in rest])
    k = max(1, int(0.3 * slices[0].size))
    with jax.enable_x64(dtype == np.float64):
        got = np.asarray(_select.sliced_mask(jnp.asarray(scores), 0.3, batch))
        want = np.stack([np.asarray(_select.topk_mask(jnp.asarray(x), k)) for x in slices])
    got_slices = np.moveaxis(got, batch, range(len(batch))).reshape(want.shape)
    np.testing.assert_array_equal(got_slices, want)
    assert (got_slices.reshape(len(slices), -1).sum(axis=1) == k).all()


@pytest.mark.parametrize("scope", ["tensor", "global", umtam_jax.scanned()])
def test_a_density_sweep_compiles_once(caplog, scope):
    """Each density is a new keep count, an argument of the compiled selection: a sweep
    (or a server merging with each request's density) compiles nothing after its first
    merge (each new count was compiled again, and kept, for the process's life)."""
    base = {"w": jnp.zeros((3, 8, 6)), "b": jnp.zeros((7,))}
    experts = [jax.tree.map(lambda x, i=i: x + jnp.sin(jnp.arange(x.size) + i).reshape(x.shape),
                            base) for i in range(2)]  # fmt: skip
    merging.ties(base, experts, density=0.2, scope=scope)
    with compilations(caplog) as compiled:
        for density in (0.3, 0.45, 0.6):
            merging.ties(base, experts, density=density, scope=scope)
    assert compiled == [], compiled[:3]


def test_a_stack_of_no_layers_merges_to_itself():
    """A scanned leaf with 0 layers: nothing to select, per layer or at all."""
    base = {"w": jnp.zeros((0, 4, 4))}
    experts = [{"w": jnp.zeros((0, 4, 4))}] * 2
    merged = merging.ties(base, experts, density=0.5, scope="layer")
    assert merged["w"].shape == (0, 4, 4)
