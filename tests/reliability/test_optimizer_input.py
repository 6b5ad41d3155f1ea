"""The optimizer refuses bad hyper-parameters at construction with one clear error, and
takes the inputs optax's own transforms take (Python scalar leaves, abstract init)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax


@pytest.mark.parametrize("lr", [None, "1e-3", [1e-3], {"lr": 1e-3}, jnp.ones(2)])
def test_learning_rate_that_is_not_a_number_or_schedule(lr):
    with pytest.raises(TypeError, match="learning_rate must be"):
        umtam_jax.umtam(lr)


def test_learning_rates_that_work():
    params = {"w": jnp.ones((4, 3))}
    for lr in (1e-3, 1, np.float32(1e-3), jnp.asarray(1e-3), optax.cosine_decay_schedule(1e-3, 9)):
        opt = umtam_jax.umtam(lr)
        updates, _ = opt.update(params, opt.init(params), params)
        assert bool(jnp.all(updates["w"] < 0))  # descent, never ascent
    injected = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    opt = injected(learning_rate=1e-3)
    updates, _ = opt.update(params, opt.init(params), params)
    assert bool(jnp.all(updates["w"] < 0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": float("inf")}, "eps must be finite"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"eps": -1.0}, "eps must be finite"),
        ({"clip_threshold": float("inf")}, "clip_threshold must be finite"),
        ({"learning_rate": float("nan")}, "learning_rate must be finite"),
    ],
)
def test_non_finite_hyper_parameters(kwargs, match):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        umtam_jax.umtam(**kwargs)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_, "foo"])
def test_buffer_dtype_must_be_floating(dtype):
    with pytest.raises(TypeError, match="buffer_dtype"):
        umtam_jax.umtam(1e-3, buffer_dtype=dtype)


def test_python_scalar_leaves_are_arrays_as_in_optax():
    params = {"w": jnp.ones((4, 3)), "b": 0.5}
    grads = {"w": jnp.full((4, 3), 0.1), "b": 0.1}
    opt = umtam_jax.umtam(1e-3)
    updates, _ = opt.update(grads, opt.init(params), params)
    reference, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params), params)
    assert updates["b"].shape == () and bool(jnp.isfinite(updates["b"]))
    assert np.sign(float(updates["b"])) == np.sign(float(reference["b"]))


def test_abstract_init_and_error_decay_under_inject_hyperparams():
    abstract = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    opt = umtam_jax.umtam(1.0, rank=2, min_dim_size_to_factor=1, saliency="final")
    state = opt.init(abstract)
    assert state[0].leaves.u.shape == (2, 4, 2)
    with pytest.raises(ValueError, match="abstract parameter .* saliency='final'"):
        umtam_jax.umtam(1.0).init(abstract)
    injected = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    lean = injected(learning_rate=1e-3, error_decay=0.0, min_dim_size_to_factor=2)
    assert lean.init({"w": jnp.ones((4, 4))}).inner_state[0].leaves["w"].dense_momentum is None
