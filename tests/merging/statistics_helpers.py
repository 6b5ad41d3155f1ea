"""Float64 NumPy references of what one statistics node gives (docs/algorithm.md §3): the
momentum U Σ Vᵀ (μ for a dense leaf), the curvature R_i C_j / ΣR (ν) and the saliency (the
tracked one, else (W − W0)² √(R_i C_j), √ν for a dense leaf), shared by the merging
references of ``helpers`` and the tests, which reach them as ``helpers.ref_curvature`` etc."""

from __future__ import annotations

import numpy as np

from umtam_jax.optimizer._state import FactoredStatistics


def f64(x):
    return np.asarray(x, np.float64)


def ref_curvature(node):
    if isinstance(node, FactoredStatistics):
        r, c = f64(node.row), f64(node.col)
        return np.multiply.outer(r, c) / r.sum()
    return f64(node.nu)


def ref_momentum(node):
    if isinstance(node, FactoredStatistics):
        u, v = f64(node.u), f64(node.v)
        rows, cols = u.shape[:-1], v.shape[:-1]
        m = u.reshape(-1, u.shape[-1]) @ f64(node.sigma) @ v.reshape(-1, v.shape[-1]).T
        return m.reshape(rows + cols)
    return f64(node.mu)


def ref_saliency(node, w, w0):
    if node.saliency is not None:
        return f64(node.saliency)
    delta = f64(w) - f64(w0)
    if isinstance(node, FactoredStatistics):
        root = np.sqrt(np.multiply.outer(f64(node.row), f64(node.col)))
    else:
        root = np.sqrt(f64(node.nu))
    return delta**2 * root
