"""The performance paths of the optimizer compute the same thing as the plain ones.

- ``orthonormalize`` returns an orthonormal basis of the same column space as a
  Householder QR, also for ill-conditioned, rank-deficient, zero, tiny, huge and wide
  inputs, on both of its paths: CPU's (two Gram/eigh passes, the three through a
  conditional where those are not accurate) and GPU/TPU's (three passes, no conditional).
- ``LowRankPlusDense`` products equal those of the materialised matrix, and
  ``subspace_svd`` gives the same decomposition from either form.
- Without error buffer (γ = 0) UMTAM keeps M̃ factored; its updates and state equal those of
  the materialised path (forced here by a negligible γ), with and without ``svd_every``.
- The clipped square sums handle overflowing gradients like the two-pass norm, on CPU's
  guarded path and on the one-pass path of GPU/TPU.
- Donating both params and optimizer state to a jitted step works (W0 is its own buffer).
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from umtam_jax.optimizer._lowrank import LowRankPlusDense, exact_svd, subspace_svd
from umtam_jax.optimizer._orthonormalize import orthonormalize, orthonormalize_many


def _with_spectrum(rng, m, k, spectrum):
    left, _ = np.linalg.qr(rng.normal(size=(m, k)))
    right, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return (left * spectrum) @ right.T


def _gram(q):
    """``qᵀq`` in float64 NumPy (a jnp product would run as TF32 on a GPU)."""
    q = np.asarray(q, np.float64)
    return q.T @ q


def _same_span(q, y):
    """‖(I − q qᵀ) y‖ / ‖y‖: y lies in span(q)."""
    q, y = np.asarray(q, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(y - q @ (q.T @ y)) / max(np.linalg.norm(y), 1e-300)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e3, 1e5, 1e8, 1e12])
def test_orthonormalize_is_orthonormal_and_spans_the_input(condition):
    rng = np.random.default_rng(0)
    y = _with_spectrum(rng, 600, 24, np.geomspace(1.0, 1.0 / condition, 24))
    q = orthonormalize(jnp.asarray(y, jnp.float32))
    assert q.shape == (600, 24)
    np.testing.assert_allclose(_gram(q), np.eye(24), atol=2e-5)
    assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_orthonormalize_rank_deficient_zero_and_wide_inputs():
    rng = np.random.default_rng(1)
    rank3 = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 16))
    rank1 = np.outer(rng.normal(size=400), rng.normal(size=20))
    square = rng.normal(size=(32, 5)) @ rng.normal(size=(5, 32))  # Householder QR (< 2k rows)
    two_rows_per_column = rng.normal(size=(64, 3)) @ rng.normal(size=(3, 32))
    repeated = np.repeat(rng.normal(size=(300, 6)), 2, axis=1)
    graded_and_null = np.concatenate(
        [_with_spectrum(rng, 700, 10, np.geomspace(1.0, 1e-6, 10)), np.zeros((700, 6))], axis=1
    )
    cases = (rank3, rank1, square, two_rows_per_column, repeated, graded_and_null)
    for y in (*cases, np.zeros((200, 16))):
        q = orthonormalize(jnp.asarray(y, jnp.float32))
        k = y.shape[1]
        np.testing.assert_allclose(_gram(q), np.eye(k), atol=2e-5)
        assert _same_span(q, y) < 1e-5
    wide = orthonormalize(jnp.asarray(rng.normal(size=(5, 9)), jnp.float32))
    np.testing.assert_allclose(_gram(wide), np.eye(5), atol=1e-5)
    bad = orthonormalize(jnp.full((50, 4), jnp.nan, jnp.float32))
    assert bad.shape == (50, 4)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_orthonormalize_tiny_and_huge_inputs(scale):
    """Gram matrices of these would underflow or overflow float32: the input is first
    scaled to a unit peak."""
    y = np.random.default_rng(6).normal(size=(300, 12)) * scale
    q = orthonormalize(jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(_gram(q), np.eye(12), atol=2e-5)
    assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_orthonormalize_under_jit_matches_householder_span():
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.normal(size=(300, 12)), jnp.float32)
    q = jax.jit(lambda y: orthonormalize(y))(y)
    householder, _ = jnp.linalg.qr(y)
    q, householder = np.asarray(q, np.float64), np.asarray(householder, np.float64)
    # Same column space: the projectors agree.
    np.testing.assert_allclose(q @ q.T, householder @ householder.T, atol=1e-5)


@pytest.mark.usefixtures("code_path")
def test_a_rank_deficient_member_of_a_group_leaves_the_others_unchanged():
    """One matrix of a width group is rank-deficient: it gets a completed basis, and the
    well-conditioned stack beside it keeps the bases it gets alone."""
    rng = np.random.default_rng(4)
    good = rng.normal(size=(2, 120, 8))
    deficient = rng.normal(size=(120, 2)) @ rng.normal(size=(2, 8))
    ys = [jnp.asarray(good, jnp.float32), jnp.asarray(deficient, jnp.float32)]
    together = jax.jit(lambda ys: orthonormalize_many(ys))(ys)
    alone = jax.jit(lambda ys: orthonormalize_many(ys))(ys[:1])[0]
    np.testing.assert_allclose(np.asarray(together[0]), np.asarray(alone), atol=1e-6)
    for q, y in zip(
        [*np.asarray(together[0]), np.asarray(together[1])], [*good, deficient], strict=True
    ):
        np.testing.assert_allclose(_gram(q), np.eye(8), atol=2e-5)
        assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_equally_shaped_matrices_get_the_bases_they_get_alone():
    """Off CPU the matrices of one shape are stacked for their products: each, a stack
    among them, gets back its own basis, in order."""
    rng = np.random.default_rng(6)
    shapes = [(96, 8), (64, 8), (96, 8), (3, 96, 8), (64, 8), (40, 8)]
    ys = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
    together = jax.jit(orthonormalize_many)(ys)
    for y, q in zip(ys, together, strict=True):
        assert q.shape == y.shape
        alone = jax.jit(orthonormalize_many)([y])[0]
        np.testing.assert_allclose(np.asarray(q), np.asarray(alone), atol=1e-6)
        matrices = (np.reshape(x, (-1, *x.shape[-2:])) for x in (q, y))
        for qi, yi in zip(*matrices, strict=True):
            np.testing.assert_allclose(_gram(qi), np.eye(8), atol=2e-5)
            assert _same_span(qi, yi) < 1e-5


def _data_dependent_conditionals(stablehlo: str) -> int:
    """``stablehlo.case`` ops whose branch index is not the lowering platform's (a constant
    of an export for one platform, and the cases that derive from it)."""
    constant = set(re.findall(r"^\s*(%[\w#]+) = stablehlo\.constant", stablehlo, re.M))
    count = 0
    case = r"^\s*(%[\w#]+)(?::\d+)? = \"stablehlo\.case\"\((%[\w#]+)\)"
    for result, index in re.findall(case, stablehlo, re.M):
        if index in constant:
            constant.add(result)
        else:
            count += 1
    return count


@pytest.mark.parametrize(
    ("settings", "expected"),
    [({}, 0), ({"error_decay": 0.0, "saliency": "final"}, 1)],
    ids=["default", "lean"],
)
def test_the_gpu_update_has_as_many_conditionals_for_one_leaf_as_for_many(settings, expected):
    """Lowered for a GPU (no GPU needed), the default update has no conditional whose
    predicate is device data (a wait for the device there), lean mode one (the first step's
    extra power iterations), for one leaf, five leaves of four layouts, a 12- and a 2-layer
    stack alike; the orthonormalisations have none. On CPU the overflow guards and the
    orthonormalisations' fallback add theirs."""
    from jax import export

    def conditionals(params, platform):
        opt = umtam_jax.umtam(1e-3, rank=4, min_dim_size_to_factor=8, **settings)
        state = jax.eval_shape(opt.init, params)
        exported = export.export(jax.jit(opt.update), platforms=(platform,))
        module = exported(params, state, params).mlir_module()
        assert "stablehlo.while" not in module  # a loop's predicate would be device data too
        return _data_dependent_conditionals(module)

    spec = jax.ShapeDtypeStruct
    one = {"w": spec((32, 16), jnp.float32)}
    many = {
        **one,
        "v": spec((24, 16), jnp.float32),
        "wide": spec((16, 40), jnp.float32),
        "stack": spec((3, 8, 32), jnp.float32),
        "bias": spec((16,), jnp.float32),
    }
    counts = {conditionals(tree, "cuda") for tree in (one, many)}
    counts |= {
        conditionals({"w": spec((layers, 32, 16), jnp.float32)}, "cuda") for layers in (12, 2)
    }
    assert counts == {expected}
    assert conditionals(many, "cpu") > expected


@pytest.mark.parametrize(
    "settings", [{}, {"error_decay": 0.0, "saliency": "final"}], ids=["default", "lean"]
)
def test_the_gpu_update_reads_a_leaf_three_times_for_its_sums(settings):
    """Lowered for a GPU (no GPU needed), the update of one factored leaf reduces its m×n
    arrays three times: the row and the column sums of G² and ‖W‖, each one overflow-safe
    pass (computing the direct and the rescaled sums and selecting took eight)."""
    from jax import export

    params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32)}
    opt = umtam_jax.umtam(1e-3, rank=8, **settings)
    state = jax.eval_shape(opt.init, params)
    lowered = export.export(jax.jit(opt.update), platforms=("cuda",))(params, state, params)
    reductions = [
        line
        for line in lowered.mlir_module().splitlines()
        if "stablehlo.reduce" in line and "tensor<256x128xf32>" in line.split("->")[0]
    ]
    assert len(reductions) == 3


def test_the_cpu_update_has_no_householder_qr_of_a_sketch():
    """On CPU the orthonormalisation's fallback for inaccurate bases is the conditional-free
    passes, not LAPACK's QR of an m×k sketch (slow there; a zero momentum takes it every
    step): the update lowered for CPU calls LAPACK only for k×k eigh and small SVDs."""
    from jax import export

    spec = jax.ShapeDtypeStruct
    params = {"w": spec((32, 16), jnp.float32), "stack": spec((3, 64, 24), jnp.float32)}
    opt = umtam_jax.umtam(1e-3, rank=4, min_dim_size_to_factor=8)
    state = jax.eval_shape(opt.init, params)
    exported = export.export(jax.jit(opt.update), platforms=("cpu",))
    module = exported(params, state, params).mlir_module()
    calls = set(re.findall(r"custom_call @(\w+)", module))
    assert calls == {"lapack_ssyevd_ffi", "lapack_sgesdd_ffi"}


def test_low_rank_plus_dense_products_and_decomposition_match_the_dense_matrix():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        dense = jnp.asarray(rng.normal(size=(60, 40)))
        left, right = jnp.asarray(rng.normal(size=(60, 6))), jnp.asarray(rng.normal(size=(40, 6)))
        op = LowRankPlusDense(dense, 0.3, left, right)
        full = 0.3 * dense + left @ right.T
        w, q = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.normal(size=(60, 5)))
        np.testing.assert_allclose(op.matmul(w), full @ w, rtol=1e-12)
        np.testing.assert_allclose(op.rmatmul(q), q.T @ full, rtol=1e-12)
        assert op.shape == (60, 40) and op.dtype == jnp.float64
        warm = jnp.asarray(rng.normal(size=(40, 6)))
        for kwargs in ({}, {"power_iterations": 2}, {"oversampling": 3, "key": jax.random.key(0)}):
            a = subspace_svd(op, warm, 6, **kwargs)
            b = subspace_svd(full, warm, 6, **kwargs)
            np.testing.assert_allclose(a.s, b.s, rtol=1e-9)
            np.testing.assert_allclose((a.u * a.s) @ a.v.T, (b.u * b.s) @ b.v.T, atol=1e-9)


def test_subspace_svd_factors_are_orthonormal_on_a_decaying_spectrum():
    rng = np.random.default_rng(4)
    matrix = jnp.asarray(_with_spectrum(rng, 300, 200, 0.93 ** np.arange(200)), jnp.float32)
    warm = jnp.asarray(rng.normal(size=(200, 16)), jnp.float32)
    dec = subspace_svd(matrix, warm, 16, power_iterations=4)
    np.testing.assert_allclose(_gram(dec.u), np.eye(16), atol=2e-5)
    np.testing.assert_allclose(_gram(dec.v), np.eye(16), atol=2e-5)
    # Random start, slow decay: the leading values have converged, the tail not yet.
    exact = exact_svd(matrix, 16)
    np.testing.assert_allclose(dec.s[:10], exact.s[:10], rtol=1e-4)


def _run(opt, params, steps, seed=0):
    state = opt.init(params)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(seed)
    outs = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = update(grads, state, params)
        outs.append(updates)
    return outs, state


@pytest.mark.parametrize("svd_every", [1, 3])
def test_factored_momentum_path_equals_the_materialised_one(svd_every, monkeypatch):
    """γ = 0 keeps M̃ = b1 U Σ Vᵀ + (1 − b1) G̃ factored; a negligible γ forces the
    materialised path, and both must agree (float64, so only the algorithm is compared).
    Both run the first step's extra power iterations (by default only γ = 0 has them)."""
    from umtam_jax.optimizer import _decomposition

    monkeypatch.setattr(
        _decomposition,
        "cold_start_iterations",
        lambda cfg: _decomposition.COLD_START_POWER_ITERATIONS,
    )
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        params = {
            "w": jnp.asarray(rng.normal(size=(40, 24))),
            "conv": jnp.asarray(rng.normal(size=(3, 8, 24))),
            "b": jnp.asarray(rng.normal(size=(24,))),
        }
        common = dict(rank=5, min_dim_size_to_factor=8, svd_every=svd_every, saliency="final")
        lean, lean_state = _run(umtam_jax.umtam(1.0, error_decay=0.0, **common), params, 9)
        full, full_state = _run(umtam_jax.umtam(1.0, error_decay=1e-300, **common), params, 9)
        assert lean_state[0].leaves["w"].dense_momentum is None
        assert full_state[0].leaves["w"].dense_momentum is not None
        chex.assert_trees_all_close(lean, full, rtol=1e-9, atol=1e-12)
        for quantity in (umtam_jax.momentum, umtam_jax.curvature):
            chex.assert_trees_all_close(
                quantity(lean_state), quantity(full_state), rtol=1e-9, atol=1e-12
            )


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


def test_params_and_state_can_both_be_donated():
    params = {"w": jnp.ones((16, 12)), "b": jnp.zeros(12)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=8)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        params, state = step(params, state, grads)
    assert np.all(np.isfinite(params["w"]))
    np.testing.assert_array_equal(umtam_jax.statistics(state)["w"].row.shape, (16,))


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


def test_shard_alike_is_found_where_jax_keeps_it(monkeypatch):
    """Without the public module the one under ``jax._src`` stands in; with neither
    module, None (keep_like is then a no-op, below)."""
    import sys

    from jax._src import shard_alike as private

    from umtam_jax.optimizer import _sharding

    assert _sharding.shard_alike is not None
    monkeypatch.setitem(sys.modules, "jax.experimental.shard_alike", None)  # import fails
    assert _sharding.find_shard_alike() is private.shard_alike
    monkeypatch.setitem(sys.modules, "jax._src.shard_alike", None)
    assert _sharding.find_shard_alike() is None
    assert _sharding.find_shard_alike(("umtam_jax",)) is None  # a module without it


def test_without_shard_alike_the_update_is_unchanged(monkeypatch):
    """Where JAX has no ``shard_alike``, the sharding hint is skipped and a
    single-device update is the same, a 3-D leaf (reshaped internally) included."""
    from umtam_jax.optimizer import _sharding

    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=1)
    state = opt.init(params)
    want, _ = jax.jit(opt.update)(grads, state, params)
    monkeypatch.setattr(_sharding, "shard_alike", None)
    tree = {"a": jnp.ones(3)}
    assert _sharding.keep_like(tree, tree) is tree
    got, _ = jax.jit(lambda g, s, p: opt.update(g, s, p))(grads, state, params)  # traced anew
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


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
@pytest.mark.parametrize("svd_method", ["exact", "subspace"])
@pytest.mark.parametrize("clip_threshold", [1.0, None])
def test_the_update_is_differentiable_with_respect_to_the_params(svd_method, clip_threshold):
    """Meta-learning through a step: the derivative of the update with respect to the
    parameters (which also give the gradient) matches central finite differences. Rank 1:
    at higher ranks the orthonormalisation's eigh has repeated eigenvalues, where its
    derivative is undefined (docs/algorithm.md §2.8)."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    direction = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    opt = umtam_jax.scale_by_umtam(rank=1, min_dim_size_to_factor=1, svd_method=svd_method,
                                   clip_threshold=clip_threshold)  # fmt: skip

    def loss(p):
        params = {"w": p}
        g = {"w": jnp.sin(3 * p) + 0.2}
        updates, _ = opt.update(g, opt.init(params), params)
        return jnp.sum(updates["w"] * probe)

    grad = jax.jit(jax.grad(loss))(w)
    assert np.all(np.isfinite(grad))
    h = 1e-2
    fd = (loss(w + h * direction) - loss(w - h * direction)) / (2 * h)
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=3e-2)


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
