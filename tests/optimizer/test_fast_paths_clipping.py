"""Clipping and the overflow-safe sums of the update, on CPU's guarded path and on the
one-pass path of GPU/TPU.

- The clipped square sums handle overflowing gradients like the two-pass norm, and every
  finite gradient, vmapped leaves' included, is clipped to the same update.
- ε_t follows step 7 with or without the prefix certificate of ``‖W‖``.
- The one-pass square sums have the derivatives of the plain ones.
- Without clipping, overflowing gradients leave finite updates and state, equal to the
  float64 reference, and the shares of R equal float64 ones at any scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize(
    ("magnitude", "clip_threshold"),
    [(1.0, None), (1.0, 1.0), (1e-15, 1.0), (1e30, 1.0), (1e33, 1.0), (1e15, None)],
)
def test_clipped_square_sums_equal_float64_sums(magnitude, clip_threshold):
    """Row and column sums of the clipped gradient squared, its norm and the clip factor,
    for a 3-D leaf with two row axes, rows of scales 1e3 apart and an all-zero row block;
    with ``magnitude ≥ 1e30`` ``‖G‖²`` overflows float32."""
    from types import SimpleNamespace

    from umtam_jax.optimizer._clipping import clipped_square_sums

    g = np.random.default_rng(5).normal(size=(3, 4, 5))
    g[0, 0] *= 1e3
    g[1] = 0.0
    g32 = jnp.asarray(g * magnitude, jnp.float32)
    cfg = SimpleNamespace(clip_threshold=clip_threshold)
    rows, cols, norm, half = jax.jit(lambda x: clipped_square_sums(x, cfg, 2))(g32)
    g64 = np.asarray(g32, np.float64)
    norm64 = np.linalg.norm(g64)
    factor = 1.0 if clip_threshold is None else min(1.0, clip_threshold / norm64)
    clipped = g64 * factor
    np.testing.assert_allclose(rows, np.sum(clipped**2, axis=2), rtol=2e-5)
    np.testing.assert_allclose(cols, np.sum(clipped**2, axis=(0, 1)), rtol=2e-5)
    np.testing.assert_allclose(float(norm), np.linalg.norm(clipped), rtol=2e-5)
    # The clipped gradient is (g · half) · half.
    np.testing.assert_allclose(float(half) ** 2, factor, rtol=2e-5)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("error_decay", [0.9, 0.0])
def test_overflowing_gradient_is_clipped_like_the_two_pass_norm(error_decay):
    params = {"w": jnp.full((16, 12), 0.5, jnp.float32)}
    opt = umtam_jax.scale_by_umtam(
        rank=2, min_dim_size_to_factor=8, clip_threshold=1.0, error_decay=error_decay
    )
    state = opt.init(params)
    huge = jnp.full((16, 12), 1e30, jnp.float32)  # ‖G‖² overflows float32, ‖G‖ does not
    updates, state = jax.jit(opt.update)({"w": huge}, state, params)
    assert np.all(np.isfinite(updates["w"]))
    # Clipped G = G / ‖G‖: each entry 1/√192; R, C are their (1 − b2)-weighted squares.
    leaf = state.leaves["w"]
    np.testing.assert_allclose(leaf.row, 1e-8 * 0.999 + 0.001 * 12 / 192, rtol=1e-5)
    np.testing.assert_allclose(leaf.col, 1e-8 * 0.999 + 0.001 * 16 / 192, rtol=1e-5)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("magnitude", [1e30, 1e36, 3e37, 3e38])
def test_any_finite_gradient_is_clipped_to_the_same_update(magnitude, lean):
    """Clipping maps c·G to G/‖G‖ for every c > 0, also where the clip factor τ/‖c·G‖ is
    below float32's smallest normal number (‖c·G‖ ≳ 1e38) or ‖c·G‖ itself overflows."""
    rng = np.random.default_rng(3)
    # A decaying spectrum, so the rank-2 subspace is well determined.
    direction = rng.normal(size=(16, 2)) @ np.diag([3.0, 1.0]) @ rng.normal(size=(2, 12))
    direction = (direction + 0.01 * rng.normal(size=(16, 12))) / np.abs(direction).max()
    bias = rng.uniform(0.5, 1.0, size=12)
    params = {"w": jnp.full((16, 12), 0.5, jnp.float32), "b": jnp.zeros(12, jnp.float32)}
    lean_kwargs = {"error_decay": 0.0, "saliency": "final"} if lean else {}
    opt = umtam_jax.scale_by_umtam(
        rank=2, min_dim_size_to_factor=8, clip_threshold=1.0, **lean_kwargs
    )

    def update(scale):
        grads = {"w": jnp.asarray(direction * scale, jnp.float32)}
        grads["b"] = jnp.asarray(bias * scale, jnp.float32)
        return jax.jit(opt.update)(grads, opt.init(params), params)

    reference, _ = update(1.0)  # ‖G‖ > τ: clipped on the ordinary path
    updates, state = update(magnitude)
    for name in ("w", "b"):
        assert np.all(np.isfinite(updates[name]))
        np.testing.assert_allclose(
            updates[name], reference[name], rtol=1e-4, atol=1e-4 * np.abs(reference[name]).max()
        )
    # Against float64: the clipped gradients G/‖G‖ in R (factored) and in the momentum m
    # (dense), b1 = 0.9, b2 = 0.999, eps = 1e-8 at step 1.
    w_clipped = direction / np.linalg.norm(direction)
    np.testing.assert_allclose(
        state.leaves["w"].row, 0.999e-8 + 0.001 * np.sum(w_clipped**2, axis=1), rtol=1e-5
    )
    np.testing.assert_allclose(state.leaves["b"].mu, 0.1 * bias / np.linalg.norm(bias), rtol=1e-5)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("magnitude", [1e38, 3e38])
def test_huge_gradients_of_vmapped_leaves_are_clipped_like_single_leaves(magnitude):
    """Grouped leaves and the layers of a scanned stack are vmapped: there XLA computed
    ``x / max|x|`` as ``x · (1 / max|x|)``, whose reciprocal is subnormal (flushed to 0)
    beyond ~8.5e37, so the update was 0 or NaN and the state inf or NaN."""
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(16, 12)), rng.uniform(0.5, 1.0, size=12)
    w /= np.abs(w).max()  # entries of magnitude at most `magnitude`: finite in float32
    grads = {"w1": w * magnitude, "w2": w, "b1": b * magnitude, "b2": b}
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
    params = {k: jnp.full(v.shape, 0.5, jnp.float32) for k, v in grads.items()}
    kwargs = {"rank": 2, "min_dim_size_to_factor": 8, "svd_method": "exact"}

    def run(opt, g, p):
        return jax.jit(opt.update)(g, opt.init(p), p)[0]

    want = run(umtam_jax.scale_by_umtam(**kwargs), grads, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(want))
    grouped = run(umtam_jax.scale_by_umtam(group_leaves=True, **kwargs), grads, params)
    stack = lambda t: {"blocks": {n: jnp.stack([t[n + "1"], t[n + "2"]]) for n in "wb"}}  # noqa: E731
    scanned = umtam_jax.scale_by_umtam(row_axes=umtam_jax.scanned("blocks"), **kwargs)
    layers = run(scanned, stack(grads), stack(params))["blocks"]
    for name in ("w1", "w2", "b1", "b2"):
        atol = 1e-5 * float(np.abs(want[name]).max())  # float32 rounding, not 0 or NaN
        np.testing.assert_allclose(grouped[name], want[name], rtol=1e-4, atol=atol)
        got = layers[name[0]][int(name[1]) - 1]
        np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=atol)


def _weights(case, rng):
    w = 0.5 * rng.normal(size=(64, 32))
    if case == "small_tail":  # ‖W‖ < ‖G‖: only the full norm gives the ratio
        w[:-1] = 0.0
        w[-1] *= 1e-3
    elif case == "large_tail":  # the prefix cannot certify, the full norm does
        w[:-8] *= 1e-4
    elif case == "zero":
        w[:] = 0.0
    return w


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("case", ["trained", "small_tail", "large_tail", "zero"])
def test_adaptive_eps_follows_step_7_with_or_without_the_prefix_certificate(case):
    from types import SimpleNamespace

    from umtam_jax.optimizer._clipping import adaptive_eps

    w = _weights(case, np.random.default_rng(3))
    g_norm = 1.0
    w_norm = np.linalg.norm(w)
    expected = 1e-3 * max(1.0, g_norm / w_norm if w_norm > 0 else 1.0)
    got = jax.jit(lambda g, w: adaptive_eps(SimpleNamespace(eps=1e-3), g, w))(
        jnp.float32(g_norm), jnp.asarray(w, jnp.float32)
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    if case == "small_tail":
        assert expected > 1e-3 * 100  # the case exercises a ratio above 1


@pytest.mark.parametrize("magnitude", [1.0, 1e30])
@pytest.mark.parametrize("axes", [(0, 1), (1,)])
def test_the_one_pass_square_sums_have_the_derivatives_of_the_plain_ones(magnitude, axes):
    """JAX cannot differentiate the variadic reduction itself: its rule gives d‖x‖ = x/‖x‖
    (also where ‖x‖² overflows) and d(scale² · ssq) = 2x, against float64 NumPy."""
    from umtam_jax.optimizer._clipping import _square_sum_parts

    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * magnitude

    def norm(v):
        scale, ssq = _square_sum_parts(v, axes)
        return jnp.sum(scale * jnp.sqrt(ssq))

    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.sum(x64**2, axis=axes, keepdims=True))
    np.testing.assert_allclose(jax.grad(norm)(jnp.asarray(x)), want, rtol=2e-5, atol=1e-7)
    if magnitude == 1.0:

        def square_sum(v):
            scale, ssq = _square_sum_parts(v, axes)
            return jnp.sum(jnp.square(scale) * ssq)

        np.testing.assert_allclose(jax.grad(square_sum)(jnp.asarray(x)), 2 * x64, rtol=2e-5)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_without_clipping_an_overflowing_gradient_leaves_finite_updates_and_state(magnitude):
    """Sums of G² overflow float32 here (‖G‖ does not); R, C and a dense v saturate
    instead of making Ŝ = inf / inf, so neither this step nor the following ones are NaN."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.ones(4)}
    opt = umtam_jax.scale_by_umtam(rank=2, min_dim_size_to_factor=1, clip_threshold=None)
    state = opt.init(params)
    step = jax.jit(opt.update)
    grads = [{"w": jnp.full((8, 4), magnitude), "b": jnp.full((4,), magnitude)}]
    grads += [jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)] * 3
    for g in grads:
        updates, state = step(g, state, params)
        for leaf in jax.tree.leaves((updates, state)):
            assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


@pytest.mark.usefixtures("code_path")
def test_without_clipping_a_gradient_whose_row_sums_pass_8e37_matches_the_reference():
    """sum(R) = 4.8e38 here (each R_i 6e37): Ŝ's shares R_i / sum(R) were computed as
    products with 1 / sum(R), which float32 flushes to 0 past about 8.5e37, so Ŝ was 0 and
    this step and the following ones were ~1e4 times the momentum (9e20 at unit
    gradients). Every step equals the float64 reference of the equations, in a scalar leaf
    too (there XLA rewrote (√(1 − b2)·g)² into (1 − b2)·g², which overflowed, and v
    saturated: the steps were 0.54 instead of 3.16)."""
    from tests.optimizer.reference import DenseReference, FactoredReference, Hyper

    hp = Hyper(rank=2, clip_threshold=None)
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        "b": jnp.ones(6),
        "s": jnp.ones(()),
    }
    opt = umtam_jax.scale_by_umtam(
        rank=2, min_dim_size_to_factor=1, clip_threshold=None, svd_method="exact"
    )
    state = opt.init(params)
    leaf = state.leaves["w"]
    refs = {
        "w": FactoredReference(np.asarray(leaf.u), np.asarray(leaf.v), params["w"], hp),
        "b": DenseReference(params["b"], hp),
        "s": DenseReference(params["s"], hp),
    }
    step = jax.jit(opt.update)
    grads = [jax.tree.map(lambda x: jnp.full_like(x, 1e20), params)]
    grads += [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)] * 3
    for g in grads:
        updates, state = step(g, state, params)
        for name, ref in refs.items():
            want = ref.step(np.asarray(g[name], np.float64), np.asarray(params[name], np.float64))
            got = np.asarray(updates[name], np.float64)
            assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), (name, got, want)


@pytest.mark.parametrize("scale", [1e-36, 1.0, 3e37])
def test_the_shares_of_r_equal_float64_ones_at_any_scale(scale):
    """R_i / sum(R) from entries near float32's smallest normal (R of a leaf whose
    gradients have been zero for ~60,000 steps) to sums past its largest."""
    from umtam_jax.optimizer._clipping import shares

    r = scale * np.random.default_rng(0).uniform(0.5, 8.0, size=(2, 1024))
    got = jax.jit(lambda x: shares(x, (1,)))(jnp.asarray(r, jnp.float32))
    want = r / r.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6)


@pytest.mark.parametrize("buffer_dtype", [None, jnp.bfloat16])
def test_without_clipping_the_saliency_of_moved_weights_saturates_instead_of_overflowing(
    buffer_dtype,
):
    """Where R and C saturate, (W − W0)² · sqrt(R_i C_j) passed float32's largest value as
    soon as |W − W0| > 1, and every saliency entry was inf (the merge then refused the
    expert); the average saturates there, as R, C and v do. Each step's saliency equals the
    float64 equation from the state's own moments, clamped to the largest float."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "b": jnp.ones(8)}
    opt = umtam_jax.scale_by_umtam(rank=2, min_dim_size_to_factor=1, clip_threshold=None,
                                   buffer_dtype=buffer_dtype)  # fmt: skip
    state, w0 = opt.init(params), jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    step = jax.jit(opt.update)
    alpha = 0.9  # the default saliency_decay
    saliency, clamped = {k: np.zeros(v.shape) for k, v in w0.items()}, []
    for magnitude in (1e22, 1e22, 1.0):
        grads = jax.tree.map(lambda x, m=magnitude: jnp.full_like(x, m), params)
        updates, state = step(grads, state, params)  # the saliency reads these params
        stored = state.leaves["w"].saliency.dtype
        top = min(float(np.finfo(np.float32).max), float(jnp.finfo(stored).max))
        for name, leaf in state.leaves.items():
            dev = np.square(np.asarray(params[name], np.float64) - w0[name])
            if name == "w":
                r, c = (np.asarray(x, np.float64) for x in (leaf.row, leaf.col))
                fresh = dev * np.sqrt(r)[:, None] * np.sqrt(c)[None, :]
            else:
                fresh = dev * np.sqrt(np.asarray(leaf.nu, np.float64))
            want = np.minimum(alpha * saliency[name] + (1 - alpha) * np.minimum(fresh, top), top)
            got = np.asarray(leaf.saliency, np.float64)
            assert np.all(np.isfinite(got)), name
            np.testing.assert_allclose(got, want, rtol=1e-2 if buffer_dtype else 1e-5)
            saliency[name] = got
            clamped.append(name == "w" and fresh.max() > top)
        params = jax.tree.map(lambda p, u: p - 3.0 * u, params, updates)  # |W − W0| > 1
    assert any(clamped)  # the factored leaf's (W − W0)² · sqrt(R_i C_j) passed it
