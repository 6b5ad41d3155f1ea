"""EMR-merging against its float64 NumPy reference: the unified task vector, masks,
rescalers and task models, empty leaves, experts reconstructed exactly, sums that
overflow, and entries whose votes sum to zero."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from tests.merging.task_masks_helpers import _FLOAT32_TESTS, _assert_masks, ref_emr
from umtam_jax import merging


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


# ------------------------------------------------------------------------ EMR


@pytest.mark.parametrize("rescale", ["sum", "tensor_mean"])
def test_emr_matches_reference(rescale):
    base, experts = H.random_experts(np.random.default_rng(6), 4)
    emr = merging.emr_merge(base, experts, rescale=rescale)
    uni, masks, lam, models = ref_emr(base, experts, rescale)
    H.assert_tree_close(emr.unified, uni)
    for got, want in zip(emr.masks, masks, strict=True):
        _assert_masks(got, want)
    assert emr.rescalers.shape == (4,)
    np.testing.assert_allclose(np.asarray(emr.rescalers), lam, rtol=1e-12)
    for t in range(4):
        H.assert_tree_close(merging.emr_task_model(base, emr, t), models[t])
    H.assert_tree_close(merging.emr_task_model(base, emr, None), {
        p: H.f64(H.get(base, p)) + uni[p] for p in H.PATHS
    })  # fmt: skip


@pytest.mark.parametrize("rescale", ["sum", "tensor_mean"])
def test_emr_an_empty_leaf_changes_no_rescaler(rescale):
    """A (0, 3) tensor holds no parameter: its per-tensor mean (0/0) made every λ 1."""
    base, experts = H.random_experts(np.random.default_rng(6), 3)
    want = merging.emr_merge(base, experts, rescale=rescale).rescalers
    _, _, lam, _ = ref_emr(base, experts, rescale)
    np.testing.assert_allclose(np.asarray(want), lam, rtol=1e-6)
    empty = lambda t: {**t, "empty": np.zeros((0, 3), np.float32)}  # noqa: E731
    emr = merging.emr_merge(empty(base), [empty(e) for e in experts], rescale=rescale)
    np.testing.assert_array_equal(np.asarray(emr.rescalers), np.asarray(want))
    assert emr.unified["empty"].shape == (0, 3)
    got = merging.emr_task_model(empty(base), emr, np.int64(1))  # a NumPy index is an index
    assert got["empty"].shape == (0, 3)


def test_emr_one_or_identical_experts_are_reconstructed_exactly():
    rng = np.random.default_rng(7)
    base = H.build(lambda p, s, _: rng.integers(-8, 8, s) / 4.0)  # dyadic: exact arithmetic
    expert = H.build(lambda p, s, _: H.get(base, p) + rng.integers(-8, 8, s) / 8.0)
    for experts in ([expert], [expert] * 3):
        emr = merging.emr_merge(base, experts)
        np.testing.assert_array_equal(np.asarray(emr.rescalers), np.ones(len(experts)))
        for t in range(len(experts)):
            jax.tree.map(np.testing.assert_array_equal, merging.emr_task_model(base, emr, t),
                         expert)  # fmt: skip
    # an expert equal to the base: empty mask, rescaler 1, the base back
    emr = merging.emr_merge(base, [base, expert, expert])
    assert float(emr.rescalers[0]) == 1.0
    assert not any(bool(np.any(x)) for x in jax.tree.leaves(emr.masks[0]))
    jax.tree.map(np.testing.assert_array_equal, merging.emr_task_model(base, emr, 0), base)


def test_emr_sums_that_overflow_are_an_error_not_a_nan_rescaler():
    """Finite float32 task vectors whose Σ|τ_t| overflows gave NaN (or 0) rescalers, and
    emr_task_model then the base."""
    base = {"a": jnp.zeros((6, 4), jnp.float32)}
    big = {"a": jnp.full((6, 4), 2e37, jnp.float32)}
    for experts in ([big, big], [big, {"a": big["a"] / 2}]):
        with pytest.raises(
            ValueError, match=r"Σ\|τ_t\| .*overflowed although every input is finite"
        ):
            merging.emr_merge(base, experts)
    half = {"a": jnp.full((6, 4), -2e38, jnp.float32)}  # τ = 2e38 − (−2e38) overflows
    with pytest.raises(ValueError, match=r"τ_uni\['a'\] is not finite .*overflowed"):
        merging.emr_merge(half, [{"a": -half["a"]}])


def test_emr_zero_sum_entries_elect_nothing():
    base = {"w": jnp.zeros(3)}
    experts = [{"w": jnp.array([1.0, 2.0, -1.0])}, {"w": jnp.array([-1.0, 1.0, 3.0])}]
    emr = merging.emr_merge(base, experts)
    np.testing.assert_array_equal(np.asarray(emr.unified["w"]), [0.0, 2.0, 3.0])
    np.testing.assert_array_equal(np.asarray(emr.masks[0]["w"]), [False, True, False])
    np.testing.assert_allclose(np.asarray(emr.rescalers), [4.0 / 2.0, 5.0 / 5.0])


@pytest.mark.parametrize("scale", [1e-20, 1e15])
def test_emr_masks_and_rescalers_do_not_depend_on_the_scale(scale):
    """Masks compare signs: the product τ_t · τ_uni of float32 entries near 1e-20
    underflowed to 0, which left every mask empty and every λ at 1."""
    base = {"w": jnp.zeros(3, jnp.float32)}
    taus = [np.array([1.0, -2.0, 1.0]), np.array([3.0, 1.0, 1.0])]
    want = merging.emr_merge(base, [{"w": jnp.asarray(t, jnp.float32)} for t in taus])
    got = merging.emr_merge(base, [{"w": jnp.asarray(t * scale, jnp.float32)} for t in taus])
    for g, w in zip(got.masks, want.masks, strict=True):
        np.testing.assert_array_equal(g["w"], w["w"])
    assert np.asarray(got.masks[1]["w"]).tolist() == [True, False, True]
    np.testing.assert_allclose(np.asarray(got.rescalers), [2 / 3, 1.25], rtol=1e-6)
    # A restored result (a tuple, a dict) rebuilds the task models too.
    model = merging.emr_task_model(base, got, 1)
    for restored in (tuple(got), got._asdict()):
        np.testing.assert_array_equal(merging.emr_task_model(base, restored, 1)["w"], model["w"])
