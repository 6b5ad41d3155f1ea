"""TALL masks and consensus merging (consensus TA and consensus TIES) against their float64
NumPy references, their degenerate cases, applying a task's mask, and packing masks to
bits and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from tests.merging.task_masks_helpers import (
    _FLOAT32_TESTS,
    _assert_masks,
    _taus,
    ref_consensus,
    ref_tall,
)
from umtam_jax import merging


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


# ------------------------------------------------------------------------ TALL, consensus


@pytest.mark.parametrize("lambdas", [0.4, [0.2, 0.6, 1.0], 0.0])
def test_tall_masks_match_reference(lambdas):
    base, experts = H.random_experts(np.random.default_rng(0), 3)
    got = merging.tall_masks(base, experts, lambdas=lambdas)
    want = ref_tall(base, experts, lambdas)
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        _assert_masks(g, w)
    # a given merged model: its task vector is τ_MTL
    merged = merging.task_arithmetic(base, experts, scaling=0.5)
    mtl = {p: H.f64(H.get(merged, p)) - H.f64(H.get(base, p)) for p in H.PATHS}
    got = merging.tall_masks(base, experts, lambdas=lambdas, merged=merged)
    for g, w in zip(got, ref_tall(base, experts, lambdas, mtl), strict=True):
        _assert_masks(g, w)
    if lambdas == 0.0:  # |τ_t| ≥ 0: every entry
        assert all(bool(np.all(x)) for m in got for x in jax.tree.leaves(m))


def test_apply_task_mask_reconstructs_the_tasks_model():
    base, experts = H.random_experts(np.random.default_rng(1), 3)
    merged = merging.task_arithmetic(base, experts, scaling=0.4)
    for mask in merging.tall_masks(base, experts, lambdas=[0.3, 0.5, 0.4]):
        got = merging.apply_task_mask(base, merged, mask)
        H.assert_tree_close(got, {
            p: np.where(H.get(mask, p), H.f64(H.get(merged, p)), H.f64(H.get(base, p)))
            for p in H.PATHS
        })  # fmt: skip


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("lambdas", [0.4, [0.2, 0.5, 0.8]])
def test_consensus_matches_reference(k, lambdas):
    base, experts = H.random_experts(np.random.default_rng(2), 3)
    for scaling in (1.0, 0.3):
        got = merging.consensus(base, experts, k=k, lambdas=lambdas, scaling=scaling)
        want = ref_consensus(base, experts, k=k, lambdas=lambdas, scaling=scaling)
        H.assert_tree_close(got, want)
        by_name = merging.merge("consensus", base, experts, k=k, lambdas=lambdas, scaling=scaling)
        jax.tree.map(np.testing.assert_array_equal, by_name, got)


@pytest.mark.parametrize(
    "ties",
    [
        {"density": 0.5},
        {"density": 0.8, "normalize": True},
        {"density": 0.2, "scope": "global"},
    ],
)
@pytest.mark.parametrize("k", [1, 2])
def test_consensus_ties_matches_reference(ties, k):
    base, experts = H.random_experts(np.random.default_rng(3), 3)
    got = merging.consensus_ties(base, experts, k=k, lambdas=[0.3, 0.4, 0.5], scaling=0.7, **ties)
    want = ref_consensus(base, experts, k=k, lambdas=[0.3, 0.4, 0.5], scaling=0.7, ties=ties)
    H.assert_tree_close(got, want)


def test_consensus_degenerate_cases():
    base, experts = H.random_experts(np.random.default_rng(4), 3)
    # k = 0: task arithmetic; k > K: the base
    H.assert_tree_close(merging.consensus(base, experts, k=0, scaling=0.5),
                        H.ref_task_arithmetic(base, experts, scaling=0.5))  # fmt: skip
    out = merging.consensus(base, experts, k=4)
    jax.tree.map(np.testing.assert_array_equal, out, base)
    # k = 1: task arithmetic on the entries some task keeps
    masks = merging.tall_masks(base, experts, lambdas=0.7)
    ta = H.ref_task_arithmetic(base, experts, scaling=0.4)
    some = {p: np.any([np.asarray(H.get(m, p)) for m in masks], axis=0) for p in H.PATHS}
    assert any(not np.all(s) for s in some.values())  # the case is not trivial
    H.assert_tree_close(
        merging.consensus(base, experts, k=1, lambdas=0.7, scaling=0.4),
        {p: np.where(some[p], ta[p], H.f64(H.get(base, p))) for p in H.PATHS},
    )
    # λ = 0: every mask keeps everything, so any k ≤ K is task arithmetic
    H.assert_tree_close(merging.consensus(base, experts, k=3, lambdas=0.0),
                        H.ref_task_arithmetic(base, experts))  # fmt: skip
    # a huge λ: a task keeps only the entries no other task changes
    rng = np.random.default_rng(5)
    sparse = [jax.tree.map(lambda b, e: np.where(rng.random(np.shape(b)) < 0.6, b, e), base, e)
              for e in experts]  # fmt: skip
    taus = _taus(base, sparse)
    for t, m in enumerate(merging.tall_masks(base, sparse, lambdas=1e30)):
        others = [u for s, u in enumerate(taus) if s != t]
        _assert_masks(m, {p: np.all([u[p] == 0 for u in others], axis=0) for p in H.PATHS})


# ------------------------------------------------------------------------ packed masks


def test_pack_and_unpack_mask_round_trip():
    base, experts = H.random_experts(np.random.default_rng(8), 2)
    mask = merging.tall_masks(base, experts)[0]
    packed = merging.pack_mask(mask)
    for p in H.PATHS:
        n = np.size(H.get(base, p))
        assert H.get(packed, p).dtype == jnp.uint8 and H.get(packed, p).size == -(-n // 8)
    jax.tree.map(np.testing.assert_array_equal, merging.unpack_mask(packed, base), mask)


def test_pack_and_unpack_mask_refuse_what_they_cannot_invert():
    """A mask of numbers, a tree or shape unlike the packed one: one error naming the leaf,
    never a mask unpacked to the wrong size."""
    mask = {"a": jnp.array([[True, False, True, True], [False, True, False, False]])}
    packed = merging.pack_mask(mask)  # 8 entries: 1 byte
    with pytest.raises(TypeError, match=r"mask\['a'\] must be a boolean array, got array of"):
        merging.pack_mask({"a": jnp.array([0.0, 0.5, jnp.nan])})
    with pytest.raises(TypeError, match=r"mask\['b'\] must be a boolean array, got int"):
        merging.pack_mask({"a": mask["a"], "b": 1})
    need = r"packed\['a'\] holds 8 bits \(length 1\), but like\['a'\] has shape \(5, 5\): its 25"
    with pytest.raises(ValueError, match=need + " entries need length 4"):
        merging.unpack_mask(packed, {"a": jnp.ones((5, 5))})
    beyond = r"packed\['a'\] has bits set beyond the 4 entries of like\['a'\] \(shape \(2, 2\)\)"
    with pytest.raises(ValueError, match=beyond):
        merging.unpack_mask(packed, {"a": jnp.ones((2, 2))})
    with pytest.raises(
        ValueError, match=r"packed does not .* of like: it lacks like's leaf \['b'\]"
    ):
        merging.unpack_mask(packed, {"b": jnp.ones((2, 4))})
    with pytest.raises(TypeError, match=r"packed\['a'\] must be pack_mask's 1-D uint8 array, got"):
        merging.unpack_mask(mask, {"a": jnp.ones((2, 4))})
    # Bits beyond the entries that are 0 cannot tell 8 entries from 5: those unpack.
    five = merging.pack_mask({"a": jnp.array([True, False, True, True, False])})
    got = merging.unpack_mask(five, {"a": jax.ShapeDtypeStruct((2, 2), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(got["a"]), [[True, False], [True, True]])
    assert packed["a"].tolist() == [180]  # the inputs are unchanged
    np.testing.assert_array_equal(np.asarray(mask["a"][1]), [False, True, False, False])
