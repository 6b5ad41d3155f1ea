"""UMTAM's memory modes (lean mode, ``buffer_dtype``, oversampling capped in lean mode) and
dtypes: bfloat16 and float64 parameters, final saliency in float64, 16-bit and float64
hyper-parameters (statistics and Flax in test_statistics.py, validation of
hyper-parameters and inputs in test_validation.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.behaviour_helpers import SMALL, _grads, _params, _run

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
