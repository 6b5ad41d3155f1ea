"""Merge diagnostics against float64 NumPy references written entry by entry here."""

from __future__ import annotations

import copy
import json
import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from umtam_jax.merging import diagnostics as D


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def key(path):
    return "".join(f"[{k!r}]" for k in path)


def _taus(base, experts):
    return [{p: H.f64(H.get(e, p)) - H.f64(H.get(base, p)) for p in H.PATHS} for e in experts]


def _sparse_experts(rng, k):
    """Random experts where about a third of the entries are left at the base value."""
    base, experts = H.random_experts(rng, k)
    for e in experts:
        for p in H.PATHS:
            leaf = np.array(H.get(e, p))
            keep = rng.random(np.shape(leaf)) < 0.35
            leaf[keep] = np.asarray(H.get(base, p))[keep]
            H.get(e, p[:-1])[p[-1]] = leaf
    return base, experts


# ------------------------------------------------------------------------ references


def ref_sign_conflict(base, experts, taus=None):
    taus = _taus(base, experts) if taus is None else taus
    k = len(experts)
    eligible = conflicts = 0
    mass = conflict_mass = 0.0
    per_leaf = {}
    both, disagree = np.zeros((k, k)), np.zeros((k, k))
    for p in H.PATHS:
        flat = [np.ravel(t[p]) for t in taus]
        le = lc = 0
        for n in range(flat[0].size):
            vals = [f[n] for f in flat]
            signs = {np.sign(v) for v in vals if v != 0}
            mass += sum(abs(v) for v in vals)
            if sum(v != 0 for v in vals) >= 2:
                le += 1
                if len(signs) > 1:
                    lc += 1
                    conflict_mass += sum(abs(v) for v in vals)
            for i in range(k):
                for j in range(k):
                    if vals[i] != 0 and vals[j] != 0:
                        both[i, j] += 1
                        disagree[i, j] += np.sign(vals[i]) != np.sign(vals[j])
        eligible, conflicts = eligible + le, conflicts + lc
        per_leaf[key(p)] = lc / le if le else None
    return eligible, conflicts, conflict_mass / mass, per_leaf, disagree / both


def ref_spread(scores, paths=H.PATHS):
    """scores[t][path] -> (mean tv, mean normalized entropy, per-leaf tv)."""
    k = len(scores)
    tvs, ents, per_leaf = [], [], {}
    for p in paths:
        leaf_tv = []
        for n in range(np.size(scores[0][p])):
            s = np.array([np.ravel(sc[p])[n] for sc in scores], np.float64)
            if s.sum() == 0:
                continue
            q = s / s.sum()
            leaf_tv.append(0.5 * sum(abs(x - 1 / k) for x in q))
            ents.append(-sum(x * math.log(x) for x in q if x > 0) / math.log(k))
        tvs += leaf_tv
        per_leaf[key(p)] = np.mean(leaf_tv)
    return np.mean(tvs), np.mean(ents), per_leaf


def ref_delta_norms(base, merged, experts):
    taus = _taus(base, experts)
    (tm,) = _taus(base, [merged])
    vec = lambda t: np.concatenate([np.ravel(t[p]) for p in H.PATHS])  # noqa: E731
    m, es = vec(tm), [vec(t) for t in taus]
    ratio = np.linalg.norm(m) / np.mean([np.linalg.norm(e) for e in es])
    cos = [m @ e / (np.linalg.norm(m) * np.linalg.norm(e)) for e in es]
    share = {key(p): np.sum(tm[p] ** 2) / (m @ m) for p in H.PATHS}
    return ratio, cos, share


# ------------------------------------------------------------------------ sign conflict


def test_sign_conflict_matches_reference():
    base, experts = _sparse_experts(np.random.default_rng(0), 3)
    d = D.sign_conflict(base, experts)
    entries, conflicts, mass, per_leaf, pairwise = ref_sign_conflict(base, experts)
    assert (d["entries"], d["conflicts"]) == (entries, conflicts)
    assert d["rate"] == pytest.approx(conflicts / entries, rel=1e-12)
    assert d["mass"] == pytest.approx(mass, rel=1e-12)
    assert d["per_leaf"].keys() == per_leaf.keys()
    for p, r in per_leaf.items():
        assert d["per_leaf"][p] == (None if r is None else pytest.approx(r, rel=1e-12))
    np.testing.assert_allclose(np.array(d["pairwise"], float), pairwise, rtol=1e-12)
    assert 0 < d["rate"] < 1


def test_sign_conflict_among_kept_entries_matches_reference():
    base, experts = _sparse_experts(np.random.default_rng(3), 3)
    density = 0.3

    def trimmed(tau):  # the top int(density · n) magnitudes of a leaf, the rest zero
        flat = np.ravel(tau)
        keep = np.argsort(-np.abs(flat), kind="stable")[: max(1, int(density * flat.size))]
        out = np.zeros_like(flat)
        out[keep] = flat[keep]
        return out.reshape(np.shape(tau))

    taus = [{p: trimmed(t[p]) for p in t} for t in _taus(base, experts)]
    d = D.sign_conflict(base, experts, density=density)
    entries, conflicts, mass, per_leaf, pairwise = ref_sign_conflict(base, experts, taus)
    assert d["density"] == density
    assert (d["entries"], d["conflicts"]) == (entries, conflicts)
    assert d["rate"] == pytest.approx(conflicts / entries, rel=1e-12)
    assert d["mass"] == pytest.approx(mass, rel=1e-12)
    for p, r in per_leaf.items():
        assert d["per_leaf"][p] == (None if r is None else pytest.approx(r, rel=1e-12))
    np.testing.assert_allclose(np.array(d["pairwise"], float), pairwise, rtol=1e-12)
    assert d["entries"] < D.sign_conflict(base, experts)["entries"]  # fewer entries count
    with pytest.raises(ValueError, match="density must be a number in"):
        D.sign_conflict(base, experts, density=0.0)


def test_identical_experts_do_not_conflict_and_opposite_ones_always_do():
    base, (e,) = H.random_experts(np.random.default_rng(1), 1)
    same = D.sign_conflict(base, [e, e, e])
    assert same["rate"] == 0.0 and same["mass"] == 0.0
    assert same["pairwise"] == [[0.0] * 3] * 3
    opposite = jax.tree.map(lambda b, w: 2 * b - w, base, e)
    d = D.sign_conflict(base, [e, opposite])
    assert d["rate"] == 1.0 and d["mass"] == 1.0
    assert d["pairwise"] == [[0.0, 1.0], [1.0, 0.0]]
    assert set(d["per_leaf"].values()) == {1.0}


def test_no_two_nonzero_task_vectors_gives_none():
    base = {"w": jnp.zeros(3)}
    d = D.sign_conflict(base, [{"w": jnp.array([1.0, 0.0, 0.0])}, base])
    assert d["rate"] is None and d["entries"] == 0 and d["per_leaf"] == {"['w']": None}
    assert d["pairwise"] == [[0.0, None], [None, None]]


# ------------------------------------------------------------------------ masks


def test_mask_overlap_matches_reference():
    rng = np.random.default_rng(2)
    masks = [H.build(lambda p, s, _: rng.random(s) < 0.4) for _ in range(3)]
    d = D.mask_overlap(masks)
    flat = [np.concatenate([np.ravel(H.get(m, p)) for p in H.PATHS]) for m in masks]
    for i in range(3):
        for j in range(3):
            inter, union = np.sum(flat[i] & flat[j]), np.sum(flat[i] | flat[j])
            assert d["jaccard"][i][j] == pytest.approx(inter / union, rel=1e-12)
    counts = np.sum(flat, axis=0)
    expected = [np.sum(counts == c) / np.sum(counts > 0) for c in (1, 2, 3)]
    np.testing.assert_allclose(d["kept_by"], expected, rtol=1e-12)
    np.testing.assert_allclose(d["density"], [f.mean() for f in flat], rtol=1e-12)


def test_identical_masks_overlap_fully_and_disjoint_ones_not_at_all():
    m = {"a": jnp.array([True, False, True]), "b": jnp.array([[True]])}
    d = D.mask_overlap([m, m])
    assert d["jaccard"] == [[1.0, 1.0], [1.0, 1.0]] and d["kept_by"] == [0.0, 1.0]
    other = jax.tree.map(jnp.logical_not, m)
    d = D.mask_overlap([m, other])
    assert d["jaccard"] == [[1.0, 0.0], [0.0, 1.0]] and d["kept_by"] == [1.0, 0.0]
    empty = jax.tree.map(jnp.zeros_like, m)
    assert D.mask_overlap([empty, empty]) == {
        "jaccard": [[1.0, 1.0], [1.0, 1.0]],
        "kept_by": [None, None],
        "density": [0.0, 0.0],
    }


def test_method_masks_are_the_registered_top_k_masks():
    rng = np.random.default_rng(3)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    ties = D.method_masks("ties", base, experts, density=0.3)
    taus = _taus(base, experts)
    expected = H.ref_masks([{p: np.abs(t[p]) for p in H.PATHS} for t in taus], [0.3] * 3, "tensor")
    um = D.method_masks("umtam", base, experts, stats, density=[0.4, 0.2, 0.3], scope="global")
    sal = [{p: H.f64(H.get(s, p).saliency) for p in H.PATHS} for s in stats]
    expected_um = H.ref_masks(sal, [0.4, 0.2, 0.3], "global")
    for got, ref in [(ties, expected), (um, expected_um)]:
        assert len(got) == 3
        for g, r in zip(got, ref, strict=True):
            for p in H.PATHS:
                np.testing.assert_array_equal(np.asarray(H.get(g, p)), r[p])


def test_method_masks_bernoulli_and_single_expert():
    base, experts = H.random_experts(np.random.default_rng(4), 2)
    (mask,) = D.method_masks("prune", base, experts[0], None, density=0.3)  # ties' compiles
    assert H.get(mask, ("attn", "kernel")).sum() == 9
    k = jax.random.key(0)
    tiny = {"w": jnp.zeros(40)}
    got = D.method_masks("dare", tiny, [{"w": jnp.ones(40)}] * 2, density=0.5, key=k)
    for t, g in enumerate(got):  # docs/algorithm.md: fold_in(fold_in(key, t), crc32(path))
        leaf_key = jax.random.fold_in(jax.random.fold_in(k, t), zlib.crc32(b"['w']"))
        np.testing.assert_array_equal(g["w"], jax.random.bernoulli(leaf_key, 0.5, (40,)))
    assert not np.array_equal(got[0]["w"], got[1]["w"])


def test_method_masks_of_a_method_without_sparsify_step_names_it():
    base, experts = H.random_experts(np.random.default_rng(5), 2)
    with pytest.raises(ValueError, match="'task_arithmetic' has no sparsify step"):
        D.method_masks("task_arithmetic", base, experts)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        D.method_masks("nope", base, experts)


# ------------------------------------------------------------------------ importance spread


def test_importance_spread_matches_reference():
    rng = np.random.default_rng(6)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    sal = [{p: H.f64(H.get(s, p).saliency) for p in H.PATHS} for s in stats]
    weights = [
        {
            p: 0.5 * H.ref_momentum(H.get(s, p)) ** 2 + 2.0 * H.ref_curvature(H.get(s, p))
            for p in H.PATHS
        }
        for s in stats
    ]
    kw = dict(lambda_momentum=0.5, lambda_curvature=2.0)
    for of, scores in [("importances", sal), ("weights", weights)]:
        d = D.importance_spread("umtam", base, experts, stats, of=of, **kw)
        tv, ent, per_leaf = ref_spread(scores)
        assert d["tv"] == pytest.approx(tv, rel=1e-10)
        assert d["entropy"] == pytest.approx(ent, rel=1e-10)
        assert d["max_tv"] == pytest.approx(2 / 3) and d["undefined"] == 0
        assert d["entries"] == sum(np.size(sal[0][p]) for p in H.PATHS)
        for p, v in per_leaf.items():
            assert d["per_leaf"][p]["tv"] == pytest.approx(v, rel=1e-10)
    taus = _taus(base, experts)
    d = D.importance_spread("ties", base, experts, density=0.5)
    tv, ent, _ = ref_spread([{p: np.abs(t[p]) for p in H.PATHS} for t in taus])
    assert (d["tv"], d["entropy"]) == (pytest.approx(tv, rel=1e-10), pytest.approx(ent, rel=1e-10))


def test_uniform_importances_have_zero_spread_and_unit_entropy():
    rng = np.random.default_rng(7)
    base, (e,) = H.random_experts(rng, 1)
    d = D.importance_spread("ties", base, [e, e, e], density=0.5)
    assert d["tv"] == pytest.approx(0, abs=1e-15) and d["entropy"] == pytest.approx(1, rel=1e-12)
    (s,) = H.random_statistics(rng, 1)
    d = D.importance_spread("umtam", base, [e, e], [s, s], of="weights")
    assert d["tv"] == pytest.approx(0, abs=1e-15) and d["entropy"] == pytest.approx(1, rel=1e-12)
    stats = H.random_statistics(rng, 2)
    d = D.importance_spread("umtam", base, [e, e], stats, of="weights", curvature_aggregation=False)
    assert d["tv"] == 0.0 and d["entropy"] == pytest.approx(1, rel=1e-12)
    # All-zero importances are undefined, not uniform.
    d = D.importance_spread("ties", base, [base, base], density=0.5)
    assert d["tv"] is None and d["entries"] == 0 and d["undefined"] > 0


def test_importance_spread_errors_name_the_method_or_option():
    base, experts = H.random_experts(np.random.default_rng(8), 2)
    with pytest.raises(ValueError, match="'task_arithmetic' has no importance step"):
        D.importance_spread("task_arithmetic", base, experts)
    with pytest.raises(ValueError, match="'ties' has no UMTAM weights"):
        D.importance_spread("ties", base, experts, of="weights", density=0.5)
    with pytest.raises(ValueError, match="unknown of='x'"):
        D.importance_spread("ties", base, experts, of="x", density=0.5)


# ------------------------------------------------------------------------ delta norms


def test_delta_norms_match_reference():
    rng = np.random.default_rng(9)
    base, experts = H.random_experts(rng, 3)
    merged = jax.tree.map(
        lambda *e: np.mean(e, 0) + 0.01 * rng.standard_normal(np.shape(e[0])), *experts
    )
    d = D.delta_norms(base, merged, experts)
    ratio, cos, share = ref_delta_norms(base, merged, experts)
    assert d["ratio"] == pytest.approx(ratio, rel=1e-12)
    np.testing.assert_allclose(d["cosine"], cos, rtol=1e-12)
    assert d["leaf_share"] == pytest.approx(share, rel=1e-12)
    assert sum(d["leaf_share"].values()) == pytest.approx(1.0)


def test_delta_norms_of_the_expert_itself_and_of_the_base():
    base, (e,) = H.random_experts(np.random.default_rng(10), 1)
    d = D.delta_norms(base, e, [e])
    assert d["ratio"] == pytest.approx(1.0) and d["cosine"][0] == pytest.approx(1.0)
    assert d["cosine"][0] <= 1.0
    assert all(r == pytest.approx(1.0) for r in d["leaf_ratio"].values())
    d = D.delta_norms(base, base, [e])
    assert d["ratio"] == 0.0 and d["cosine"] == [None] and set(d["leaf_share"].values()) == {None}


# ------------------------------------------------------------------------ diagnose


def test_diagnose_combines_the_applicable_diagnostics():
    rng = np.random.default_rng(11)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    merged = jax.tree.map(lambda *e: np.mean(e, 0), *experts)  # any tree: not recomputed
    d = D.diagnose("umtam", base, experts, merged, stats, density=0.3)
    assert d["method"] == "umtam" and d["experts"] == 3
    assert d["sign_conflict"] == D.sign_conflict(base, experts)
    masks = D.method_masks("umtam", base, experts, stats, density=0.3)
    assert d["mask_overlap"] == D.mask_overlap(masks)
    assert d["importance_spread"] == D.importance_spread("umtam", base, experts, stats)
    assert d["weight_spread"] == D.importance_spread("umtam", base, experts, stats, of="weights")
    assert d["delta_norms"] == D.delta_norms(base, merged, experts)
    json.dumps(d, allow_nan=False)
    assert d["sign_conflict_kept"] == D.sign_conflict(base, experts, density=D.KEPT_DENSITY)
    d = D.diagnose("task_arithmetic", base, experts, scaling=0.5)
    assert sorted(d) == ["experts", "method", "sign_conflict", "sign_conflict_kept"]
    d = D.diagnose("prune", base, experts[0], experts[0], density=0.5)
    assert d["experts"] == 1 and d["mask_overlap"]["jaccard"] == [[1.0]]
    assert d["importance_spread"]["entropy"] == 1.0


# ------------------------------------------------------------------------ validation


def test_validation_errors_name_the_leaf_path():
    base, experts = H.random_experts(np.random.default_rng(12), 2)
    bad = copy.deepcopy(experts[1])
    bad["attn"]["bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"shape mismatch at \['attn'\]\['bias'\]"):
        D.sign_conflict(base, [experts[0], bad])
    bad["attn"]["bias"] = np.full(5, np.nan)
    with pytest.raises(ValueError, match=r"experts\[1\]\['attn'\]\['bias'\] is not finite"):
        D.delta_norms(base, experts[0], [experts[0], bad])
    with pytest.raises(ValueError, match=r"shape mismatch at \['conv'\]\['kernel'\].*merged"):
        D.delta_norms(base, {**base, "conv": {"kernel": np.zeros(3)}}, experts)
    m = {"a": jnp.ones(2, bool)}
    with pytest.raises(TypeError, match=r"masks\[1\]\['a'\] must be a boolean array"):
        D.mask_overlap([m, {"a": jnp.ones(2)}])
    with pytest.raises(ValueError, match=r"shape mismatch at \['a'\]"):
        D.mask_overlap([m, {"a": jnp.ones(3, bool)}])
    with pytest.raises(ValueError, match=r"masks\[1\].*lacks masks\[0\]'s leaf \['a'\]"):
        D.mask_overlap([m, {"b": jnp.ones(2, bool)}])
    with pytest.raises(ValueError, match="empty"):
        D.mask_overlap([])


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(13)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    before = copy.deepcopy((base, experts, stats))
    D.diagnose("umtam", base, experts, experts[0], stats)
    chex.assert_trees_all_equal((base, experts, stats), before)


def test_nnx_states_give_the_same_diagnostics_as_pure_dicts():
    from flax import nnx

    states = [nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(s)), nnx.Param) for s in range(3)]
    pure = [jax.tree.map(np.asarray, nnx.to_pure_dict(s)) for s in states]
    merged = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(3)), nnx.Param)
    got = D.diagnose("ties", states[0], states[1:], merged, density=0.5)
    want = D.diagnose("ties", pure[0], pure[1:], nnx.to_pure_dict(merged), density=0.5)
    assert got == want
