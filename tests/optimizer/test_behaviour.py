"""UMTAM as an Optax citizen beyond the shared contract: fast SVD, memory modes, dtypes,
extreme and empty input (see test_contract.py; statistics and Flax in test_statistics.py,
validation of hyper-parameters and inputs in test_validation.py)."""

from __future__ import annotations

import gc
import warnings
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.compilations import compilations
from umtam_jax.optimizer import _eager
from umtam_jax.optimizer._lowrank import exact_svd, subspace_svd

SMALL = dict(rank=4, min_dim_size_to_factor=8)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
    }


def _grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(opt, params, steps=6, jit=True):
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    outs = []
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        outs.append(updates)
    return outs, state, update


# ----------------------------------------------------------------------------- fast SVD


def _trajectory(m=256, n=192, signal_rank=16, decay=0.85, steps=60, seed=0):
    """Gradients with a decaying low-rank signal whose coefficients fluctuate, plus noise."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(m, signal_rank)))
    right, _ = np.linalg.qr(rng.normal(size=(n, signal_rank)))
    spectrum = decay ** np.arange(signal_rank)
    for _ in range(steps):
        coefficients = spectrum * (1 + 0.3 * rng.normal(size=signal_rank))
        noise = 0.05 * rng.normal(size=(m, n)) / np.sqrt(n)
        yield (left * coefficients) @ right.T + noise


def _updates_and_momenta(method, grads, rank=16):
    params = {"w": jnp.full(grads[0].shape, 0.02)}
    opt = umtam_jax.umtam(1.0, rank=rank, svd_method=method)
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, momenta = [], []
    for g in grads:
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        updates.append(np.asarray(u["w"], np.float64))
        momenta.append(np.asarray(umtam_jax.momentum(state)["w"], np.float64))
    return updates, momenta


def test_subspace_method_tracks_exact_svd_along_a_training_trajectory():
    grads = list(_trajectory())
    fast_updates, fast_momenta = _updates_and_momenta("subspace", grads)
    exact_updates, exact_momenta = _updates_and_momenta("exact", grads)
    for t in range(10, len(grads)):  # after a short warm-up of the warm start
        captured_fast = np.linalg.norm(fast_momenta[t]) ** 2
        captured_exact = np.linalg.norm(exact_momenta[t]) ** 2
        assert abs(captured_fast / captured_exact - 1) < 0.01, t
        error = np.linalg.norm(fast_updates[t] - exact_updates[t])
        assert error / np.linalg.norm(exact_updates[t]) <= 1e-2, t


def test_subspace_method_on_a_flat_tail_spectrum_keeps_captured_energy():
    # No spectral gap at rank 16: single directions are ambiguous, captured energy is not.
    grads = list(_trajectory(signal_rank=64, steps=40))
    fast_updates, fast_momenta = _updates_and_momenta("subspace", grads)
    exact_updates, exact_momenta = _updates_and_momenta("exact", grads)
    ratios = [
        np.linalg.norm(f) ** 2 / np.linalg.norm(e) ** 2
        for f, e in zip(fast_momenta, exact_momenta, strict=True)
    ]
    assert min(ratios[10:]) > 0.99
    errors = [
        np.linalg.norm(f - e) / np.linalg.norm(e)
        for f, e in zip(fast_updates, exact_updates, strict=True)
    ]
    assert np.median(errors[10:]) <= 1e-2


def test_subspace_svd_with_a_good_warm_start_matches_exact_truncation():
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.normal(size=(120, 40)))
    right, _ = np.linalg.qr(rng.normal(size=(90, 40)))
    matrix = jnp.asarray((left * 0.7 ** np.arange(40)) @ right.T, jnp.float32)
    warm = jnp.asarray(right[:, :8] + 0.05 * rng.normal(size=(90, 8)), jnp.float32)
    fast = subspace_svd(matrix, warm, 8, power_iterations=1)
    exact = exact_svd(matrix, 8)
    fast, exact = (jax.tree.map(lambda x: np.asarray(x, np.float64), d) for d in (fast, exact))
    np.testing.assert_allclose(fast.s, exact.s, rtol=1e-3)
    reconstruct = lambda d: (d.u * d.s) @ d.v.T  # noqa: E731
    err = np.linalg.norm(reconstruct(fast) - reconstruct(exact)) / np.linalg.norm(
        reconstruct(exact)
    )
    assert err < 1e-3
    # Orthonormal factors, as the fixed-basis projection of svd_every > 1 assumes.
    np.testing.assert_allclose(fast.u.T @ fast.u, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(fast.v.T @ fast.v, np.eye(8), atol=1e-5)


def test_oversampling_draws_never_reuse_the_keys_of_the_initial_bases():
    """``split(k)[1]`` equals ``fold_in(k, 1)``: step 1's oversampling columns, drawn with
    ``fold_in(leaf key, t)``, were V0 itself (a rank-deficient sketch). The update's stream
    is now a key of its own."""
    from umtam_jax.optimizer._transform import _update_stream

    base = jax.random.key(0)
    data = jax.random.key_data
    for index in range(3):
        leaf_key = jax.random.fold_in(base, index)
        init_keys = [np.asarray(data(k)) for k in jax.random.split(leaf_key)]
        for t in range(1, 4):
            drawn = np.asarray(data(jax.random.fold_in(_update_stream(base, index), t)))
            assert not any(np.array_equal(drawn, k) for k in init_keys), (index, t)
    # The collision the stream avoids, so this test keeps meaning what it says.
    leaf_key = jax.random.fold_in(base, 0)
    assert np.array_equal(
        data(jax.random.split(leaf_key)[1]), data(jax.random.fold_in(leaf_key, 1))
    )


# ----------------------------------------------------------------------------- Optax citizenship


def test_no_recompilation_with_periodic_svd_or_adaptive_rank():
    # Every configuration of the contract suite is checked there; these add step counters.
    for kwargs in ({"svd_every": 3}, {"adaptive_rank": True, "rank_update_every": 2}):
        _, _, update = _run(umtam_jax.umtam(1e-2, **SMALL, **kwargs), _params(), steps=7)
        assert update._cache_size() == 1, kwargs


def test_eager_updates_compile_once(caplog):
    """``opt.update`` outside jit (optax's own examples loop that way): steps after the
    first compile nothing (no lax.cond is compiled again at each call)."""
    params = _params()
    opt = umtam_jax.umtam(1e-2, svd_every=2, **SMALL)
    state = opt.init(params)
    updates, state = opt.update(_grads(params, 0), state, params)
    with compilations(caplog) as compiled:
        for t in (1, 2):
            updates, state = opt.update(_grads(params, t), state, params)
    assert compiled == [], compiled[:3]
    jitted, _ = jax.jit(opt.update)(_grads(params, 2), _run_state(opt, params), params)
    eager, _ = opt.update(_grads(params, 2), _run_state(opt, params), params)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_a_transform_with_an_unhashable_layout_compiles_its_eager_update_once(caplog):
    class RowAxes:  # a mutable dataclass-like callable: __eq__ without __hash__
        __hash__ = None

        def __eq__(self, other):
            return isinstance(other, RowAxes)

        def __call__(self, path, shape):
            return 1 if len(shape) >= 2 else 0

    params, row_axes = _params(), RowAxes()
    inject = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    for opt in (
        umtam_jax.umtam(1e-2, row_axes=row_axes, **SMALL),
        inject(learning_rate=1e-2, row_axes=row_axes, **SMALL),  # a new transform each step
    ):
        state = opt.init(params)
        _, state = opt.update(_grads(params, 0), state, params)
        with compilations(caplog) as compiled:
            for t in (1, 2):
                _, state = opt.update(_grads(params, t), state, params)
        assert compiled == [], compiled[:3]


def test_equal_options_of_other_types_do_not_share_an_eager_compilation():
    """``np.float64(0.5) == 0.5`` (same hash): under x64 both keep a float32 leaf's state
    float32 (the NumPy option is read as the Python float), and each configuration's
    eager update equals its own jitted one, dtypes included, whichever ran first."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), _params())
        for b2 in (0.5, np.float64(0.5)):
            opt = umtam_jax.umtam(1e-2, b2=b2, **SMALL)
            state = opt.init(params)
            eager = opt.update(_grads(params, 0), state, params)
            jitted = jax.jit(opt.update)(_grads(params, 0), state, params)
            chex.assert_trees_all_equal(eager, jitted)
            chex.assert_trees_all_equal_dtypes(eager, jitted)
            chex.assert_trees_all_equal_dtypes(eager[1], state)


def _spy_compilations(monkeypatch) -> list:
    """Weak references to the eager updates compiled from now on."""
    _eager.clear()
    made, compile_update = [], _eager.compile_update

    def spy(*key):
        compiled = compile_update(*key)
        made.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(_eager, "compile_update", spy)
    return made


def test_eager_compilations_are_bounded_and_dropped_ones_freed(monkeypatch):
    """A long eager process (a notebook stepping many models) keeps a bounded number of
    compiled updates: each holds an executable, and XLA:CPU's hold about a hundred memory
    maps each (Linux allows a process 65,530; past that, compiling crashes)."""
    made = _spy_compilations(monkeypatch)
    params = {"b": jnp.ones((3,))}
    for n in range(_eager.CACHE_SIZE + 1):  # one more configuration than it keeps
        opt = umtam_jax.umtam(1e-2, b1=0.5 + n / 100)
        opt.update(params, opt.init(params), params)
    gc.collect()
    assert len(made) == _eager.CACHE_SIZE + 1
    assert made[0]() is None  # the least recently used configuration is gone
    assert made[-1]() is not None
    assert _eager.kept_executables() == _eager.CACHE_SIZE


def test_eager_executables_are_bounded_in_total(monkeypatch):
    """Signatures of one configuration (optax.multi_transform's groups, each its own tree)
    stay compiled while the kept executables are few; past the bound the least recently
    used configuration goes."""
    monkeypatch.setattr(_eager, "MAX_EXECUTABLES", 3)
    made = _spy_compilations(monkeypatch)
    opt = umtam_jax.umtam(1e-2)
    trees = [{"b": jnp.ones((n,))} for n in (1, 2, 3)]
    for _ in range(2):  # three signatures in turn: compiled once
        for params in trees:
            opt.update(params, opt.init(params), params)
    assert len(made) == 1 and _eager.kept_executables() == 3
    other = umtam_jax.umtam(1e-2, b1=0.5)  # one more executable than the bound
    other.update(trees[0], other.init(trees[0]), trees[0])
    gc.collect()
    assert made[0]() is None and _eager.kept_executables() == 1
    opt.update(trees[0], opt.init(trees[0]), trees[0])  # compiled afresh
    assert len(made) == 3


def test_one_configuration_past_the_executable_bound_warns(monkeypatch):
    """One configuration cycling more signatures than the bound compiles at every call:
    that was silent."""
    monkeypatch.setattr(_eager, "MAX_EXECUTABLES", 2)
    opt = umtam_jax.umtam(1e-2, b1=0.61)
    trees = [{"b": jnp.ones((n,))} for n in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for params in trees:  # at the bound: no warning
            opt.update(params, opt.init(params), params)
    third = {"b": jnp.ones((3,))}
    with pytest.warns(RuntimeWarning, match="more than 2 input signatures"):
        opt.update(third, opt.init(third), third)


def test_an_array_option_of_numpy_computes_eagerly_as_under_jit():
    """A NumPy option is a constant of ``jax.jit(opt.update)`` (folded in float64 on the
    host): eagerly too, not a float32 argument (7e-7 apart)."""
    params = _params()
    opt = umtam_jax.umtam(1e-2, b1=np.array(0.9), **SMALL)
    state = opt.init(params)
    eager, _ = opt.update(_grads(params, 0), state, params)
    jitted, _ = jax.jit(opt.update)(_grads(params, 0), state, params)
    chex.assert_trees_all_equal(eager, jitted)


@pytest.mark.parametrize("wrap", ["inject_hyperparams", "rebuilt"])
def test_eager_updates_compile_once_per_configuration(caplog, wrap):
    """``optax.inject_hyperparams`` builds a new transform at every step (its numeric
    hyper-parameters as arrays), as does code that rebuilds the optimizer: eager steps
    after the first still compile nothing, and equal the jitted step."""
    params = _params()
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    if wrap == "inject_hyperparams":
        inject = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
        make = lambda: inject(learning_rate=schedule, b1=0.9, **SMALL)  # noqa: E731
    else:
        make = lambda: umtam_jax.umtam(1e-2, **SMALL)  # noqa: E731
    state = make().init(params)
    updates, state = make().update(_grads(params, 0), state, params)
    with compilations(caplog) as compiled:
        for t in (1, 2):
            updates, state = make().update(_grads(params, t), state, params)
    assert compiled == [], compiled[:3]
    jitted, _ = jax.jit(make().update)(_grads(params, 3), state, params)
    eager, _ = make().update(_grads(params, 3), state, params)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def _run_state(opt, params):
    """The state after two updates from ``params``."""
    state = opt.init(params)
    for t in (0, 1):
        _, state = jax.jit(opt.update)(_grads(params, t), state, params)
    return state


def test_learning_rate_one_and_no_weight_decay_gives_minus_the_direction():
    params = _params()
    scale = umtam_jax.scale_by_umtam(**SMALL)
    full = umtam_jax.umtam(1.0, **SMALL)
    directions, _, _ = _run(scale, params)
    updates, _, _ = _run(full, params)
    for d, u in zip(directions, updates, strict=True):
        chex.assert_trees_all_close(u, jax.tree.map(lambda a: -a, d), rtol=1e-6)


def test_weight_decay_is_added_before_the_learning_rate():
    params = _params()
    decayed, _, _ = _run(umtam_jax.umtam(0.1, weight_decay=0.5, **SMALL), params, steps=2)
    plain, _, _ = _run(umtam_jax.umtam(0.1, **SMALL), params, steps=2)
    expected = jax.tree.map(lambda u, p: u - 0.1 * 0.5 * p, plain[-1], params)
    chex.assert_trees_all_close(decayed[-1], expected, rtol=1e-5)


def test_inject_hyperparams_without_static_args_explains_the_fix():
    with pytest.raises(TypeError, match="STATIC_HYPERPARAMS"):
        optax.inject_hyperparams(umtam_jax.umtam)(learning_rate=0.1, rank=4).init(_params())


# ----------------------------------------------------------------------------- memory modes


def test_lean_mode_keeps_no_matrix_sized_buffers():
    params = _params()
    opt = umtam_jax.umtam(0.1, error_decay=0.0, saliency="final", **SMALL)
    _, state, _ = _run(opt, params, steps=3)
    leaf = state[0].leaves["dense"]["kernel"]
    assert leaf.dense_momentum is None and leaf.saliency is None and leaf.initial is None
    with pytest.raises(ValueError, match="saliency='final'"):
        umtam_jax.saliency(state)
    final = umtam_jax.saliency(
        state, params=jax.tree.map(lambda p: p + 1.0, params), initial_params=params
    )
    row, col = np.asarray(leaf.row, np.float64), np.asarray(leaf.col, np.float64)
    np.testing.assert_allclose(final["dense"]["kernel"], np.sqrt(np.outer(row, col)), rtol=1e-5)


def test_buffer_dtype_sets_error_and_saliency_dtype():
    opt = umtam_jax.umtam(0.1, buffer_dtype=jnp.bfloat16, **SMALL)
    _, state, _ = _run(opt, _params(), steps=2)
    leaf = state[0].leaves["dense"]["kernel"]
    assert leaf.dense_momentum.dtype == jnp.bfloat16 and leaf.saliency.dtype == jnp.bfloat16
    assert leaf.row.dtype == jnp.float32


# ----------------------------------------------------------------------------- dtypes


def test_bfloat16_params_keep_float32_statistics_and_bfloat16_updates():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    updates, state, _ = _run(umtam_jax.umtam(0.1, **SMALL), params, steps=3)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates[-1]))
    leaf = state[0].leaves["dense"]["kernel"]
    for name in ("u", "sigma", "v", "row", "col", "saliency", "dense_momentum"):
        assert getattr(leaf, name).dtype == jnp.float32, name
    assert leaf.initial.dtype == jnp.bfloat16
    assert state[0].leaves["bias"].nu.dtype == jnp.float32


def test_float64_params_in_x64_mode():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), _params())
        updates, state, _ = _run(umtam_jax.umtam(0.1, **SMALL), params, steps=2)
        assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates[-1]))
        assert state[0].leaves["dense"]["kernel"].sigma.dtype == jnp.float64


def test_final_saliency_of_float64_params_is_computed_in_float64():
    """``saliency(state, params, initial)`` with ``saliency="final"``: (W − W0)² √(R_i C_j)
    in the parameters' precision; a float32 W − W0 of 1 + 1e-9 and 1 would be 0."""
    with jax.enable_x64(True):
        initial = jax.tree.map(lambda p: p.astype(jnp.float64) + 1.0, _params())
        params = jax.tree.map(lambda p: p + 1e-9, initial)
        opt = umtam_jax.umtam(0.1, saliency="final", **SMALL)
        _, state = opt.update(_grads(initial, 0), opt.init(initial), initial)
        got = umtam_jax.saliency(state, params, initial)
        stats = umtam_jax.statistics(state)
    kernel = stats["dense"]["kernel"]
    root = np.sqrt(np.outer(np.asarray(kernel.row), np.asarray(kernel.col)))
    deviation = np.asarray(params["dense"]["kernel"]) - np.asarray(initial["dense"]["kernel"])
    assert np.all(np.abs(deviation) > 5e-10)
    np.testing.assert_allclose(got["dense"]["kernel"], deviation**2 * root, rtol=1e-9)
    want_bias = (np.asarray(params["bias"]) - np.asarray(initial["bias"])) ** 2 * np.sqrt(
        np.asarray(stats["bias"].nu)
    )
    np.testing.assert_allclose(got["bias"], want_bias, rtol=1e-9)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", ["exact", "subspace"])
@pytest.mark.parametrize("grad_scale", [0.0, 1e30, 1e-30])
@pytest.mark.parametrize("param_scale", [0.0, 1.0])
def test_extreme_gradients_and_params_give_finite_updates_and_state(
    method, grad_scale, param_scale
):
    params = jax.tree.map(lambda p: p * param_scale, _params())
    opt = umtam_jax.umtam(0.1, svd_method=method, **SMALL)
    state = opt.init(params)
    for t in range(3):
        grads = jax.tree.map(lambda g: g * grad_scale, _grads(params, t))
        updates, state = opt.update(grads, state, params)
        for leaf in jax.tree.leaves((updates, state)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf)))
    if grad_scale:
        assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_unclipped_large_gradients_keep_a_finite_saliency_and_curvature():
    """Without clipping, R_i C_j can exceed float32's range (here ~1e42) while R, C, Ŝ and
    S = (1 − α)(W − W0)² √(R_i C_j) do not: they match a float64 reference."""
    initial = _params()
    params = jax.tree.map(lambda p: p + 0.5, initial)
    grads = jax.tree.map(lambda g: g * 3e11, _grads(initial, 0))
    opt = umtam_jax.umtam(0.1, clip_threshold=None, **SMALL)
    _, state = opt.update(grads, opt.init(initial), params)
    g = np.asarray(grads["dense"]["kernel"], np.float64)
    b2, eps, alpha = 0.999, 1e-8, 0.9
    row = b2 * eps + (1 - b2) * np.sum(g * g, axis=1)
    col = b2 * eps + (1 - b2) * np.sum(g * g, axis=0)
    assert np.max(np.outer(row, col)) > 1e40  # beyond float32
    deviation = np.asarray(params["dense"]["kernel"], np.float64) - np.asarray(
        initial["dense"]["kernel"], np.float64
    )
    want_saliency = (1 - alpha) * deviation**2 * np.sqrt(np.outer(row, col))
    want_curvature = np.outer(row, col) / row.sum()
    np.testing.assert_allclose(
        umtam_jax.saliency(state)["dense"]["kernel"], want_saliency, rtol=1e-5
    )
    np.testing.assert_allclose(
        umtam_jax.curvature(state)["dense"]["kernel"], want_curvature, rtol=1e-5
    )


@pytest.mark.usefixtures("code_path")
def test_non_finite_gradients_are_not_absorbed_and_apply_if_finite_skips_them():
    params = _params()
    grads = _grads(params, 0)
    grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.nan)
    grads["bias"] = grads["bias"].at[1].set(jnp.inf)
    opt = umtam_jax.umtam(0.1, **SMALL)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(updates["dense"]["kernel"])))
    assert not bool(jnp.all(jnp.isfinite(updates["bias"])))

    safe = optax.apply_if_finite(umtam_jax.umtam(0.1, **SMALL), max_consecutive_errors=3)
    state = safe.init(params)
    updates, state = safe.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(state.notfinite_count) == 1
    assert bool(jnp.all(umtam_jax.saliency(state)["dense"]["kernel"] == 0))


def test_empty_leaves_get_empty_updates_and_leave_the_others_unchanged():
    params = _params()
    with_empty = {**params, "empty": jnp.zeros((0, 16)), "no_cols": jnp.zeros((16, 0))}
    opt = umtam_jax.umtam(0.1, **SMALL)
    update = jax.jit(opt.update)
    state, state_e = opt.init(params), opt.init(with_empty)
    for t in range(3):
        grads = _grads(params, t)
        grads_e = {**grads, "empty": jnp.zeros((0, 16)), "no_cols": jnp.zeros((16, 0))}
        updates, state = update(grads, state, params)
        updates_e, state_e = update(grads_e, state_e, with_empty)
        assert updates_e["empty"].shape == (0, 16) and updates_e["no_cols"].shape == (16, 0)
        for name in params:
            chex.assert_trees_all_equal(updates[name], updates_e[name])
        params = optax.apply_updates(params, updates)
        with_empty = optax.apply_updates(with_empty, updates_e)


# ------------------------------------------------------------------ hyper-parameter dtypes


def _inject(**kwargs):
    return optax.inject_hyperparams(
        umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS, **kwargs
    )(learning_rate=1e-2, **SMALL)


def test_injected_16_bit_hyper_parameters_are_refused_naming_the_fix():
    """``inject_hyperparams`` gives hyper-parameters the parameters' dtype: in bfloat16
    ``b2=0.999`` is 1.0 (the second moments would freeze), so it is refused, under jit
    too; ``hyperparam_dtype=jnp.float32`` gives the updates of the plain transform."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    for init in (_inject().init, jax.jit(_inject().init)):
        with pytest.raises(TypeError, match="hyperparam_dtype=jnp.float32"):
            init(params)
    plain_16 = umtam_jax.umtam(jnp.bfloat16(1e-2), **SMALL)  # applied by Optax: allowed
    plain_16.update(_grads(params, 0), plain_16.init(params), params)
    injected, _, _ = _run(_inject(hyperparam_dtype=jnp.float32), params, steps=3)
    plain, _, _ = _run(umtam_jax.umtam(1e-2, **SMALL), params, steps=3)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), injected[-1]),
        jax.tree.map(lambda x: x.astype(jnp.float32), plain[-1]),
        rtol=2e-2,
        atol=1e-4,
    )


def test_float64_hyper_parameters_of_float32_leaves_in_x64_mode():
    """NumPy float64 options, and ``inject_hyperparams`` on a tree with a float64 leaf
    (which makes every injected value float64), keep a float32 leaf's state float32."""
    with jax.enable_x64(True):
        params = _params()
        numpy_opts = umtam_jax.umtam(1e-2, clip_threshold=np.float64(1.0), eps=np.float64(1e-8))
        plain = umtam_jax.umtam(1e-2, clip_threshold=1.0, eps=1e-8)
        got, _, _ = _run(numpy_opts, params, steps=2)
        want, _, _ = _run(plain, params, steps=2)
        chex.assert_trees_all_equal(got[-1], want[-1])
        mixed = {**params, "wide": jnp.ones((16, 12), jnp.float64)}
        opt = _inject()
        state = opt.init(mixed)
        for t in range(2):
            _, new = jax.jit(opt.update)(_grads(mixed, t), state, mixed)
            chex.assert_trees_all_equal_dtypes(new, state)
            state = new


def test_oversampling_wider_than_the_matrix_is_capped():
    """Lean mode with ``rank + oversampling`` above the smaller side: the sketch keeps
    min(m, n) columns, which span the whole row space, so the subspace method's factors
    are the exact SVD's (they failed to trace: the cold start's branches had two widths)."""
    params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(9, 4)), jnp.float32)}
    common = dict(rank=3, error_decay=0.0, min_dim_size_to_factor=2)
    sub = umtam_jax.umtam(1e-2, oversampling=2, svd_method="subspace", **common)
    exact = umtam_jax.umtam(1e-2, svd_method="exact", **common)
    got, _, _ = _run(sub, params, steps=3)
    want, _, _ = _run(exact, params, steps=3)
    chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-4, atol=1e-7)
