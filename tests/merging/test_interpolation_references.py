"""mergekit's data-free interpolation methods against their float64 NumPy references
(``interpolation_helpers``), with and without a base, and in bfloat16 (computed in
float32 and cast back); their registry entries carry mergekit's names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import trees
from tests.merging.interpolation_helpers import BASE_OPTIONAL, CASES, VARIANTS, _call, _reference
from umtam_jax import merging

from . import helpers as H


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


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
