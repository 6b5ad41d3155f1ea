"""mergekit's data-free interpolation methods in degenerate cases (parallel, antipodal,
zero and empty vectors, balancing weights) against their exact values, their option
errors, and their parameters traced under ``jit``."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umtam_jax import merging


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


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
    # eps = 0 with an expert that did not move the leaf: its direction is 0 (not 0 / 0),
    # and sin γ / γ → 1 where the tangent g vanishes; the same as a tiny eps.
    unmoved = [_w(1.0, 2.0), _w(0.0, 0.0)]
    _close(merging.multislerp(_w(0.0, 0.0), unmoved, eps=0.0), _w(0.5, 1.0))
    # ... and a mean direction of exactly 0: the two experts' linear fallback, as eps > 0.
    opposite = [_w(1.0, 0.0), _w(-3.0, 0.0)]
    _close(merging.multislerp(_w(0.0, 0.0), opposite, eps=0.0), _w(-1.0, 0.0))


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
    # tol = 0: equal directions (θ = 0, θ / sin θ → 1) and a vanishing step or mean divide
    # by nothing; opposite experts give what a tiny tol gives.
    _close(merging.karcher(None, [a, _w(6.0, 8.0)], tol=0.0), _w(4.5, 6.0))
    _close(merging.karcher(None, [a, a], tol=0.0), a)
    opposite = [a, _w(-3.0, -4.0)]
    _close(merging.karcher(None, opposite, tol=0.0), merging.karcher(None, opposite, tol=1e-12))
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
    # A sum that is 0 but not in floating point (1.5e-8 in float32) is refused too.
    for merge, flag in ((merging.linear, "normalize"), (merging.multislerp, "normalize_weights")):
        with pytest.raises(ValueError, match=f"{flag}=True divides by the sum of the weights"):
            merge(None, [a, b, a], weights=[0.3, -0.1, -0.2])
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
