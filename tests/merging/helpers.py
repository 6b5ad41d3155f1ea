"""Random inputs and an independent float64 NumPy reference of every merging method.

The reference never calls ``umtam_jax.merging``; it follows docs/algorithm.md §4–§5
literally, entry by entry where that is clearer, with NumPy's stable argsort for the top-k
selection. The references of one statistics node's momentum, curvature and saliency are in
``statistics_helpers`` (imported here, so ``helpers.f64`` etc. keep working).
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

from tests import trees
from tests.merging.statistics_helpers import f64, ref_curvature, ref_momentum, ref_saliency
from umtam_jax.optimizer import MatrixAxes
from umtam_jax.optimizer._state import DenseStatistics, FactoredStatistics

# Leaf name -> (shape, split of the shape into rows/cols for factored statistics or None).
# jax flattens dicts in sorted key order; PATHS lists the leaves in that order.
LAYOUT = {
    "attn": {"kernel": ((6, 5), 1), "bias": ((5,), None)},
    "conv": {"kernel": ((2, 3, 4), 2)},
    "norm": {"scale": ((), None)},
}
PATHS = [("attn", "bias"), ("attn", "kernel"), ("conv", "kernel"), ("norm", "scale")]
RANK = 2


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def build(fn):
    return {
        mod: {name: fn((mod, name), shape, split) for name, (shape, split) in leaves.items()}
        for mod, leaves in LAYOUT.items()
    }


def random_params(rng, scale=1.0, dtype=np.float64):
    return build(lambda p, shape, split: (scale * rng.standard_normal(shape)).astype(dtype))


def random_experts(rng, k, dtype=np.float64):
    base = random_params(rng, dtype=dtype)
    experts = [
        build(lambda p, s, _: (get(base, p) + 0.1 * rng.standard_normal(s)).astype(dtype))
        for _ in range(k)
    ]
    return base, experts


def random_node(rng, shape, split, tracked=True, dtype=np.float64):
    pos = lambda s: (rng.random(s) + 0.1).astype(dtype)  # noqa: E731
    sal = pos(shape) if tracked else None
    if split is None:
        return DenseStatistics(
            mu=(0.1 * rng.standard_normal(shape)).astype(dtype), nu=pos(shape), saliency=sal
        )
    rows, cols = shape[:split], shape[split:]
    return FactoredStatistics(
        u=rng.standard_normal(rows + (RANK,)).astype(dtype),
        sigma=(0.3 * rng.standard_normal((RANK, RANK))).astype(dtype),
        v=rng.standard_normal(cols + (RANK,)).astype(dtype),
        row=pos(rows),
        col=pos(cols),
        saliency=sal,
    )


def random_statistics(rng, k, tracked=True, dtype=np.float64):
    return [
        build(lambda p, shape, split: random_node(rng, shape, split, tracked, dtype))
        for _ in range(k)
    ]


def as_dict_statistics(stats):
    """Statistics as a checkpoint may restore them: dicts with the NamedTuple field names."""

    def node(n):
        return {f: getattr(n, f) for f in n._fields if getattr(n, f) is not None}

    return build(lambda p, s, _: node(get(stats, p)))


# ----------------------------------------------------------------------------- reference


def ref_keep(scores, k):
    """Boolean mask with exactly k True at the largest scores, lower index first on ties."""
    flat = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(scores))


def ref_count(n, density):
    return max(1, int(density * n))


def ref_masks(score_trees, densities, scope):
    """score_trees[t][path] -> mask dict per expert."""
    out = []
    for t, scores in enumerate(score_trees):
        d = densities[t]
        if scope == "tensor":
            out.append({p: ref_keep(scores[p], ref_count(np.size(scores[p]), d)) for p in PATHS})
        elif scope == "layer":  # each slice of the first axis of a leaf with >= 3 axes
            out.append(
                {
                    p: _ref_keep_sliced(scores[p], d, (0,) if np.ndim(scores[p]) >= 3 else ())
                    for p in PATHS
                }  # fmt: skip
            )
        elif scope is sliced_scope:
            out.append({p: _ref_keep_sliced(scores[p], d, SLICED[p]) for p in PATHS})
        else:
            flat = np.concatenate([np.ravel(scores[p]) for p in PATHS])
            m = ref_keep(flat, ref_count(flat.size, d))
            res, start = {}, 0
            for p in PATHS:
                n = int(np.size(scores[p]))
                res[p] = m[start : start + n].reshape(np.shape(scores[p]))
                start += n
            out.append(res)
    return out


def _ref_keep_sliced(scores, density, batch):
    """Each slice over the ``batch`` axes keeps its own count, as a tensor of its own."""
    scores = np.asarray(scores)
    mask = np.zeros(scores.shape, bool)
    sizes = [scores.shape[a] for a in batch]
    for index in np.ndindex(*sizes):
        where = [slice(None)] * scores.ndim
        for a, i in zip(batch, index, strict=True):
            where[a] = i
        part = scores[tuple(where)]
        mask[tuple(where)] = ref_keep(part, ref_count(part.size, density))
    return mask


#: The batch axes :func:`sliced_scope` gives each leaf: counts per column of a matrix, per
#: slice of a 3-D leaf's first and last axes.
SLICED = {("attn", "bias"): (), ("attn", "kernel"): (1,), ("conv", "kernel"): (0, 2),
          ("norm", "scale"): ()}  # fmt: skip


def sliced_scope(path, shape):
    """A layout callable ``scope``: the batch axes of ``SLICED`` (rows do not matter)."""
    return MatrixAxes(batch=SLICED[tuple(k.key for k in path)], rows=0)


def _deltas(base, experts):
    return [{p: f64(get(e, p)) - f64(get(base, p)) for p in PATHS} for e in experts]


def _densities(density, k):
    return list(density) if isinstance(density, list | tuple) else [density] * k


def ref_umtam(
    base,
    experts,
    statistics,
    *,
    density=0.2,
    lambda_momentum=1.0,
    lambda_curvature=1.0,
    curvature_pruning=True,
    sign_election=True,
    curvature_aggregation=True,
    normalize="all",
    scaling=1.0,
    scope="tensor",
):
    k = len(experts)
    deltas = _deltas(base, experts)
    if curvature_pruning:
        imp = [
            {
                p: ref_saliency(get(statistics[t], p), get(experts[t], p), get(base, p))
                for p in PATHS
            }
            for t in range(k)
        ]
    else:
        imp = [{p: np.abs(deltas[t][p]) for p in PATHS} for t in range(k)]
    masks = ref_masks(imp, _densities(density, k), scope)
    out = {}
    for p in PATHS:
        shape = np.shape(get(base, p))
        merged = np.zeros(shape)
        for idx in np.ndindex(*shape):
            dl = [deltas[t][p][idx] for t in range(k)]
            m = [bool(masks[t][p][idx]) for t in range(k)]
            if sign_election:
                s_pos = sum(abs(dl[t]) * imp[t][p][idx] for t in range(k) if m[t] and dl[t] > 0)
                s_neg = sum(abs(dl[t]) * imp[t][p][idx] for t in range(k) if m[t] and dl[t] < 0)
                elected = np.sign(s_pos - s_neg)
                m = [m[t] and elected != 0 and np.sign(dl[t]) == elected for t in range(k)]
            if curvature_aggregation:
                w = []
                for t in range(k):
                    node = get(statistics[t], p)
                    w.append(
                        lambda_momentum * ref_momentum(node)[idx] ** 2
                        + lambda_curvature * ref_curvature(node)[idx]
                    )
            else:
                w = [1.0] * k
            num = sum(w[t] * dl[t] for t in range(k) if m[t])
            den = sum(w) if normalize == "all" else sum(w[t] for t in range(k) if m[t])
            merged[idx] = 0.0 if den == 0 else num / den
        out[p] = f64(get(base, p)) + scaling * merged
    return out


def ref_task_arithmetic(base, experts, *, scaling=1.0, weights=None):
    weights = weights or [1.0] * len(experts)
    deltas = _deltas(base, experts)
    return {
        p: f64(get(base, p)) + scaling * sum(w * d[p] for w, d in zip(weights, deltas, strict=True))
        for p in PATHS
    }


def _ref_gta(base, deltas, weights, consensus, normalize, scaling):
    """mergekit's generalized task arithmetic, written out per entry."""
    out = {}
    for p in PATHS:
        shape = np.shape(get(base, p))
        merged = np.zeros(shape)
        for idx in np.ndindex(*shape):
            wd = [w * d[p][idx] for w, d in zip(weights, deltas, strict=True)]
            if consensus:
                vote = 1.0 if sum(wd) >= 0 else -1.0
                keep = [np.sign(x) == vote for x in wd]
            else:
                keep = [True] * len(wd)
            mixed = sum(x for x, kp in zip(wd, keep, strict=True) if kp)
            if normalize:
                div = sum(w for w, kp in zip(weights, keep, strict=True) if kp)
                mixed = mixed / (1.0 if div == 0 else div)
            merged[idx] = mixed
        out[p] = f64(get(base, p)) + scaling * merged
    return out


def ref_ties(base, experts, *, density, scaling=1.0, weights=None, scope="tensor"):
    k = len(experts)
    weights = weights or [1.0] * k
    deltas = _deltas(base, experts)
    masks = ref_masks(
        [{p: np.abs(d[p]) for p in PATHS} for d in deltas], _densities(density, k), scope
    )
    trimmed = [
        {p: np.where(m[p], d[p], 0.0) for p in PATHS} for d, m in zip(deltas, masks, strict=True)
    ]
    return _ref_gta(base, trimmed, weights, True, True, scaling)


def ref_dare_drop(deltas, keeps, densities, rescale, l1_rescale):
    """keeps[t][p]: the Bernoulli keep masks (drawn by the implementation's documented key
    derivation; the reference only checks what is done with them)."""
    out = []
    for d, keep, dens in zip(deltas, keeps, densities, strict=True):
        res = {}
        for p in PATHS:
            if dens >= 1:
                res[p] = d[p]
                continue
            masked = np.where(keep[p], d[p], 0.0)
            if l1_rescale:
                before, after = np.abs(d[p]).sum(), np.abs(masked).sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            elif rescale:
                masked = masked / dens
            res[p] = masked
        out.append(res)
    return out


def dare_keeps(key, densities, base):
    """DARE's Bernoulli keep masks by the documented derivation:
    ``fold_in(fold_in(key, expert), crc32(keystr(leaf path)))``."""
    keeps = []
    for t, d in enumerate(densities):
        ek = jax.random.fold_in(key, t)
        res = {}
        for p in PATHS:
            path = "".join(f"[{k!r}]" for k in p)
            lk = jax.random.fold_in(ek, np.uint32(zlib.crc32(path.encode())))
            res[p] = np.asarray(jax.random.bernoulli(lk, d, np.shape(get(base, p))))
        keeps.append(res)
    return keeps


def ref_dare(
    base, experts, keeps, *, density, scaling=1.0, weights=None, rescale=True, l1_rescale=False
):
    k = len(experts)
    weights = weights or [1.0] * k
    dropped = ref_dare_drop(
        _deltas(base, experts), keeps, _densities(density, k), rescale, l1_rescale
    )
    return _ref_gta(base, dropped, weights, False, False, scaling)


def ref_dare_ties(
    base,
    experts,
    keeps,
    *,
    density,
    scaling=1.0,
    weights=None,
    rescale=True,
    l1_rescale=False,
    normalize=False,
):
    k = len(experts)
    weights = weights or [1.0] * k
    dropped = ref_dare_drop(
        _deltas(base, experts), keeps, _densities(density, k), rescale, l1_rescale
    )
    return _ref_gta(base, dropped, weights, True, normalize, scaling)


def ref_fisher(base, experts, fishers, *, weights=None, fisher_floor=1e-20):
    k = len(experts)
    weights = weights or [1.0] * k
    out = {}
    for p in PATHS:
        f = [
            w * np.maximum(f64(get(fi, p)), fisher_floor)
            for w, fi in zip(weights, fishers, strict=True)
        ]
        th = [f64(get(e, p)) for e in experts]
        out[p] = sum(a * b for a, b in zip(f, th, strict=True)) / sum(f)
    return out


def ref_ota(base, experts, curvatures, *, power=0.5, weights=None, scaling=1.0):
    k = len(experts)
    weights = weights or [1.0] * k
    deltas = _deltas(base, experts)
    out = {}
    for p in PATHS:
        c = [w * f64(cu[p]) ** power for w, cu in zip(weights, curvatures, strict=True)]
        num, den = sum(a * d[p] for a, d in zip(c, deltas, strict=True)), sum(c)
        out[p] = f64(get(base, p)) + scaling * np.where(
            den == 0, 0.0, num / np.where(den == 0, 1, den)
        )
    return out


def ref_prune(base, expert, scores, *, density, scope="tensor"):
    masks = ref_masks([scores], [density], scope)[0]
    return {p: np.where(masks[p], f64(get(expert, p)), f64(get(base, p))) for p in PATHS}


def assert_tree_close(result, expected, rtol=1e-10, atol=1e-12):
    """``result`` against a reference keyed by path, at the reference's tolerance."""
    trees.assert_tree_close(result, expected, rtol=rtol, atol=atol)
