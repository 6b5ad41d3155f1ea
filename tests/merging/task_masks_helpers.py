"""Float64 NumPy references of TALL masks, consensus merging and EMR-merging, shared by the
task-mask tests (``test_task_masks_*.py``), and the names of the tests that run in float32
(every other one runs with x64 enabled).

The references never call ``umtam_jax.merging``; they follow the equations of Wang et al.
(arXiv:2405.07813) and Huang et al. (arXiv:2405.17461) as the docstrings state them.
"""

from __future__ import annotations

import numpy as np

from tests.merging import helpers as H

_FLOAT32_TESTS = {"test_bfloat16_computes_in_float32", "test_out_of_core_equals_in_memory"}


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
            masks[t][p] = np.sign(taus[t][p]) * np.sign(u) > 0  # the signs agree
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
