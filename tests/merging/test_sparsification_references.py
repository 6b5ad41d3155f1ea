"""Model Breadcrumbs, DELLA, SCE and RAM against the float64 NumPy references of
``sparsification_helpers``: their options, ties in the magnitude ranks, DELLA's keep
rates and documented draws, degenerate cases and option errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from tests.merging.sparsification_helpers import (
    _FLOAT32_TESTS,
    ref_breadcrumbs,
    ref_della,
    ref_ram,
    ref_sce,
)
from umtam_jax import merging

NEW = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl")


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


# ------------------------------------------------------------------------ against references


def test_registry_entries_match_their_functions():
    for name in NEW:
        m = merging.METHODS[name]
        assert m.fn is getattr(merging, name)
        assert name in merging.describe(m)
    assert merging.METHODS["della"].defaults()["epsilon"] == 0.15
    assert merging.METHODS["breadcrumbs"].defaults()["gamma"] == 0.01


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.5},
        {"density": [0.3, 0.9, 1.0], "gamma": 0.1, "scaling": 0.7, "weights": [1.0, -0.5, 2.0]},
        {"density": 0.6, "gamma": 0.5, "l1_rescale": True},  # n_bot = 0: outlier drop reduced
        {"density": 0.15, "gamma": 0.0},  # int(density · N) = 0 on small leaves: all dropped
    ],
)
def test_breadcrumbs_matches_reference(ties, kwargs):
    base, experts = H.random_experts(np.random.default_rng(1), 3)
    if ties:
        for normalize in (False, True):
            got = merging.breadcrumbs_ties(base, experts, normalize=normalize, **kwargs)
            want = ref_breadcrumbs(base, experts, consensus=True, normalize=normalize, **kwargs)
            H.assert_tree_close(got, want)
    else:
        H.assert_tree_close(
            merging.breadcrumbs(base, experts, **kwargs), ref_breadcrumbs(base, experts, **kwargs)
        )


def test_breadcrumbs_equal_magnitudes_lower_index_ranks_higher():
    base = {"w": jnp.zeros(6)}
    experts = [{"w": jnp.array([2.0, -2.0, 2.0, 1.0, -1.0, 1.0])}]
    # N = 6: drop int(0.2·6) = 1 largest (the first 2), keep int(0.5·6) = 3 next.
    got = merging.breadcrumbs(base, experts, density=0.5, gamma=0.2)["w"]
    np.testing.assert_array_equal(got, [0.0, -2.0, 2.0, 1.0, 0.0, 0.0])
    # quantized task vectors: many ties inside and across the window
    rng = np.random.default_rng(2)
    base, experts = H.random_experts(rng, 2)
    experts = [jax.tree.map(lambda b: b + 0.5 * rng.integers(-2, 3, np.shape(b)), base)] * 2
    kwargs = {"density": 0.4, "gamma": 0.2, "weights": [1.0, 0.5]}
    H.assert_tree_close(
        merging.breadcrumbs(base, experts, **kwargs), ref_breadcrumbs(base, experts, **kwargs)
    )


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.5},
        {"density": [0.3, 0.7, 1.0], "epsilon": 0.2, "weights": [1.0, 2.0, -0.5], "scaling": 0.8},
        {"density": 0.4, "epsilon": 0.0, "rescale": False},
        {"density": 0.6, "epsilon": 0.3, "l1_rescale": True},
    ],
)
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_della_matches_reference_given_the_documented_draws(linear, kwargs, layout):
    base, experts = H.random_experts(np.random.default_rng(3), 3)
    key = jax.random.key(7)
    kwargs = {**kwargs, "layout": layout}
    if linear:
        got = merging.della_linear(base, experts, key=key, **kwargs)
        H.assert_tree_close(got, ref_della(base, experts, key, consensus=False, **kwargs))
        return
    for normalize in (False, True):
        got = merging.della(base, experts, key=key, normalize=normalize, **kwargs)
        want = ref_della(base, experts, key, normalize=normalize, **kwargs)
        H.assert_tree_close(got, want)


@pytest.mark.parametrize("linear", [False, True])
def test_della_per_slice_matches_reference_given_the_documented_draws(linear):
    """A layout ``scope``: each slice ranked and drawn as a leaf of its own, slice i with
    ``fold_in(leaf_key, i)`` (a stacked ``(L, d)`` bias ranked per layer)."""
    base, experts = H.random_experts(np.random.default_rng(4), 3)
    key, kwargs = jax.random.key(8), {"density": 0.5, "epsilon": 0.2}
    fn = merging.della_linear if linear else merging.della
    got = fn(base, experts, key=key, scope=H.sliced_scope, **kwargs)
    want = ref_della(base, experts, key, consensus=not linear, normalize=not linear,
                     sliced=True, **kwargs)  # fmt: skip
    H.assert_tree_close(got, want)
    raw = jax.random.key_data(key)  # a raw uint32 key draws the same
    H.assert_tree_close(fn(base, experts, key=raw, scope=H.sliced_scope, **kwargs), want)


def test_della_keep_rates_follow_the_magnitude_ranks():
    # one 200×400 PyTorch-layout leaf, |Δ| distinct: rows of 400 ranked independently
    rng = np.random.default_rng(4)
    delta = rng.permuted(np.tile(np.arange(1.0, 401.0), (200, 1)), axis=1)
    base, expert = {"w": jnp.zeros((200, 400))}, {"w": jnp.asarray(delta)}
    d, eps = 0.4, 0.2
    kept = []
    for t, key in enumerate([jax.random.key(0), jax.random.key(1)]):
        out = merging.della_linear(
            base, [expert], density=d, epsilon=eps, key=key, rescale=False, layout="out_in"
        )
        kept.append(np.asarray(out["w"]) != 0)
        assert abs(kept[t].mean() - d) < 0.01  # mean keep probability: the density
        low, high = kept[t][delta <= 40].mean(), kept[t][delta > 360].mean()
        assert abs(low - (d - 0.9 * eps)) < 0.02 and abs(high - (d + 0.9 * eps)) < 0.02
    assert (kept[0] != kept[1]).mean() > 0.3  # another key, another draw
    # two leaves of the same shape get different draws (the key depends on the path)
    out = merging.della_linear({"a": base["w"], "b": base["w"]}, [{"a": delta, "b": delta}],
                               density=d, key=jax.random.key(0), rescale=False)  # fmt: skip
    assert (np.asarray(out["a"]) != np.asarray(out["b"])).mean() > 0.3


def test_della_degenerate_cases():
    base, experts = H.random_experts(np.random.default_rng(5), 3)
    key = jax.random.key(0)
    # density 1: nothing dropped (della = ties without trimming, della_linear = TA)
    H.assert_tree_close(merging.della(base, experts, density=1.0, key=key),
                        H.ref_ties(base, experts, density=1.0))  # fmt: skip
    H.assert_tree_close(merging.della_linear(base, experts, density=1.0, key=key, scaling=0.5),
                        H.ref_task_arithmetic(base, experts, scaling=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="density ± epsilon"):
        merging.della(base, experts, density=0.1, key=key)  # 0.1 - 0.15 <= 0
    with pytest.raises(ValueError, match="density ± epsilon"):
        merging.della_linear(base, experts, density=[0.5, 0.9, 0.5], epsilon=0.1, key=key)
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0.0, inf\]"):
        merging.della(base, experts, density=0.5, epsilon=-0.1, key=key)
    # Anything but one key (an int seed, a batch of keys) is named as the key's error.
    for bad in (None, 0, jax.random.split(key, 2)):
        with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
            merging.della(base, experts, density=0.5, key=bad)
    legacy = jax.random.PRNGKey(0)  # raw uint32 keys are keys too
    merging.della(base, experts, density=0.5, epsilon=0.05, key=legacy)
    with jax.default_prng_impl("rbg"):  # uint32[4] (a TPU setting)
        merging.della(base, experts, density=0.5, epsilon=0.05, key=jax.random.PRNGKey(0))


def test_traced_options_must_be_scalars():
    """Under ``jit`` an option's value is unknown but its shape is not: an array where a
    number belongs is an error naming it, not a broadcast merged leaf of another shape."""
    base, experts = {"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}, {"w": -jnp.ones(4)}]
    merge = jax.jit(lambda s: merging.task_arithmetic(base, experts, scaling=s))
    assert merge(jnp.float32(0.5))["w"].shape == (4,)
    with pytest.raises(TypeError, match=r"scaling must be a scalar, got a traced array of shape"):
        merge(jnp.ones((2, 1)))
    with pytest.raises(TypeError, match=r"t must be a scalar"):
        jax.jit(lambda t: merging.slerp(base, experts, t=t))(jnp.ones((3, 1)))


def test_della_with_zero_epsilon_draws_dare_masks():
    # ε = 0: every keep probability is the density, and the draw is DARE's
    rng = np.random.default_rng(6)
    base = {"a": {"w": np.zeros((4, 50), np.float32)}}
    experts = [{"a": {"w": rng.standard_normal((4, 50)).astype(np.float32)}} for _ in range(2)]
    key = jax.random.key(11)
    for rescale in (False, True):  # the same masks; rescaled equal up to rounding
        got = merging.della_linear(
            base, experts, density=0.3, epsilon=0.0, key=key, rescale=rescale
        )
        want = merging.dare(base, experts, density=0.3, key=key, rescale=rescale)
        np.testing.assert_allclose(
            got["a"]["w"], want["a"]["w"], rtol=0, atol=1e-5 if rescale else 0
        )
        assert 0.4 < np.mean(np.asarray(got["a"]["w"]) != 0) < 0.62  # 1 − 0.7²


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_reference(select_topk):
    base, experts = H.random_experts(np.random.default_rng(7), 3)
    for scaling in (1.0, 0.6):
        got = merging.sce(base, experts, select_topk=select_topk, scaling=scaling)
        H.assert_tree_close(got, ref_sce(base, experts, select_topk=select_topk, scaling=scaling))


def test_sce_degenerate_cases():
    rng = np.random.default_rng(8)
    base, experts = H.random_experts(rng, 2)
    # tiny task vectors: Σ mean(Δ²) < 1e-6 gives uniform weights
    tiny = [jax.tree.map(lambda b, e: b + 1e-4 * (e - b), base, e) for e in experts]
    for s in (1.0, 0.5):
        H.assert_tree_close(merging.sce(base, tiny, select_topk=s),
                            ref_sce(base, tiny, select_topk=s))  # fmt: skip
    # one expert: zero variance everywhere, so a selection keeps nothing
    H.assert_tree_close(merging.sce(base, experts[:1]), ref_sce(base, experts[:1]))
    out = merging.sce(base, experts[:1], select_topk=0.5)
    chex.assert_trees_all_equal(out, base)
    with pytest.raises(ValueError, match="select_topk must lie in"):
        merging.sce(base, experts, select_topk=1.5)


@pytest.mark.parametrize("k", [3, 5, 6, 7])
def test_sce_counts_entries_where_every_expert_agrees_as_zero_variance(k):
    """Where every expert moved an entry alike its variance is 0, so the selection never
    keeps it and counts only the others (float32's variance of k equal values is not 0
    for these k)."""
    rng = np.random.default_rng(k)
    base = np.zeros(1000, np.float32)
    shared = rng.normal(size=1000).astype(np.float32)
    experts = [base + shared for _ in range(k)]
    for e in experts:  # they disagree on the first 200 entries only
        e[:200] += rng.normal(size=200).astype(np.float32)
    out = np.asarray(merging.sce({"x": base}, [{"x": e} for e in experts], select_topk=0.5)["x"])
    np.testing.assert_array_equal(out[200:], base[200:])  # never selected
    assert np.count_nonzero(out[:200]) <= 100  # ⌊200 · 0.5⌋ of the nonzero variances


@pytest.mark.parametrize("epsilon", [1e-5, 0.05, 10.0])
def test_ram_matches_reference(epsilon):
    rng = np.random.default_rng(9)
    base, experts = H.random_experts(rng, 3)
    # many entries unchanged by one or more experts: unique, shared and empty entries
    experts = [
        jax.tree.map(lambda b, e: np.where(rng.random(np.shape(b)) < 0.5, b, e), base, e)
        for e in experts
    ]
    got = merging.ram(base, experts, epsilon=epsilon, scaling=0.9)
    H.assert_tree_close(got, ref_ram(base, experts, epsilon=epsilon, scaling=0.9))
    for r, alpha in ((0.1, 0.2), (0.5, 3.0)):
        got = merging.ramplus_tl(base, experts, r=r, alpha=alpha, epsilon=epsilon)
        H.assert_tree_close(got, ref_ram(base, experts, epsilon=epsilon, r=r, alpha=alpha))


def test_ramplus_tl_with_zero_epsilon_and_an_expert_that_changed_nothing():
    """mergekit's s/max(u, 0) is 0/0 for an expert with no counted entries, and its whole
    merged tensor NaN; here that expert's λ is 1 (it scales no entry anyway)."""
    base = {"w": np.zeros(3)}
    experts = [{"w": np.array([1.0, 2.0, 0.0])}, {"w": np.array([0.0, 4.0, 0.0])}, base]
    got = merging.ramplus_tl(base, experts, r=0.1, alpha=0.2, epsilon=0.0)
    # entry 0: expert 0's alone, λ = 1 + 0.1·min(1/1, 0.2); entry 1 shared: the mean
    np.testing.assert_allclose(np.asarray(got["w"]), [1.02, 3.0, 0.0], rtol=1e-6)


def test_option_errors():
    base, experts = H.random_experts(np.random.default_rng(10), 2)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0.0, 1.0\]"):
        merging.breadcrumbs(base, experts, density=0.5, gamma=1.5)
    with pytest.raises(ValueError, match="density must lie in"):
        merging.breadcrumbs_ties(base, experts, density=0.0)
    with pytest.raises(TypeError, match="gamma must be a static"):
        jax.jit(lambda g: merging.breadcrumbs(base, experts, density=0.5, gamma=g))(0.1)
    with pytest.raises(ValueError, match="epsilon must lie in"):
        merging.ram(base, experts, epsilon=-1.0)
    with pytest.raises(TypeError, match="unexpected parameters"):
        merging.merge("sce", base, experts, weights=[1.0, 1.0])


def test_dare_with_a_density_below_float32_keeps_nothing_instead_of_nan():
    """``density=1e-50`` is valid but 0 in float32: nothing is kept (the base comes back),
    eagerly and under ``jit``, instead of 0 / 0 in the dropped entries' rescale."""
    w = jnp.ones(64, jnp.float32)
    base, experts = {"w": 0 * w}, [{"w": w}, {"w": -2 * w}]
    key = jax.random.key(0)
    for fn in (merging.dare, jax.jit(merging.dare, static_argnames="density")):
        np.testing.assert_array_equal(fn(base, experts, density=1e-50, key=key)["w"], base["w"])
