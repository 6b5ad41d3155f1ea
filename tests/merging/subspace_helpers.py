"""Float64 NumPy references of TSV-Merge, Iso-C and Iso-CTS (whitening by an
eigendecomposition, not the implementation's SVD polar factor), the random inputs and the
cases run against them, shared by the subspace tests (``test_subspace_*.py``)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

SHAPES = {"bias": (5,), "kernel": (6, 5), "wide": (3, 4), "stack": (2, 6, 5), "scale": ()}


def _random(rng, k, dtype=np.float64):
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}
    experts = [
        {n: (x + 0.1 * rng.standard_normal(x.shape)).astype(dtype) for n, x in base.items()}
        for _ in range(k)
    ]
    return base, experts


# ------------------------------------------------------------------ float64 references


def _whiten(x):
    """``x (xᵀx)^{-1/2}`` (pseudo-inverse square root) by an eigendecomposition."""
    lam, q = np.linalg.eigh(x.T @ x)
    keep = lam > 1e-10 * lam.max()
    inv = np.where(keep, 1 / np.sqrt(np.where(keep, lam, 1)), 0)
    return x @ (q * inv) @ q.T


def _per_matrix(fn):
    """A reference on matrices, applied per matrix of a stack; other leaves: the mean."""

    def leaf(base, ws, scaling=1.0, **kw):
        deltas = [np.asarray(w, np.float64) - np.asarray(base, np.float64) for w in ws]
        if np.ndim(base) < 2:
            return base + scaling * sum(deltas) / len(deltas)
        shape = np.shape(base)
        stacks = [d.reshape(-1, *shape[-2:]) for d in deltas]
        out = np.stack([fn([s[i] for s in stacks], **kw) for i in range(stacks[0].shape[0])])
        return base + scaling * out.reshape(shape)

    return leaf


@_per_matrix
def ref_tsv(deltas, rank_fraction=1.0):
    t, r = len(deltas), min(deltas[0].shape)
    k = max(1, int(r * Fraction(str(rank_fraction)) // t))  # the decimal fraction, exactly
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([u[:, :k] for u, _, _ in svds], 1)
    s = np.concatenate([s[:k] for _, s, _ in svds])
    v = np.concatenate([vh[:k].T for _, _, vh in svds], 1)
    return _whiten(u) @ np.diag(s) @ _whiten(v).T


@_per_matrix
def ref_iso_c(deltas):
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vh


@_per_matrix
def ref_iso_cts(deltas, common_space_fraction=0.8, layout="in_out"):
    if layout == "in_out":  # the paper's (out, in) orientation
        deltas = [d.T for d in deltas]
    t, r = len(deltas), min(deltas[0].shape)
    common = int(r * common_space_fraction)
    specific = round((r - common) / t) * t
    specific = specific - t if specific > r else specific
    c, per = r - specific, specific // t
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    for d in deltas:
        ut, st, vht = np.linalg.svd(d - u[:, :c] @ u[:, :c].T @ d, full_matrices=False)
        us.append(ut[:, :per]), ss.append(st[:per]), vs.append(vht[:per].T)
    sigma = np.concatenate(ss).mean()
    out = sigma * _whiten(np.concatenate(us, 1)) @ _whiten(np.concatenate(vs, 1)).T
    return out.T if layout == "in_out" else out


REFS = {"tsv_merge": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}
CASES = [
    ("tsv_merge", 3, {}),
    ("tsv_merge", 2, {"scaling": 0.7, "rank_fraction": 0.5}),
    ("iso_c", 3, {"scaling": 1.5}),
    ("iso_cts", 3, {}),
    ("iso_cts", 3, {"common_space_fraction": 0.4, "scaling": 1.3}),  # c = 0 at (3, 4)
    ("iso_cts", 2, {"common_space_fraction": 0.0}),  # FusionBench's c < 0 clamped
    ("iso_cts", 3, {"common_space_fraction": 0.4, "layout": "out_in"}),
]


def _reference(name, base, experts, kwargs):
    return {n: REFS[name](base[n], [e[n] for e in experts], **kwargs) for n in base}


def _assert_close(got, want, rtol, atol):
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=rtol, atol=atol, err_msg=n)


FLOAT32 = [("tsv_merge", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.4})]
