"""Hypothesis property tests of the merging library (float32, the library's default)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import umtam_jax
from tests.compilations import compilations
from umtam_jax import merging

from . import helpers as H

# Few examples: each new (shape, number of experts) compiles the per-leaf kernels.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
densities = st.sampled_from([0.05, 0.2, 0.5, 0.9, 1.0])
scopes = st.sampled_from(["tensor", "layer", "global", H.sliced_scope])
bools = st.booleans()


def _f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _inputs(seed, k):
    rng = np.random.default_rng(seed)
    base, experts = H.random_experts(rng, k, dtype=np.float32)
    stats = H.random_statistics(rng, k, dtype=np.float32)
    return rng, base, experts, stats


# float32 results against each other or a float32 expectation.
_close = functools.partial(chex.assert_trees_all_close, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    seed=seeds,
    k=st.just(3),
    density=densities,
    scope=scopes,
    flags=st.tuples(bools, bools, bools),
    normalize=st.sampled_from(["all", "selected"]),
    data=st.data(),
)
def test_permutation_invariance(seed, k, density, scope, flags, normalize, data):
    _, base, experts, stats = _inputs(seed, k)
    perm = data.draw(st.permutations(range(k)))
    pe, ps = [experts[i] for i in perm], [stats[i] for i in perm]
    kw = dict(
        density=density,
        scope=scope,
        normalize=normalize,
        curvature_pruning=flags[0],
        sign_election=flags[1],
        curvature_aggregation=flags[2],
    )
    _close(merging.umtam(base, experts, stats, **kw), merging.umtam(base, pe, ps, **kw))
    _close(
        merging.ties(base, experts, density=density, scope=scope),
        merging.ties(base, pe, density=density, scope=scope),
    )
    _close(merging.task_arithmetic(base, experts), merging.task_arithmetic(base, pe))
    curv = [
        H.build(lambda p, s, _, g=g: np.abs(g.standard_normal(s)).astype(np.float32))
        for g in [np.random.default_rng(seed + i) for i in range(k)]
    ]
    pc = [curv[i] for i in perm]
    _close(merging.ota(base, experts, curv), merging.ota(base, pe, pc))
    _close(merging.fisher(base, experts, curv), merging.fisher(base, pe, pc))


@SETTINGS
@given(seed=seeds, k=st.sampled_from([1, 2, 3]), flags=st.tuples(bools, bools, bools), scope=scopes)
def test_copies_of_one_expert_merge_to_that_expert(seed, k, flags, scope):
    _, base, (expert,), (stats,) = _inputs(seed, 1)
    experts, all_stats = [expert] * k, [stats] * k
    _close(merging.task_arithmetic(base, experts, scaling=1.0 / k), expert)
    _close(merging.ties(base, experts, density=1.0, scope=scope), expert)
    _close(
        merging.dare_ties(base, experts, density=1.0, key=jax.random.key(seed), normalize=True),
        expert,
    )
    curv = [H.build(lambda p, s, _: np.ones(s, np.float32))] * k
    _close(merging.fisher(base, experts, curv), expert)
    _close(merging.ota(base, experts, curv), expert)
    kw = dict(
        curvature_pruning=flags[0],
        sign_election=flags[1],
        curvature_aggregation=flags[2],
        normalize="selected",
        scope=scope,
    )
    _close(merging.umtam(base, experts, all_stats, density=1.0, **kw), expert)


@SETTINGS
@given(seed=seeds, k=st.sampled_from([1, 2, 3]), density=densities, scope=scopes, pruning=bools)
def test_copies_at_lower_density_equal_pruning(seed, k, density, scope, pruning):
    # K copies keep exactly the pruned expert: TIES = magnitude pruning; UMTAM with
    # normalize="selected" = pruning by its importance (saliency or |Δ|).
    _, base, (expert,), (stats,) = _inputs(seed, 1)
    experts, all_stats = [expert] * k, [stats] * k
    _close(
        merging.ties(base, experts, density=density, scope=scope),
        merging.prune(base, expert, None, density=density, scope=scope),
    )
    got = merging.umtam(
        base,
        experts,
        all_stats,
        density=density,
        scope=scope,
        normalize="selected",
        curvature_pruning=pruning,
    )
    want = merging.prune(base, expert, stats if pruning else None, density=density, scope=scope)
    _close(got, want)


@SETTINGS
@given(
    seed=seeds,
    k=st.sampled_from([1, 2, 3]),
    pruning=bools,
    normalize=st.sampled_from(["all", "selected"]),
    scope=scopes,
)
def test_density_one_without_election_and_curvature_is_the_mean(seed, k, pruning, normalize, scope):
    _, base, experts, stats = _inputs(seed, k)
    got = merging.umtam(
        base,
        experts,
        stats,
        density=1.0,
        sign_election=False,
        curvature_aggregation=False,
        curvature_pruning=pruning,
        normalize=normalize,
        scope=scope,
    )
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *experts)
    _close(got, mean)


@SETTINGS
@given(seed=seeds, density=densities, scope=scopes, levels=st.integers(1, 3))
def test_keep_counts_exact_with_tied_scores(seed, density, scope, levels):
    rng = np.random.default_rng(seed)
    # Dyadic values, so that every |Δ| is exactly 1 in float32 (all magnitudes tie).
    base = jax.tree.map(lambda x: np.round(x * 64) / 64, H.random_params(rng, dtype=np.float32))
    # Every entry moves, so a kept entry differs from the base.
    expert = jax.tree.map(lambda x: x + np.float32(1.0), base)
    scores = H.build(lambda p, s, _: rng.integers(0, levels, s).astype(np.float32))
    out = merging.prune(base, expert, scores, density=density, scope=scope)
    kept = {p: np.asarray(H.get(out, p)) != H.get(base, p) for p in H.PATHS}
    # Exact counts (per tensor, slice or expert), ties to the lower flat index.
    (want,) = H.ref_masks([{p: H.get(scores, p) for p in H.PATHS}], [density], scope)
    for p in H.PATHS:
        np.testing.assert_array_equal(kept[p], want[p], err_msg=str(p))
    # All |Δ| equal: TIES keeps a prefix of the stable order in each counted unit.
    ties_out = merging.ties(base, [expert], density=density, scope=scope)
    (want,) = H.ref_masks([{p: np.ones(np.shape(H.get(base, p))) for p in H.PATHS}], [density],
                          scope)  # fmt: skip
    for p in H.PATHS:
        np.testing.assert_array_equal(
            np.asarray(H.get(ties_out, p)) != H.get(base, p), want[p], err_msg=str(p)
        )


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=seeds, k=st.just(2))
def test_inputs_are_not_modified(seed, k):
    _, base, experts, stats = _inputs(seed, k)

    def freeze(tree):
        def ro(x):
            x = np.array(x)
            x.flags.writeable = False
            return x

        return jax.tree.map(ro, tree)

    base, experts, stats = freeze(base), [freeze(e) for e in experts], [freeze(s) for s in stats]
    copies = jax.tree.map(np.copy, (base, experts, stats))
    key = jax.random.key(seed)
    merging.umtam(base, experts, stats, density=0.3)
    merging.ties(base, experts, density=0.3)
    merging.dare(base, experts, density=0.3, key=key)
    merging.dare_ties(base, experts, density=0.3, key=key)
    merging.task_arithmetic(base, experts)
    merging.ota(base, experts, stats)
    merging.prune(base, experts[0], stats[0], density=0.3)
    after = (base, experts, stats)
    chex.assert_trees_all_equal(copies, after)


def test_jit_matches_eager():
    _, base, experts, stats = _inputs(0, 3)
    static = (
        "density",
        "curvature_pruning",
        "sign_election",
        "curvature_aggregation",
        "normalize",
        "scope",
    )
    fn = jax.jit(merging.umtam, static_argnames=static)
    _close(
        fn(base, experts, stats, density=0.3, normalize="selected"),
        merging.umtam(base, experts, stats, density=0.3, normalize="selected"),
    )
    fn = jax.jit(
        merging.dare_ties, static_argnames=("density", "rescale", "l1_rescale", "normalize")
    )
    key = jax.random.key(1)
    _close(
        fn(base, experts, density=0.5, key=key),
        merging.dare_ties(base, experts, density=0.5, key=key),
    )


def test_dare_per_leaf_equals_whole_tree():
    _, base, experts, _ = _inputs(1, 2)
    key = jax.random.key(3)
    whole = merging.dare(base, experts, density=0.5, key=key)
    for p in H.PATHS:
        sub = lambda t, p=p: {p[0]: {p[1]: H.get(t, p)}}  # noqa: E731
        part = merging.dare(sub(base), [sub(e) for e in experts], density=0.5, key=key)
        np.testing.assert_array_equal(np.asarray(H.get(part, p)), np.asarray(H.get(whole, p)))


def test_float16_roundtrip_dtype():
    _, base, experts, stats = _inputs(2, 2)
    half = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), t)  # noqa: E731
    out = merging.umtam(half(base), [half(e) for e in experts], stats, density=0.5)
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "fisher", "regmean", "umtam"])
def test_float8_inputs_merge_in_float32_and_cast_back(method):
    """JAX promotes no 8-bit float implicitly: the merge computes in float32 explicitly,
    as for 16-bit floats, and returns the base's float8 dtype."""
    rng = np.random.default_rng(0)
    f8 = jnp.float8_e4m3fn
    base = {"w": rng.normal(size=(4, 3)).astype(f8)}
    experts = [{"w": rng.normal(size=(4, 3)).astype(f8)} for _ in range(2)]
    wide = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    m = merging.METHODS[method]
    extra = None
    if m.extra == "statistics":
        extra = [umtam_jax.statistics(_trained_state(e)) for e in experts]
    elif m.extra in ("fishers", "curvatures"):
        extra = [{"w": jnp.ones((4, 3), jnp.float32)} for _ in experts]
    elif m.extra == "grams":
        extra = [{"w": jnp.eye(4, dtype=jnp.float32)} for _ in experts]
    kwargs = {"density": 0.5} if method in ("ties", "umtam") else {}
    got = merging.merge(method, base, experts, extra, **kwargs)
    want = merging.merge(method, wide(base), [wide(e) for e in experts], extra, **kwargs)
    assert got["w"].dtype == f8
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]).astype(f8))


def _trained_state(params):
    opt = umtam_jax.umtam(1e-2, rank=1, min_dim_size_to_factor=2)
    wide = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return opt.update(wide, opt.init(wide), wide)[1]


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


@pytest.mark.parametrize("chunk", [None, 7])  # one pass, or chunks (the last overlaps)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 37, 500, 999, 1000, "boundary"])
def test_topk_mask_on_large_tensors_with_ties_nan_and_signed_zeros(dtype, k, chunk):
    # 1000 scores from a few values: both the exact-fit path (every key equal to the k-th
    # largest is kept) and the tie-breaking path (only the first ones in flat order) occur.
    # Leaves beyond ``_CHUNK`` entries are read in chunks: small chunks take that path here.
    from umtam_jax.merging import _select

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


@pytest.mark.parametrize("sorted_up_to", [1 << 16, 4])  # sorted per slice / radix, mapped
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(0,), (1,), (0, 2), (3,)])
def test_sliced_masks_match_topk_per_slice_with_ties_nan_and_signed_zeros(
    monkeypatch, sorted_up_to, dtype, batch
):
    """A layout ``scope`` keeps, per slice over its batch axes (a layer of a stacked leaf),
    the mask ``topk_mask`` gives that slice alone (NaN first, −0.0 below +0.0, ties to the
    lower index within the slice), by either of its two selections."""
    from umtam_jax.merging import _select

    monkeypatch.setattr(_select, "_SORTED_SLICE_SIZE", sorted_up_to)
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
