"""Float64 NumPy references of mergekit's data-free interpolation methods (linear, slerp,
nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, passthrough) and the
cases run against them, shared by the interpolation tests (``test_interpolation_*.py``)."""

from __future__ import annotations

import numpy as np

from tests import trees
from tests.merging import helpers as H
from umtam_jax import merging

# ------------------------------------------------------------------ float64 references


def _norm(x):
    return float(np.sqrt(np.sum(x * x)))


def ref_linear(base, ws, weights=None, normalize=True):
    c = [1.0] * len(ws) if weights is None else weights
    total = sum(ci * w for ci, w in zip(c, ws, strict=True))
    return total / sum(c) if normalize else total


def ref_slerp(a, ws, t):
    x, y = a.ravel(), ws[0].ravel()
    na, nb = _norm(x), _norm(y)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    cos = min(max(float(np.dot(x / na, y / nb)), -1.0), 1.0)
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    th = np.arccos(cos)
    return ((np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)).reshape(a.shape)


def _pair_slerp(v1, v2, t):
    u1, u2 = v1 / max(_norm(v1), 1e-7), v2 / max(_norm(v2), 1e-7)
    cos = min(max(float(np.dot(u1, u2)), -1.0), 1.0)
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v1 + t * v2
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * v1 + np.sin(t * th) * v2) / np.sin(th)


def _in_out(ref):
    """``ref``, stated for PyTorch (d_out, d_in) weights, with a ``layout`` argument: a Flax
    (d_in, d_out) kernel is given to it transposed over its last two axes."""

    def with_layout(base, ws, layout="in_out", **kwargs):
        if layout == "out_in" or ws[0].ndim < 2:
            return ref(base, ws, **kwargs)
        t = lambda x: None if x is None else np.swapaxes(x, -1, -2)  # noqa: E731
        return t(ref(t(base), [t(w) for w in ws], **kwargs))

    return with_layout


@_in_out
def ref_nuslerp(base, ws, weights=None, nuslerp_flatten=True, nuslerp_row_wise=False):
    c1, c2 = (1.0, 1.0) if weights is None else weights
    t = 0.5 if abs(c1 + c2) < 1e-6 else c2 / (c1 + c2)
    b = np.zeros_like(ws[0]) if base is None else base
    v1, v2 = ws[0] - b, ws[1] - b
    if nuslerp_flatten or v1.ndim == 0:
        return b + _pair_slerp(v1.ravel(), v2.ravel(), t).reshape(b.shape)
    axis = 0 if nuslerp_row_wise else v1.ndim - 1
    r1, r2 = np.moveaxis(v1, axis, -1), np.moveaxis(v2, axis, -1)
    out = np.empty_like(r1)
    for idx in np.ndindex(r1.shape[:-1]):
        out[idx] = _pair_slerp(r1[idx], r2[idx], t)
    return b + np.moveaxis(out, -1, axis)


def ref_multislerp(base, ws, weights=None, normalize_weights=True, eps=1e-8):
    if len(ws) == 1:
        return ws[0]
    b = np.zeros_like(ws[0]) if base is None else base
    xs = [(w - b).ravel() for w in ws]
    c = np.ones(len(ws)) if weights is None else np.asarray(weights, np.float64)
    if normalize_weights:
        c = c / c.sum()
    norms = [_norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
    m = sum(ci * u for ci, u in zip(c, units, strict=True))
    if _norm(m) < eps:
        assert len(ws) == 2
        return (c[0] * xs[0] + c[1] * xs[1]).reshape(b.shape) + b
    m = m / _norm(m)
    g = sum(ci * (u - np.dot(u, m) * m) for ci, u in zip(c, units, strict=True))
    gn = _norm(g) + eps
    out = (m * np.cos(gn) + g * np.sin(gn) / gn) * sum(
        n * ci for n, ci in zip(norms, c, strict=True)
    )
    return out.reshape(b.shape) + b


def ref_karcher(base, ws, max_iter=10, tol=1e-5):
    if len(ws) == 1:
        return ws[0]
    xs = [w.ravel() for w in ws]
    norms = [_norm(x) for x in xs]
    kept = [i for i, n in enumerate(norms) if n > tol]
    if not kept:
        return np.zeros_like(ws[0])
    units = {i: xs[i] / norms[i] for i in kept}
    a = 1.0 / len(kept)
    m = sum(a * units[i] for i in kept)
    m = units[kept[0]].copy() if _norm(m) < tol else m / _norm(m)
    for _ in range(max_iter):
        g = np.zeros_like(m)
        for i in kept:
            dot = min(max(float(np.dot(m, units[i])), -1.0), 1.0)
            th = np.arccos(dot)
            if th >= tol:
                g += a * th / np.sin(th) * (units[i] - dot * m)
        gn = _norm(g)
        if gn < tol:
            break
        m = np.cos(gn) * m + np.sin(gn) * g / gn
        if _norm(m) > tol:
            m = m / _norm(m)
    return (np.mean(norms) * m).reshape(ws[0].shape)


@_in_out
def ref_model_stock(base, ws, filter_wise=False):
    k = len(ws)
    shape = (-1, base.shape[-1]) if filter_wise and base.ndim >= 2 else (1, -1)
    w0, xs = base.reshape(shape), [w.reshape(shape) for w in ws]
    out = np.empty_like(w0)
    for r in range(w0.shape[0]):
        d = [x[r] - w0[r] for x in xs]
        cs = [
            np.clip(np.dot(d[i], d[j]) / max(_norm(d[i]) * _norm(d[j]), 1e-6), -1, 1)
            for i in range(k)
            for j in range(i + 1, k)
        ]
        cos = np.mean(cs)
        den = 1 + (k - 1) * cos
        t = 0.0 if abs(den) < 1e-6 else k * cos / den
        out[r] = t * np.mean([x[r] for x in xs], axis=0) + (1 - t) * w0[r]
    return out.reshape(base.shape)


def ref_nearswap(base, ws, t):
    (w,) = ws
    s = np.clip(t / np.maximum(np.abs(base - w), 1e-6), 0, 1)
    return s * w + (1 - s) * base


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_arcee_fusion(base, ws):
    (w,) = ws
    a, b = np.atleast_1d(base), np.atleast_1d(w)
    p, q = _softmax(b) + 1e-8, _softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.sort(imp.ravel())
    n = s.size - 1
    thr = s[n // 2] + 1.5 * (s[3 * n // 4] - s[n // 4])
    return (a + (b - a) * (imp >= thr)).reshape(base.shape)


def ref_passthrough(base, ws, scale=1.0):
    return ws[0] * scale


# name -> (reference, number of experts, one expert given alone, kwargs variants)
CASES = {
    "linear": (ref_linear, 3, False, [{}, {"weights": [0.5, 2.0, -0.7], "normalize": False}]),
    "slerp": (ref_slerp, 1, True, [{"t": 0.3}, {"t": 1.0}]),
    "nuslerp": (
        ref_nuslerp,
        2,
        False,
        [
            {},
            {"weights": [0.3, 1.1], "nuslerp_flatten": False},
            {"weights": [2.0, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True},
            {"weights": [0.3, 1.1], "nuslerp_flatten": False, "layout": "out_in"},
            {"nuslerp_flatten": False, "nuslerp_row_wise": True, "layout": "out_in"},
        ],
    ),
    "multislerp": (
        ref_multislerp,
        3,
        False,
        [
            {},
            {"weights": [0.2, 1.0, 0.5]},
            {"weights": [0.2, 0.4, 0.3], "normalize_weights": False},
        ],
    ),
    "karcher": (ref_karcher, 3, False, [{}, {"max_iter": 3, "tol": 1e-3}]),
    "model_stock": (
        ref_model_stock,
        3,
        False,
        [{}, {"filter_wise": True}, {"filter_wise": True, "layout": "out_in"}],
    ),
    "nearswap": (ref_nearswap, 1, True, [{"t": 0.05}]),
    "arcee_fusion": (ref_arcee_fusion, 1, True, [{}]),
    "passthrough": (ref_passthrough, 1, False, [{}, {"scale": -0.5}]),
}
BASE_OPTIONAL = ("linear", "nuslerp", "multislerp", "karcher", "passthrough")
VARIANTS = [(name, i) for name, case in CASES.items() for i in range(len(case[3]))]


def _call(name, base, experts, kwargs):
    _, k, single, _ = CASES[name]
    fn = getattr(merging, name)
    return fn(base, experts[0] if single else experts[:k], **kwargs)


def _reference(name, base, experts, kwargs):
    """The reference applied leaf by leaf: a dict by leaf path."""
    ref, k, _, _ = CASES[name]
    get = lambda t, p: None if t is None else H.get(t, p)  # noqa: E731
    paths = trees.leaves_by_path(experts[0])
    return {p: ref(get(base, p), [get(e, p) for e in experts[:k]], **kwargs) for p in paths}
