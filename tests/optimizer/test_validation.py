"""Bad hyper-parameters and inputs fail early, with an error naming what is wrong."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.behaviour_helpers import SMALL, _grads, _params


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"b2": 1.5}, "b2"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"svd_method": "lanczos"}, "svd_method"),
        ({"svd_every": 0}, "svd_every"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"saliency_decay": 1.0}, "saliency_decay"),
        ({"error_decay": 2.0}, "error_decay"),
        ({"saliency": "never"}, "saliency"),
        ({"adaptive_rank": True, "max_rank": 2, "rank": 4}, "max_rank"),
        ({"adaptive_rank": True, "rank_grow_threshold": 1.0}, "rank_grow_threshold"),
        ({"adaptive_rank": True, "rank_shrink_threshold": 1.0}, "rank_shrink_threshold"),
        ({"oversampling": -1}, "oversampling"),
        # Checked with adaptive_rank off too: a wrong value is a mistake either way.
        ({"max_rank": -5}, "max_rank must be ≥ 1"),
        ({"min_rank": 0}, "min_rank must be ≥ 1"),
        ({"rank_grow_threshold": 0.5}, "rank_grow_threshold"),
        # Compared with the int32 step counter, or a JAX key's 64 bits.
        ({"svd_every": 2**31}, r"svd_every must be < 2\*\*31"),
        ({"adaptive_rank": True, "rank_update_every": 2**31}, "rank_update_every"),
        ({"seed": 2**63}, "seed must fit in a 64-bit"),
    ],
)
def test_invalid_hyper_parameters_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        umtam_jax.umtam(0.1, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_learning_rate_or_weight_decay_fails_at_construction(value):
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        umtam_jax.umtam(value)
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        umtam_jax.umtam(0.1, weight_decay=value)
    umtam_jax.umtam(optax.constant_schedule(0.1))  # schedules are not evaluated here


def test_rank_must_be_a_python_int():
    with pytest.raises(TypeError, match="rank"):
        umtam_jax.umtam(0.1, rank=4.0)


def test_numpy_integers_and_bools_stand_for_python_ones():
    """As optax.adafactor takes np.int64(64) for min_dim_size_to_factor."""
    params = {"w": jnp.ones((8, 6))}
    numpy_opt = umtam_jax.scale_by_umtam(
        rank=np.int64(2), min_dim_size_to_factor=np.int32(4), bias_correction=np.True_
    )
    python_opt = umtam_jax.scale_by_umtam(rank=2, min_dim_size_to_factor=4, bias_correction=True)
    g = {"w": jnp.full((8, 6), 0.1)}
    got, _ = numpy_opt.update(g, numpy_opt.init(params), params)
    want, _ = python_opt.update(g, python_opt.init(params), params)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert numpy_opt.init(params).leaves["w"].u.shape == (8, 2)


def test_update_without_params_and_mismatched_shapes_are_explained():
    params = _params()
    opt = umtam_jax.umtam(0.1, **SMALL)
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(_grads(params, 0), state)
    bad = _grads(params, 0)
    bad["bias"] = jnp.ones(5)
    with pytest.raises(ValueError, match=r"\['bias'\]"):
        opt.update(bad, state, params)


def test_mismatched_params_or_state_trees_name_the_argument():
    params = _params()
    opt = umtam_jax.umtam(0.1, **SMALL)
    state = opt.init(params)
    grads = _grads(params, 0)
    with pytest.raises(ValueError, match=r"params does not have the tree structure.*'bias'"):
        opt.update(grads, state, {"dense": params["dense"]})
    with pytest.raises(ValueError, match=r"optimizer state \(from init\) does not have"):
        other = {"x": params["bias"]}
        opt.update(other, state, other)
    with pytest.raises(ValueError, match=r"gradients PyTreeDef\(\[\*, \*\]\)"):
        opt.update([grads["bias"], grads["dense"]["kernel"]], state, params)


def test_integer_leaves_are_rejected_with_their_path():
    with pytest.raises(TypeError, match=r"\['step'\]"):
        umtam_jax.umtam(0.1).init({"step": jnp.zeros((), jnp.int32)})


def test_complex_leaves_are_rejected_with_their_path():
    with pytest.raises(TypeError, match=r"\['z'\].*real floating-point"):
        umtam_jax.umtam(0.1).init({"z": jnp.zeros((4, 4), jnp.complex64)})


def test_float8_parameters_and_buffers_are_refused_by_name():
    """float8 takes part in no implicit promotion: it failed inside the step."""
    with pytest.raises(TypeError, match=r"\['w'\] has dtype float8_e4m3fn.* 16 bits or more"):
        umtam_jax.umtam(0.1).init({"w": jnp.zeros((4, 4), jnp.float8_e4m3fn)})
    for dtype in (jnp.float8_e4m3fn, jnp.complex64):
        with pytest.raises(TypeError, match="buffer_dtype must be a real floating-point"):
            umtam_jax.umtam(0.1, buffer_dtype=dtype)


def test_float16_buffers_are_refused_as_too_narrow_for_the_saliency():
    """A fine-tuning run's saliency (ΔW² · √(R C), often below 1e-8) is 0 in float16,
    whose smallest value is ~6e-8, and its momentum overflows past 65504."""
    assert np.float16(1e-9) == 0 and np.isinf(np.float16(1e5))
    with pytest.raises(TypeError, match="buffer_dtype float16 has a narrower range"):
        umtam_jax.umtam(0.1, buffer_dtype=jnp.float16)
    for dtype in (jnp.bfloat16, jnp.float32):  # float32's range
        umtam_jax.umtam(0.1, buffer_dtype=dtype)


@pytest.mark.parametrize("jit", [False, True])
def test_update_checks_params_and_state_by_name(jit):
    """What update gets besides the gradients: parameters of another dtype (a complex
    one lost its imaginary part in the saliency), a missing parameter, a state that is
    not init's or has a counter or buffer of another kind."""
    params = _params()
    opt = umtam_jax.scale_by_umtam(**SMALL)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    grads = _grads(params, 0)
    for dtype in (jnp.complex64, jnp.int32):
        bad = {**params, "bias": params["bias"].astype(dtype)}
        with pytest.raises(TypeError, match=rf"parameter at \['bias'\] has dtype {dtype.__name__}"):
            update(grads, state, bad)
    if not jit:  # a None leaf is an empty subtree under jit: a tree mismatch there
        with pytest.raises(TypeError, match=r"params at \['bias'\] is NoneType"):
            update(grads, state, {**params, "bias": None})
    with pytest.raises(TypeError, match="state must be what this optimizer's init returned"):
        opt.update(grads, {"count": 0}, params)
    with pytest.raises(TypeError, match=r"step counter \(count\) must be an integer"):
        update(grads, state._replace(count=jnp.float32(3.5)), params)
    bias = state.leaves["bias"]
    bad = state._replace(leaves={**state.leaves, "bias": bias._replace(mu=bias.mu.astype(int))})
    with pytest.raises(TypeError, match=r"state at \['bias'\] has dtype int32 for mu"):
        update(grads, bad, params)


@pytest.mark.parametrize(
    "name, value",
    [
        ("b1", None),
        ("eps", None),
        ("error_decay", None),
        ("saliency_decay", [0.9]),
        ("b2", "0.99"),
        ("weight_decay", "x"),
        ("clip_threshold", True),
        ("b1", jnp.asarray([0.9])),
    ],
)
def test_float_hyper_parameters_of_another_type_fail_at_construction(name, value):
    message = (
        f"{name} must be a real number (a Python int or float, or a NumPy / JAX scalar), "
        f"got {value!r} ({type(value).__name__})"
    )
    with pytest.raises(TypeError) as error:
        umtam_jax.umtam(0.1, **{name: value})
    assert str(error.value) == message


def test_float_hyper_parameters_take_numpy_and_jax_scalars():
    opt = umtam_jax.umtam(
        np.float32(0.1), b1=np.float64(0.9), eps=jnp.asarray(1e-8), weight_decay=np.int64(0)
    )
    params = {"w": jnp.ones((8, 4))}
    updates, _ = opt.update(params, opt.init(params), params)
    assert updates["w"].shape == (8, 4)


@pytest.mark.parametrize("value", [1, 0, umtam_jax.MatrixAxes(1, 1), "scanned"])
def test_row_axes_must_be_callable_or_none(value):
    with pytest.raises(TypeError) as error:
        umtam_jax.umtam(0.1, row_axes=value)
    assert str(error.value) == (
        "row_axes must be a callable (key_path, shape) -> int | MatrixAxes (e.g. "
        f"umtam_jax.scanned(...)) or None, got {value!r} ({type(value).__name__})"
    )
    umtam_jax.umtam(0.1, row_axes=None)  # the default view
    # NumPy integers are integers (as the constructor's options read them).
    leaf = {"w": jnp.ones((4, 8, 6))}
    umtam_jax.umtam(0.1, row_axes=lambda path, shape: np.int64(len(shape) - 1)).init(leaf)
    as_axes = lambda path, shape: umtam_jax.MatrixAxes(np.int64(1), np.int64(1))  # noqa: E731
    umtam_jax.umtam(0.1, row_axes=as_axes).init(leaf)
    huge = lambda path, shape: umtam_jax.MatrixAxes(2**63, 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"MatrixAxes needs counts in \[0, 3\]"):
        umtam_jax.umtam(0.1, row_axes=huge).init(leaf)  # not an OverflowError from NumPy
    umtam_jax.umtam(0.1, row_axes=lambda path, shape: umtam_jax.MatrixAxes(1, 1))


@pytest.mark.parametrize("name", ["bias_correction", "adaptive_rank"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_switches_must_be_true_or_false(name, value):
    with pytest.raises(TypeError) as error:
        umtam_jax.umtam(0.1, **{name: value})
    assert str(error.value) == f"{name} must be True or False, got {value!r}"


@pytest.mark.parametrize(
    "path, old, new, row_axes",
    [
        ("['dense']['kernel']", (16, 12), (8, 12), None),  # factored
        ("['bias']", (12,), (5,), None),  # dense
        # [d_in, L, d_out] stack stored in keepdims form, one layer more
        ("['dense']['kernel']", (8, 2, 6), (8, 3, 6), umtam_jax.scanned("dense", axis=1)),
    ],
)
def test_a_state_built_for_other_shapes_names_the_leaf_and_both_shapes(path, old, new, row_axes):
    opt = umtam_jax.umtam(0.1, row_axes=row_axes, **SMALL)
    leaf = "bias" if path == "['bias']" else "kernel"
    shaped = lambda shape: {  # noqa: E731
        "dense": {"kernel": jnp.ones(shape if leaf == "kernel" else (16, 12))},
        "bias": jnp.ones(shape if leaf == "bias" else (12,)),
    }
    state, params = opt.init(shaped(old)), shaped(new)
    message = (
        f"the optimizer state at {path} was built for a parameter of shape {old}, but the "
        f"parameter has shape {new}: initialise the state with init(params) for these "
        "parameters"
    )
    for update in (opt.update, jax.jit(opt.update)):
        with pytest.raises(ValueError) as error:
            update(params, state, params)
        assert str(error.value) == message


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 4}, "has shape (2, 16, 2) for u, but this optimizer keeps shape (2, 16, 4)"),
        ({"adaptive_rank": True}, "for u, but this optimizer keeps shape (2, 16, 4)"),
        ({"min_dim_size_to_factor": 64}, "is factored, but this optimizer keeps a dense state"),
        ({"row_axes": umtam_jax.scanned("blocks")}, "has shape (2, 2) for sigma, but this"),
        ({"error_decay": 0.0}, "for dense_momentum, but this optimizer keeps no array there"),
        ({"saliency": "final"}, "for saliency, but this optimizer keeps no array there"),
    ],
)
def test_a_state_built_with_other_options_names_the_leaf_and_the_array(options, message):
    """Resuming with a changed option: one error naming the leaf and the array that
    differs, instead of a reshape TypeError or an AttributeError deep in the step (or,
    for error_decay and saliency, buffers kept silently)."""
    params = {"blocks": {"k": jnp.ones((2, 16, 12))}, "b": jnp.zeros(12)}
    state = umtam_jax.umtam(0.1, **{**SMALL, "rank": 2}).init(params)
    opt = umtam_jax.umtam(0.1, **{**SMALL, "rank": 2, **options})
    where = "['b']" if "saliency" in options else "['blocks']['k']"
    for update in (opt.update, jax.jit(opt.update)):
        with pytest.raises(ValueError) as error:
            update(params, state, params)
        assert str(error.value).startswith(f"the optimizer state at {where} ")
        assert message in str(error.value)
        assert "built by an optimizer with other options" in str(error.value)


def test_tree_map_params_is_refused_with_what_to_use_instead():
    """It applied f to every array of the per-leaf states (U, Σ, V, R, C, ...)."""
    params = {"w": jnp.ones((8, 6)), "b": jnp.ones(6)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4)
    with pytest.raises(TypeError, match="tree_map_params cannot map a UMTAM state.*shardings"):
        optax.tree_utils.tree_map_params(opt, lambda x: x, opt.init(params))


def test_state_shardings_names_a_parameter_without_a_named_sharding():
    opt = umtam_jax.umtam(1e-3)
    abstract = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32)}  # no sharding: it crashed
    with pytest.raises(ValueError, match=r"NamedSharding; \['w'\] has None"):
        umtam_jax.state_shardings(opt, abstract)
    with pytest.raises(ValueError, match="at least one parameter"):
        umtam_jax.state_shardings(opt, {})


def test_a_scanned_layout_naming_no_leaf_warns_at_init():
    """A misspelt name left the stacked leaves factored as one tall matrix, silently: it
    warns. Not an error, for a transform may see only part of a model (optax.masked,
    optax.multi_transform) without the stacked leaves."""
    params = {"blocks": {"kernel": jnp.ones((2, 4, 4))}, "stem": jnp.ones((3, 3, 2, 4))}
    expected = (r"row_axes=scanned\('blokcs'.*no parameter's key path contains 'blokcs', "
                "so every leaf is factored unstacked")  # fmt: skip
    with pytest.warns(UserWarning, match=expected) as seen:
        umtam_jax.umtam(0.1, row_axes=umtam_jax.scanned("blokcs")).init(params)
    assert seen[0].filename == __file__  # the user's call, not optax.chain's
    with pytest.warns(UserWarning, match="no parameter's key path") as seen:
        injected = optax.inject_hyperparams(
            umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS
        )
        injected(0.1, row_axes=umtam_jax.scanned("x")).init(params)
    assert seen[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        umtam_jax.umtam(0.1, row_axes=umtam_jax.scanned("blocks", "unused")).init(params)
        frozen_blocks = optax.masked(
            umtam_jax.umtam(0.1, row_axes=umtam_jax.scanned("blocks")),
            {"blocks": {"kernel": False}, "stem": False},
        )
        frozen_blocks.init({"blocks": params["blocks"], "stem": jnp.ones((4, 3))})
