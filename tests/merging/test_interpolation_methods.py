"""mergekit's data-free interpolation methods (linear, slerp, nuslerp, multislerp, karcher,
model_stock, nearswap, arcee_fusion, passthrough) against float64 NumPy references written
here, in degenerate cases, in bfloat16, out of core, and (where mergekit and torch import)
against mergekit's own tensor-level functions, e.g. from the repository root with ``mk`` a
virtual environment holding mergekit, torch and the test dependencies::

    PYTHONPATH=. mk/bin/python -m pytest tests/merging/test_interpolation_methods.py -k mergekit
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import trees
from umtam_jax import checkpoint, engine, merging

from . import helpers as H


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


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


def test_registered_with_mergekit_names():
    for name, (_, _, single, _) in CASES.items():
        method = merging.METHODS[name]
        assert method.fn is getattr(merging, name)
        assert method.single_expert is single
        assert method.base_optional is (name in BASE_OPTIONAL)
    assert merging.METHODS["slerp"].defaults() == {"t": merging.REQUIRED}
    assert merging.METHODS["nuslerp"].defaults() == {
        "weights": None,
        "nuslerp_flatten": True,
        "nuslerp_row_wise": False,
        "layout": "in_out",
    }
    assert merging.METHODS["karcher"].defaults() == {"max_iter": 10, "tol": 1e-5}


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_matches_float64_reference(x64, name, variant):
    rng = np.random.default_rng(variant + 17 * list(CASES).index(name))
    base, experts = H.random_experts(rng, 3)
    kwargs = CASES[name][3][variant]
    got = _call(name, base, experts, kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(base)
    trees.assert_tree_close(got, _reference(name, base, experts, kwargs), rtol=1e-10, atol=1e-10)
    if name in BASE_OPTIONAL:
        got = _call(name, None, experts, kwargs)
        want = _reference(name, None, experts, kwargs)
        trees.assert_tree_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_computed_in_float32_and_cast_back(name):
    rng = np.random.default_rng(5)
    base = {"w": rng.standard_normal((6, 5))}
    experts = [{"w": base["w"] + 0.1 * rng.standard_normal((6, 5))} for _ in range(3)]
    cast = lambda t, dt: jax.tree.map(lambda x: np.asarray(x, dt), t)  # noqa: E731
    base, experts = cast(base, jnp.bfloat16), [cast(e, jnp.bfloat16) for e in experts]
    kwargs = CASES[name][3][-1]
    got = _call(name, base, experts, kwargs)["w"]
    assert got.dtype == jnp.bfloat16
    f32 = _call(name, cast(base, np.float32), [cast(e, np.float32) for e in experts], kwargs)
    np.testing.assert_array_equal(got, np.asarray(f32["w"]).astype(jnp.bfloat16))
    want = _reference(name, cast(base, np.float64), [cast(e, np.float64) for e in experts], kwargs)
    # Within one bfloat16 rounding of the float64 result.
    trees.assert_tree_close({"w": got}, want, rtol=2.0**-8, atol=1e-6)


# ------------------------------------------------------------------ degenerate cases


def _w(*values):
    return {"w": jnp.asarray(values, jnp.float64)}


# Degenerate results against their exact values, in float64.
_close = functools.partial(chex.assert_trees_all_close, rtol=0, atol=1e-12)


def test_slerp_degenerate(x64):
    a = _w(1.0, 2.0, -1.0)
    _close(merging.slerp(a, _w(2.0, 4.0, -2.0), t=0.25), _w(1.25, 2.5, -1.25))  # parallel: lerp
    _close(merging.slerp(a, _w(-1.0, -2.0, 1.0), t=0.25), _w(0.5, 1.0, -0.5))  # antiparallel
    zero = merging.slerp(_w(0.0, 0.0, 0.0), _w(3.0, 0.0, 4.0), t=0.5)  # norm 0 counts as 1
    _close(zero, _w(*np.sin(np.pi / 4) * np.array([3.0, 0.0, 4.0])))
    _close(merging.slerp(a, _w(0.0, 1.0, 5.0), t=0.0), _w(1.0, 2.0, -1.0))
    empty = merging.slerp({"w": jnp.zeros((0, 3))}, {"w": jnp.zeros((0, 3))}, t=0.5)
    assert empty["w"].shape == (0, 3)
    # t is unbounded as in mergekit: parallel vectors extrapolate linearly.
    _close(merging.slerp(a, _w(2.0, 4.0, -2.0), t=1.5), _w(2.5, 5.0, -2.5))
    with pytest.raises(ValueError, match="t must be finite"):
        merging.slerp(a, a, t=float("nan"))
    with pytest.raises(TypeError, match="requires the parameter 't'"):
        merging.merge("slerp", a, a)
    with pytest.raises(TypeError, match="slerp needs the base model"):
        merging.slerp(None, a, t=0.5)


@pytest.mark.parametrize(
    "options",
    [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
)
@pytest.mark.parametrize("scale", [-1.0, -3.0, 2.0])
def test_nuslerp_of_colinear_float32_vectors_interpolates_linearly(options, scale):
    # In float32 the cosine of opposite vectors rounds away from −1: still colinear.
    a = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    got = merging.nuslerp(None, [{"w": a}, {"w": scale * a}], weights=[1.0, 2.0], **options)
    t = 2.0 / 3.0
    want = (1 - t) * a.astype(np.float64) + t * scale * a.astype(np.float64)  # the lerp
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-5, atol=1e-5)


def test_nuslerp_degenerate(x64):
    a, b = _w(1.0, 2.0), _w(3.0, 6.0)
    _close(merging.nuslerp(None, [a, b], weights=[1.0, 3.0]), _w(2.5, 5.0))  # colinear: lerp
    _close(merging.nuslerp(None, [a, b], weights=[1.0, -1.0]), _w(2.0, 4.0))  # Σ = 0: t = 0.5
    base = _w(1.0, 1.0)
    got = merging.nuslerp(base, [_w(2.0, 1.0), _w(1.0, 2.0)])
    _close(got, _w(1.0 + np.sqrt(0.5), 1.0 + np.sqrt(0.5)))
    with pytest.raises(ValueError, match="nuslerp merges exactly 2 experts, got 3"):
        merging.nuslerp(None, [a, b, a])
    with pytest.raises(ValueError, match="got 3 weights for 2 experts"):
        merging.nuslerp(None, [a, b], weights=[1.0, 1.0, 1.0])


def test_multislerp_degenerate(x64):
    a = _w(1.0, 2.0)
    _close(merging.multislerp(_w(5.0, 5.0), [a]), _w(1.0, 2.0))  # one expert: itself
    # Antipodal pair with balancing weights: the linear fallback.
    _close(merging.multislerp(None, [a, _w(-2.0, -4.0)]), _w(-0.5, -1.0))
    _close(merging.multislerp(_w(1.0, 1.0), [_w(2.0, 3.0), _w(-1.0, -3.0)]), _w(0.5, 0.0))
    with pytest.raises(ValueError, match=r"multislerp: at \['w'\] the weighted sum"):
        merging.multislerp(None, [a, _w(-1.0, -2.0), _w(1.0, 2.0)], weights=[1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="normalize_weights=True divides by the sum"):
        merging.multislerp(None, [a, a], weights=[1.0, -1.0])
    _close(merging.multislerp(None, [a, a], weights=[1.0, -1.0], normalize_weights=False), _w(0, 0))
    with pytest.raises(ValueError, match=r"eps must lie in \[0"):
        merging.multislerp(None, [a, a], eps=-1.0)


def test_multislerp_leaves_a_leaf_no_expert_moved_as_it_is():
    """A frozen leaf (every task vector 0) and an empty leaf come back unchanged with three
    experts, eagerly, under ``jit`` and with a finite gradient over the weights; the leaves
    the experts moved are merged as before."""
    base = {"frozen": jnp.ones((3,)), "empty": jnp.zeros((0, 2)), "w": jnp.zeros(2)}
    moved = [jnp.array([1.0, 2.0]), jnp.array([2.0, -1.0]), jnp.array([0.5, 0.5])]
    experts = [{**base, "w": w} for w in moved]
    want = merging.multislerp({"w": base["w"]}, [{"w": w} for w in moved])["w"]
    for fn in (merging.multislerp, jax.jit(merging.multislerp)):
        got = fn(base, experts)
        np.testing.assert_array_equal(got["frozen"], base["frozen"])
        assert got["empty"].shape == (0, 2)
        np.testing.assert_allclose(got["w"], want, rtol=1e-6)

    def loss(weights):
        out = merging.multislerp(base, experts, weights=weights)
        return jnp.sum(out["frozen"]) + jnp.sum(out["w"] ** 2)

    grad = jax.grad(loss)(jnp.array([1.0, 2.0, 3.0]))
    assert np.isfinite(np.asarray(grad)).all()


def test_karcher_degenerate(x64):
    a = _w(3.0, 4.0)
    _close(merging.karcher(None, [a]), _w(3.0, 4.0))
    _close(merging.karcher(None, [_w(0.0, 0.0), _w(1e-7, 0.0)]), _w(0.0, 0.0))  # all ≤ tol
    # A zero expert is left out of the direction but counts in the mean norm.
    _close(merging.karcher(None, [a, _w(0.0, 0.0)]), _w(1.5, 2.0))
    _close(merging.karcher(None, [a, _w(6.0, 8.0)]), _w(4.5, 6.0))  # parallel
    got = merging.karcher(None, [_w(1.0, 0.0), _w(0.0, 1.0)], max_iter=0)
    _close(got, _w(np.sqrt(0.5), np.sqrt(0.5)))
    with pytest.raises(TypeError, match="max_iter must be a non-negative integer"):
        merging.karcher(None, [a, a], max_iter=2.5)
    with pytest.raises(ValueError, match=r"max_iter must lie in \[0"):
        merging.karcher(None, [a, a], max_iter=-1)


def test_model_stock_degenerate(x64):
    base = _w(1.0, 1.0)
    same = merging.model_stock(base, [_w(2.0, 3.0), _w(2.0, 3.0)])  # cos 1: t = 1
    _close(same, _w(2.0, 3.0))
    # Opposite task vectors: 1 + (K−1) cos θ = 0, the base is kept.
    _close(merging.model_stock(base, [_w(2.0, 3.0), _w(0.0, -1.0)]), _w(1.0, 1.0))
    _close(merging.model_stock(base, [base, base]), _w(1.0, 1.0))  # zero task vectors: t = 0
    with pytest.raises(ValueError, match="model_stock merges at least 2 experts, got 1"):
        merging.model_stock(base, [base])
    with pytest.raises(TypeError, match="model_stock needs the base model"):
        merging.model_stock(None, [base, base])


def test_nearswap_arcee_fusion_passthrough_degenerate(x64):
    base, expert = _w(0.0, 1.0, 2.0), _w(0.0, 1.5, -2.0)
    _close(merging.nearswap(base, expert, t=0.0), _w(0.0, 1.0, 2.0))
    _close(merging.nearswap(base, expert, t=-3.0), _w(0.0, 1.0, 2.0))
    _close(merging.nearswap(base, expert, t=10.0), _w(0.0, 1.5, -2.0))
    _close(merging.arcee_fusion(base, base), _w(0.0, 1.0, 2.0))
    scalar = merging.arcee_fusion({"s": jnp.float64(1.0)}, {"s": jnp.float64(3.0)})
    assert float(scalar["s"]) == 3.0  # one entry: its importance is the threshold
    ones = {"w": jnp.ones((4, 4))}  # ≥ 3/4 of the entries unchanged: threshold 0, all kept
    changed = {"w": jnp.ones((4, 4)).at[0, 0].set(2.0)}
    np.testing.assert_array_equal(merging.arcee_fusion(ones, changed)["w"], changed["w"])
    model = {"w": jnp.arange(3.0)}
    assert merging.passthrough(None, [model])["w"] is model["w"]
    _close(merging.passthrough(base, [model], scale=2.0), _w(0.0, 2.0, 4.0))
    with pytest.raises(ValueError, match="passthrough merges exactly one expert, got 2"):
        merging.passthrough(None, [model, model])


def test_linear_degenerate(x64):
    a, b = _w(1.0, 2.0), _w(3.0, 5.0)
    _close(merging.linear(a, [a, b], weights=[1.0, -1.0], normalize=False), _w(-2.0, -3.0))
    with pytest.raises(ValueError, match="normalize=True divides by the sum of the weights"):
        merging.linear(None, [a, b], weights=[1.0, -1.0])
    _close(merging.merge("linear", None, [a, b]), _w(2.0, 3.5))


def test_jit_with_traced_parameters():
    base, expert = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
    fn = jax.jit(lambda b, e, t: merging.slerp(b, e, t=t)["w"])
    np.testing.assert_allclose(fn(base, expert, 0.5), merging.slerp(base, expert, t=0.5)["w"])
    fn = jax.jit(lambda b, e, c: merging.nuslerp(None, [b, e], weights=[1.0, c])["w"])
    want = merging.nuslerp(None, [base, expert], weights=[1, 3])["w"]
    np.testing.assert_allclose(fn(base, expert, 3.0), want, rtol=1e-6)
    fn = jax.jit(lambda e, n: merging.karcher(None, [e, base], max_iter=n)["w"])
    np.testing.assert_allclose(
        fn(expert, 2), merging.karcher(None, [expert, base], max_iter=2)["w"]
    )


# ------------------------------------------------------------------ out of core


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    rng = np.random.default_rng(1)
    base, experts = H.random_experts(rng, 3, dtype=np.float32)
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i, e in enumerate(experts):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], e)
    restored = [checkpoint.restore_params(paths[f"e{i}"]) for i in range(3)]
    return paths, checkpoint.restore_params(paths["base"]), restored


@pytest.mark.parametrize("name,variant", [(n, len(c[3]) - 1) for n, c in CASES.items()])
def test_out_of_core_equals_in_memory(ckpts, tmp_path, name, variant):
    paths, base, experts = ckpts
    _, k, _, variants = CASES[name]
    out = tmp_path / "out"
    kwargs = variants[variant]
    dirs = [paths[f"e{i}"] for i in range(k)]
    engine.merge_checkpoints(
        name, paths["base"], dirs, out, progress=False, group_bytes=100, **kwargs
    )
    want = _call(name, base, experts, kwargs)
    got = checkpoint.restore_params(out)
    trees.assert_trees_equal(got, want)


@pytest.mark.parametrize(
    ("name", "k", "error"),
    [("nuslerp", 3, "exactly 2 experts, got 3"), ("model_stock", 1, "at least 2 experts, got 1")],
)
def test_out_of_core_refuses_a_wrong_expert_count_before_reading(
    ckpts, tmp_path, monkeypatch, name, k, error
):
    paths, _, _ = ckpts
    dirs = [paths[f"e{i}"] for i in range(k)]

    def opened(*args, **kwargs):
        raise AssertionError("an input was opened before the count was checked")

    monkeypatch.setattr(engine._checkpoints, "open_source", opened)
    with pytest.raises(ValueError, match=f"{name} merges {error}"):
        engine.merge_checkpoints(name, paths["base"], dirs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ mergekit itself


def _mergekit_parameters(name, kwargs, k):
    """mergekit's parameters for umtam_jax's ``kwargs`` (``weights`` → per-model ``weight``;
    no ``layout``: mergekit's tensors are PyTorch weights, ``layout="out_in"`` here)."""
    params = {key: v for key, v in kwargs.items() if key != "layout"}
    if "weights" in params or name in ("linear", "nuslerp", "multislerp"):
        params["weight"] = params.pop("weights", None) or [1.0] * k
    return params


def test_mergekit_equality():
    pytest.importorskip("mergekit")
    torch = pytest.importorskip("torch")
    from mergekit.merge_methods import get as mergekit_method
    from mergekit.merge_methods import merge_tensors

    # Parameter names and defaults are mergekit's (weight → weights; required stays so,
    # except the weights, which default to 1.0 each here).
    for name in CASES:
        ours = merging.METHODS[name].defaults()
        for p in mergekit_method(name).spec.parameters:
            key = "weights" if p.name == "weight" else p.name
            assert key in ours, (name, p.name)
            if p.required and key != "weights":
                assert ours[key] is merging.REQUIRED, (name, key)
            elif not p.required and key != "scale":
                assert ours[key] == p.default, (name, key)
    assert merging.METHODS["passthrough"].defaults()["scale"] == 1.0  # mergekit: None

    rng = np.random.default_rng(3)
    shapes = {"a": (12, 16), "b": (16,), "c": (2, 3, 4), "d": ()}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    experts = [
        {n: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for n, x in base.items()}
        for _ in range(3)
    ]
    for name, variant in VARIANTS:
        _, k, single, variants = CASES[name]
        kwargs = variants[variant]
        with_base = name not in ("linear", "karcher", "passthrough")
        if merging.METHODS[name].param("layout") is not None:
            kwargs = {**kwargs, "layout": "out_in"}  # the tensors below are PyTorch weights
        for use_base in {with_base, False} if name in ("nuslerp", "multislerp") else {with_base}:
            b = base if use_base else None
            got = _call(name, b, experts, kwargs)
            params = _mergekit_parameters(name, kwargs, k)
            for leaf in shapes:
                tensors = [torch.from_numpy(np.array(e[leaf])) for e in experts[:k]]
                if use_base:
                    tensors.insert(0, torch.from_numpy(np.array(base[leaf])))
                want = merge_tensors(
                    tensors, name, parameters=params, base_index=0 if use_base else None
                ).numpy()
                assert want.dtype == np.float32
                np.testing.assert_allclose(
                    np.asarray(got[leaf]),
                    want,
                    rtol=0,
                    atol=1e-5,
                    err_msg=f"{name} {kwargs} {leaf}",
                )


# (method, [base or None, *experts], mergekit's parameters)
DEGENERATE = [
    ("slerp", [[1, 2, -1], [2, 4, -2]], {"t": 0.25}),  # parallel
    ("slerp", [[0, 0, 0], [3, 0, 4]], {"t": 0.5}),  # a zero norm
    ("nuslerp", [None, [1, 2], [3, 6]], {"weight": [1.0, -1.0]}),  # colinear, Σ weight 0
    ("multislerp", [None, [1, 2], [-2, -4]], {"weight": [1.0, 1.0]}),  # antipodal
    ("multislerp", [[5, 5], [1, 2]], {"weight": [1.0]}),  # one expert
    ("karcher", [None, [3, 4], [0, 0]], {}),  # a zero expert
    ("karcher", [None, [0, 0], [1e-7, 0]], {}),  # all norms ≤ tol
    ("karcher", [None, [1, 0], [0, 1]], {"max_iter": 0}),
    ("karcher", [None, [1, 0], [-1, 1e-3], [0, 1]], {}),  # nearly antipodal
    ("model_stock", [[1, 1], [2, 3], [0, -1]], {}),  # 1 + (K−1) cos θ = 0
    ("model_stock", [[1, 1], [1, 1], [1, 1]], {}),  # zero task vectors
    ("nearswap", [[0, 1, 2], [0, 1.5, -2]], {"t": 0.7}),  # an equal entry
    ("arcee_fusion", [[1] * 16, [2] + [1] * 15], {}),  # threshold 0: all kept
    ("passthrough", [None, [1, 2, 3]], {"scale": 2.0}),
]


def test_mergekit_equality_degenerate():
    pytest.importorskip("mergekit")
    torch = pytest.importorskip("torch")
    from mergekit.merge_methods import merge_tensors

    for name, inputs, params in DEGENERATE:
        base, *experts = [None if x is None else np.asarray(x, np.float32) for x in inputs]
        tensors = [torch.from_numpy(x) for x in ([] if base is None else [base]) + experts]
        want = merge_tensors(
            tensors, name, parameters=params, base_index=None if base is None else 0
        )
        kwargs = {("weights" if k == "weight" else k): v for k, v in params.items()}
        tree = lambda x: {"w": jnp.asarray(x)}  # noqa: E731
        single = merging.METHODS[name].single_expert
        args = tree(experts[0]) if single else [tree(x) for x in experts]
        got = getattr(merging, name)(None if base is None else tree(base), args, **kwargs)
        np.testing.assert_allclose(got["w"], want.numpy(), rtol=0, atol=1e-6, err_msg=name)
