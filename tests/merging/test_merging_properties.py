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
