"""TALL masks, consensus merging and EMR-merging against float64 NumPy references.

The references never call ``umtam_jax.merging``; they follow the equations of Wang et al.
(arXiv:2405.07813) and Huang et al. (arXiv:2405.17461) as the docstrings state them.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from umtam_jax import checkpoint, engine, merging

_FLOAT32_TESTS = {"test_bfloat16_computes_in_float32", "test_out_of_core_equals_in_memory"}


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


def _taus(base, experts):
    return [{p: H.f64(H.get(e, p)) - H.f64(H.get(base, p)) for p in H.PATHS} for e in experts]


def _lams(lambdas, k):
    return list(lambdas) if isinstance(lambdas, list | tuple) else [lambdas] * k


# ------------------------------------------------------------------------ references


def ref_tall(base, experts, lambdas=0.4, mtl=None):
    taus = _taus(base, experts)
    if mtl is None:
        mtl = {p: sum(t[p] for t in taus) for p in H.PATHS}
    lams = _lams(lambdas, len(experts))
    return [
        {p: np.abs(t[p]) >= lam * np.abs(mtl[p] - t[p]) for p in H.PATHS}
        for t, lam in zip(taus, lams, strict=True)
    ]


def ref_ties_vector(taus, trims, normalize):
    """TIES's merged task vector: vote sign(Σ trimmed) (0 votes +1), agreeing entries
    summed or averaged over their count (0 → 1)."""
    out = {}
    for p in H.PATHS:
        tv = np.stack([np.where(m[p], t[p], 0.0) for t, m in zip(taus, trims, strict=True)])
        vote = np.where(tv.sum(0) >= 0, 1.0, -1.0)
        keep = np.sign(tv) == vote
        merged = np.where(keep, tv, 0.0).sum(0)
        if normalize:
            count = keep.sum(0)
            merged = merged / np.where(count == 0, 1, count)
        out[p] = merged
    return out


def ref_consensus(base, experts, *, k=2, lambdas=0.4, scaling=1.0, ties=None):
    """``ties``: None (consensus TA) or ``{"density", "normalize", "scope"}``."""
    taus = _taus(base, experts)
    if ties is None:
        mtl = {p: sum(t[p] for t in taus) for p in H.PATHS}
    else:
        dens = _lams(ties["density"], len(experts))
        trims = H.ref_masks([{p: np.abs(t[p]) for p in H.PATHS} for t in taus], dens,
                            ties.get("scope", "tensor"))  # fmt: skip
        mtl = ref_ties_vector(taus, trims, ties.get("normalize", False))
    masks = ref_tall(base, experts, lambdas, mtl)
    out = {}
    for p in H.PATHS:
        count = sum(m[p].astype(int) for m in masks)
        out[p] = H.f64(H.get(base, p)) + scaling * np.where(count >= k, mtl[p], 0.0)
    return out


def ref_emr(base, experts, rescale="sum"):
    """(unified, masks, rescalers, task models), entry by entry."""
    taus = _taus(base, experts)
    k = len(experts)
    uni, masks = {}, [{} for _ in range(k)]
    num, den = np.zeros(k), np.zeros(k)
    for p in H.PATHS:
        shape = np.shape(H.get(base, p))
        u = np.zeros(shape)
        for idx in np.ndindex(*shape):
            col = [t[p][idx] for t in taus]
            gamma = np.sign(sum(col))
            agree = [abs(x) for x in col if x * gamma > 0]
            u[idx] = gamma * max(agree, default=0.0)
        uni[p] = u
        n = u.size if rescale == "tensor_mean" else 1
        for t in range(k):
            masks[t][p] = taus[t][p] * u > 0
            num[t] += np.abs(taus[t][p]).sum() / n
            den[t] += np.abs(np.where(masks[t][p], u, 0.0)).sum() / n
    lam = np.array([a / b if b > 0 else 1.0 for a, b in zip(num, den, strict=True)])
    models = [
        {p: H.f64(H.get(base, p)) + lam[t] * np.where(masks[t][p], uni[p], 0.0) for p in H.PATHS}
        for t in range(k)
    ]
    return uni, masks, lam, models


def _assert_masks(got, want):
    for p in H.PATHS:
        x = np.asarray(H.get(got, p))
        assert x.dtype == np.bool_, p
        np.testing.assert_array_equal(x, want[p], err_msg=str(p))


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


# ------------------------------------------------------------------------ contract


def test_inputs_are_not_modified_and_jit_gives_the_same_results():
    base, experts = H.random_experts(np.random.default_rng(9), 3)
    before = copy.deepcopy((base, experts))
    eager = {
        "tall": merging.tall_masks(base, experts, lambdas=[0.3, 0.4, 0.5]),
        "consensus": merging.consensus(base, experts, lambdas=0.3, scaling=0.5),
        "ties": merging.consensus_ties(base, experts, density=0.5),
        "emr": merging.emr_merge(base, experts),
    }
    eager["task"] = merging.emr_task_model(base, eager["emr"], 1)
    eager["applied"] = merging.apply_task_mask(base, eager["consensus"], eager["tall"][0])

    def run(b, e, lam):
        out = {
            "tall": merging.tall_masks(b, e, lambdas=lam),
            "consensus": merging.consensus(b, e, lambdas=lam[0], scaling=0.5),
            "ties": merging.consensus_ties(b, e, density=0.5),
            "emr": merging.emr_merge(b, e),
        }
        out["task"] = merging.emr_task_model(b, out["emr"], 1)
        out["applied"] = merging.apply_task_mask(b, out["consensus"], out["tall"][0])
        return out

    jitted = jax.jit(run)(base, experts, jnp.array([0.3, 0.4, 0.5]))
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)
    jax.tree.map(np.testing.assert_array_equal, (base, experts), before)


@pytest.mark.parametrize("fn", ["consensus", "emr"])
def test_bfloat16_computes_in_float32(fn):
    base, experts = H.random_experts(np.random.default_rng(10), 3, dtype=np.float32)
    bf = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    b16, e16 = bf(base), [bf(e) for e in experts]
    if fn == "consensus":
        got = merging.consensus(b16, e16, k=1, scaling=0.5)
        want = merging.consensus(f32(b16), [f32(e) for e in e16], k=1, scaling=0.5)
    else:
        emr16 = merging.emr_merge(b16, e16)
        emr32 = merging.emr_merge(f32(b16), [f32(e) for e in e16])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(emr16.unified))
        jax.tree.map(np.testing.assert_array_equal, emr16, emr32)
        got, want = (
            merging.emr_task_model(b16, emr16, 2),
            merging.emr_task_model(f32(b16), emr32, 2),
        )
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16)))


def test_validation_errors_name_the_parameter_or_leaf():
    base, experts = H.random_experts(np.random.default_rng(11), 2)
    with pytest.raises(ValueError, match=r"got 3 lambdas for 2 experts"):
        merging.tall_masks(base, experts, lambdas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"got 1 lambdas for 2 experts"):
        merging.consensus(base, experts, lambdas=[0.1])
    with pytest.raises(ValueError, match=r"lambdas\[1\] must lie in \[0.0, inf\]"):
        merging.consensus(base, experts, lambdas=[0.1, -0.2])
    with pytest.raises(ValueError, match=r"lambdas must lie in \[0.0, inf\]"):
        merging.tall_masks(base, experts, lambdas=-1.0)
    with pytest.raises(ValueError, match=r"k must lie in \[0.0, inf\]"):
        merging.consensus(base, experts, k=-1)
    with pytest.raises(ValueError, match="density must lie in"):
        merging.consensus_ties(base, experts, density=0.0)
    with pytest.raises(ValueError, match="unknown rescale='max'"):
        merging.emr_merge(base, experts, rescale="max")
    with pytest.raises(ValueError, match=r"shape mismatch at \['attn'\]\['bias'\]"):
        bad = copy.deepcopy(experts[1])
        bad["attn"]["bias"] = np.zeros(4)
        merging.emr_merge(base, [experts[0], bad])
    with pytest.raises(ValueError, match=r"merged does not have the tree structure"):
        merging.tall_masks(base, experts, merged={"attn": base["attn"]})
    mask = merging.tall_masks(base, experts)[0]
    with pytest.raises(TypeError, match=r"mask\['conv'\]\['kernel'\] must be a boolean array"):
        merging.apply_task_mask(base, experts[0], {**mask, "conv": {"kernel": np.ones((2, 3, 4))}})
    with pytest.raises(ValueError, match=r"shape mismatch at \['norm'\]\['scale'\]"):
        merging.apply_task_mask(base, experts[0], {**mask, "norm": {"scale": np.ones(2, bool)}})
    emr = merging.emr_merge(base, experts)
    with pytest.raises(ValueError, match=r"task must be an expert index in \[0, 1\]"):
        merging.emr_task_model(base, emr, 2)
    with pytest.raises(TypeError, match=r"task must be an int expert index or None, got 1.0"):
        merging.emr_task_model(base, emr, 1.0)
    nan = emr._replace(rescalers=emr.rescalers.at[1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"emr.rescalers\[1\] must be finite"):
        merging.emr_task_model(base, nan, 1)
    with pytest.raises(ValueError, match="not finite"):
        nan = jax.tree.map(lambda x: np.full_like(x, np.nan), experts[0])
        merging.consensus(base, [nan, experts[1]])


def test_registry_lists_the_consensus_methods():
    for name in ("consensus", "consensus_ties"):
        m = merging.METHODS[name]
        assert m.fn is getattr(merging, name)
        assert m.defaults()["k"] == 2 and m.defaults()["lambdas"] == 0.4
        assert "lambdas (numbers, default 0.4; per expert as 'tall_lambda')" in merging.describe(m)


def test_per_expert_lambdas_from_a_configuration():
    from umtam_jax.cli.merge import ConfigError, build_plan

    config = {
        "method": "consensus",
        "base": "b",
        "experts": [{"path": "x", "tall_lambda": 0.2}, "y", {"path": "z", "tall_lambda": 0.6}],
        "parameters": {"lambdas": 0.3},
    }
    assert build_plan(config).parameters["lambdas"] == [0.2, 0.3, 0.6]
    with pytest.raises(ConfigError, match=r"experts\[0\].tall_lambda: method 'ties' takes no"):
        build_plan({**config, "method": "ties", "parameters": {"density": 0.5}})
    with pytest.raises(ValueError, match=r"lambdas\[1\] must lie in \[0.0, inf\]"):
        base, experts = H.random_experts(np.random.default_rng(0), 3)
        merging.consensus(base, experts, lambdas=[0.2, -1.0, 0.1])


# ------------------------------------------------------------------------ out of core

CASES = [
    ("consensus", {"k": 2, "lambdas": 0.3, "scaling": 0.5}),
    ("consensus", {"k": 1, "lambdas": [0.2, 0.4, 0.6]}),
    ("consensus_ties", {"density": 0.4, "normalize": True}),
    ("consensus_ties", {"density": 0.3, "scope": "global", "k": 1}),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_masks")
    base, experts = H.random_experts(np.random.default_rng(12), 3, dtype=np.float32)
    paths = [str(root / name) for name in ("base", "e0", "e1", "e2")]
    for path, params in zip(paths, [base, *experts], strict=True):
        checkpoint.save_checkpoint(path, params)
    return paths, [checkpoint.restore_params(p) for p in paths]


@pytest.mark.parametrize("method,kwargs", CASES)
def test_out_of_core_equals_in_memory(ckpts, tmp_path, method, kwargs):
    (base_dir, *expert_dirs), (base, *experts) = ckpts
    out = tmp_path / "out"
    engine.merge_checkpoints(
        method, base_dir, expert_dirs, out, progress=False, group_bytes=100, **kwargs
    )
    got, want = checkpoint.restore_params(out), getattr(merging, method)(base, experts, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
