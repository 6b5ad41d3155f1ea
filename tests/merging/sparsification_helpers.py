"""Float64 NumPy references of Model Breadcrumbs, DELLA, SCE and RAM, shared by the
sparsification tests (``test_sparsification_*.py``).

The references never call ``umtam_jax.merging``; they follow mergekit 0.1.5's semantics as
the docstrings state them, entry by entry where that is clearer. DELLA's random draw is
recomputed from the documented derivation: ``u = uniform(fold_in(fold_in(key, expert),
crc32(keystr(leaf path))), shape, float32)``, kept where ``u < p``.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from tests.merging import helpers as H

# Tests on float32 inputs run without x64 (they share compilations); the float64
# references need it.
_FLOAT32_TESTS = {
    "test_della_with_zero_epsilon_draws_dare_masks",
    "test_bfloat16_computes_in_float32",
    "test_out_of_core_equals_in_memory",
}


def _deltas(base, experts):
    return [{p: H.f64(H.get(e, p)) - H.f64(H.get(base, p)) for p in H.PATHS} for e in experts]


def _l1(d, kept):
    before, after = np.abs(d).sum(), np.abs(kept).sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def _desc_order(x):
    """Flat indices by descending |x|, equal magnitudes lower index first."""
    return np.argsort(-np.abs(np.ravel(x)), kind="stable")


# ------------------------------------------------------------------------ references


def ref_breadcrumbs(base, experts, *, density, gamma=0.01, scaling=1.0, weights=None,
                    l1_rescale=False, consensus=False, normalize=False):  # fmt: skip
    k = len(experts)
    dens = density if isinstance(density, list | tuple) else [density] * k
    sparse = []
    for d, delta in zip(dens, _deltas(base, experts), strict=True):
        out = {}
        for p in H.PATHS:
            x = delta[p]
            n = x.size
            if d >= 1:
                out[p] = x
                continue
            n_keep, n_top = int(d * n), int(gamma * n)
            n_bot = max(0, n - n_keep - n_top)
            ascending = _desc_order(x)[::-1]
            keep = np.zeros(n, bool)
            keep[ascending[n_bot : n_bot + n_keep]] = True
            kept = np.where(keep.reshape(x.shape), x, 0.0)
            out[p] = _l1(x, kept) if l1_rescale else kept
        sparse.append(out)
    return H._ref_gta(base, sparse, weights or [1.0] * k, consensus, normalize, scaling)


def della_probs(x, density, epsilon, layout="out_in"):
    """Keep probabilities: rank along the input axis (axis 1 of a PyTorch weight, axis -2
    of a Flax kernel; a vector's only axis), ascending |x|."""
    if x.ndim >= 2 and layout == "in_out":
        moved = np.moveaxis(x, -2, 1)
        return np.moveaxis(della_probs(moved, density, epsilon), 1, -2)
    rows = np.abs(x).reshape(1, -1) if x.ndim < 2 else np.abs(x)
    m = rows.shape[1]
    p = np.empty(rows.shape)
    for idx in np.ndindex(*rows.shape):
        i = idx[1]
        row = [idx[:1] + (j,) + idx[2:] for j in range(m)]
        rank = sum(rows[r] < rows[idx] or (rows[r] == rows[idx] and r[1] < i) for r in row)
        p[idx] = density if m == 1 else density - epsilon + 2 * epsilon * rank / (m - 1)
    return p.reshape(x.shape)


def della_uniforms(key, t, keystr, shape, piece=None):
    """The documented draw of expert ``t`` on the leaf ``keystr`` (``"['attn']['bias']"``),
    or on slice ``piece`` of it (``fold_in(leaf_key, piece)``)."""
    leaf_key = jax.random.fold_in(
        jax.random.fold_in(key, t), np.uint32(zlib.crc32(keystr.encode()))
    )
    if piece is not None:
        leaf_key = jax.random.fold_in(leaf_key, piece)
    return np.asarray(jax.random.uniform(leaf_key, shape, jnp.float32))


def _della_drop(x, d, epsilon, layout, draw, rescale, l1_rescale):
    prob = della_probs(x, d, epsilon, layout)
    kept = np.where(draw(x.shape) < prob, x, 0.0)
    return _l1(x, kept) if l1_rescale else (kept / prob if rescale else kept)


def ref_della(base, experts, key, *, density, epsilon=0.15, scaling=1.0, weights=None,
              rescale=True, l1_rescale=False, consensus=True, normalize=False,
              layout="in_out", sliced=False):  # fmt: skip
    """``sliced``: each slice over ``H.SLICED``'s batch axes is a leaf of its own, slice i
    (row-major over those axes) drawn with ``fold_in(leaf_key, i)``."""
    k = len(experts)
    dens = density if isinstance(density, list | tuple) else [density] * k
    dropped = []
    for t, (d, delta) in enumerate(zip(dens, _deltas(base, experts), strict=True)):
        out = {}
        for p in H.PATHS:
            x = delta[p]
            if d >= 1:
                out[p] = x
                continue
            keystr = "".join(f"[{k!r}]" for k in p)
            batch = H.SLICED[p] if sliced else ()
            if not batch:
                draw = functools.partial(della_uniforms, key, t, keystr)
                out[p] = _della_drop(x, d, epsilon, layout, draw, rescale, l1_rescale)
                continue
            out[p] = np.zeros_like(x)
            for i, index in enumerate(np.ndindex(*[x.shape[a] for a in batch])):
                where = [slice(None)] * x.ndim
                for a, j in zip(batch, index, strict=True):
                    where[a] = j
                draw = functools.partial(della_uniforms, key, t, keystr, piece=i)
                part = _della_drop(x[tuple(where)], d, epsilon, layout, draw, rescale, l1_rescale)
                out[p][tuple(where)] = part
        dropped.append(out)
    return H._ref_gta(base, dropped, weights or [1.0] * k, consensus, normalize, scaling)


def ref_sce(base, experts, *, select_topk=1.0, scaling=1.0):
    k, out = len(experts), {}
    deltas = _deltas(base, experts)
    for p in H.PATHS:
        tv = np.stack([d[p] for d in deltas])
        if select_topk < 1:
            var = ((tv - tv.mean(0)) ** 2).mean(0)
            n_keep = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
            keep = np.zeros(var.size, bool)
            keep[np.argsort(-var.ravel(), kind="stable")[:n_keep]] = True
            tv = tv * keep.reshape(var.shape)
        c = np.array([np.mean(x**2) for x in tv])
        c = np.full(k, 1.0 / k) if abs(c.sum()) < 1e-6 else c / c.sum()
        merged = np.zeros(tv.shape[1:])
        for idx in np.ndindex(*merged.shape):
            col = tv[(slice(None),) + idx]
            vote = 1.0 if col.sum() >= 0 else -1.0
            m = [np.sign(x) == vote for x in col]
            num = sum(c[t] * col[t] for t in range(k) if m[t])
            merged[idx] = num / max(sum(c[t] for t in range(k) if m[t]), 1e-6)
        out[p] = H.f64(H.get(base, p)) + scaling * merged
    return out


def ref_ram(base, experts, *, epsilon=1e-5, scaling=1.0, r=0.0, alpha=0.0):
    """RAM (r = 0) or RAM+ tensor-local."""
    k, out = len(experts), {}
    deltas = _deltas(base, experts)
    for p in H.PATHS:
        tv = np.stack([d[p] for d in deltas]).reshape(k, -1)
        counted = np.abs(tv) > epsilon
        count = counted.sum(0)
        unique = [(counted[t] & (count == 1)).sum() for t in range(k)]
        shared = [(counted[t] & (count > 1)).sum() for t in range(k)]
        lam = [
            1 + r * min(max(s / max(u, epsilon), 0), alpha)
            for s, u in zip(shared, unique, strict=True)
        ]
        merged = np.zeros(tv.shape[1])
        for i in range(tv.shape[1]):
            who = [t for t in range(k) if counted[t, i]]
            if len(who) == 1:
                merged[i] = tv[who[0], i] * lam[who[0]]
            elif who:
                merged[i] = np.mean([tv[t, i] for t in who])
        out[p] = H.f64(H.get(base, p)) + scaling * merged.reshape(np.shape(H.get(base, p)))
    return out
