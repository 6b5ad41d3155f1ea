"""Merges of finite inputs never return an infinity or a NaN, OTA's domain is checked, and
64-bit inputs are never silently computed in 32 bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from umtam_jax import merging

BIG = 3e38  # float32's maximum is 3.4e38


def _stats(params):
    """Statistics after one step (non-zero second moments; saliency computed at merge)."""
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2, saliency="final")
    _, state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    return umtam_jax.statistics(state)


@pytest.mark.parametrize(
    "merge",
    [
        lambda b, e: merging.task_arithmetic(b, e),
        lambda b, e: merging.ties(b, e, density=1.0),
        lambda b, e: merging.umtam(b, e, [_stats(x) for x in e], density=1.0, scaling=4.0),
        lambda b, e: merging.dare(b, e, density=1.0, key=jax.random.key(0)),
    ],
)
def test_overflowing_merge_names_the_leaf(merge):
    base = {"ok": jnp.zeros((4, 4)), "w": jnp.zeros((4, 4))}
    experts = [{"ok": jnp.ones((4, 4)), "w": jnp.full((4, 4), BIG)} for _ in range(2)]
    with pytest.raises(ValueError, match=r"the merged leaf \['w'\] is not finite .* overflowed"):
        merge(base, experts)
    # The same values under jax.jit are not checked (values are unknown there).
    assert jax.jit(lambda b, e: merging.task_arithmetic(b, e))(base, experts)["w"].shape == (4, 4)


def test_ota_refuses_negative_curvature_and_zero_with_negative_power():
    base = {"w": jnp.zeros(3)}
    experts = [{"w": jnp.ones(3)}, {"w": jnp.full(3, 2.0)}]
    negative = [{"w": jnp.array([1.0, -1.0, 1.0])}, {"w": jnp.ones(3)}]
    with pytest.raises(ValueError, match=r"curvatures\[0\]\['w'\] has an entry -1.0"):
        merging.ota(base, experts, negative)
    zero = [{"w": jnp.array([1.0, 0.0, 1.0])}, {"w": jnp.ones(3)}]
    merged = merging.ota(base, experts, zero, power=0.5)  # zero is fine for power ≥ 0
    assert bool(jnp.all(jnp.isfinite(merged["w"])))
    with pytest.raises(ValueError, match=r"> 0 when power < 0"):
        merging.ota(base, experts, zero, power=-0.5)


def test_fisher_refuses_negative_fishers_floors_and_weights():
    """A negative Fisher entry was floored silently, a negative floor and weights of any
    sign (summing to 0: a division by ~0) were accepted."""
    base = {"w": jnp.zeros(3)}
    experts = [{"w": jnp.ones(3)}, {"w": jnp.full(3, 2.0)}]
    fishers = [{"w": jnp.ones(3)}, {"w": jnp.full(3, 3.0)}]
    negative = [{"w": jnp.array([1.0, -2.0, 1.0])}, {"w": jnp.ones(3)}]
    with pytest.raises(ValueError, match=r"fishers\[0\]\['w'\] has an entry -2.0: a diagonal"):
        merging.fisher(base, experts, negative)
    with pytest.raises(ValueError, match="fisher_floor must be ≥ 0, got -1.0"):
        merging.fisher(base, experts, fishers, fisher_floor=-1.0)
    for merge in (merging.fisher, merging.ota):
        for weights in ([1.0, -1.0], [-1.0, 0.5], [0.0, 0.0]):
            with pytest.raises(ValueError, match="weights must be non-negative with a positive"):
                merge(base, experts, fishers, weights=weights)
    # One expert weighted 0: the other's values (Σ c F w / Σ c F).
    got = merging.fisher(base, experts, fishers, weights=[0.0, 1.0])
    np.testing.assert_allclose(got["w"], experts[1]["w"])


def test_float64_inputs_need_x64():
    base = {"w": np.zeros((3, 2))}
    experts = [{"w": np.ones((3, 2))}]
    with pytest.raises(TypeError, match=r"base\['w'\] is float64, but jax_enable_x64 is off"):
        merging.task_arithmetic(base, experts)
    with jax.enable_x64(True):
        merged = merging.task_arithmetic(base, experts)
        assert merged["w"].dtype == jnp.float64
    as32 = jax.tree.map(lambda x: x.astype(np.float32), (base, experts))
    assert merging.task_arithmetic(*as32)["w"].dtype == jnp.float32
