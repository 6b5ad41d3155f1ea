"""What the update lowers to (no GPU needed): for a GPU no conditional whose predicate is
device data (lean mode: one) and no loop, for one leaf as for many and for any number of
stacked layers, and one overflow-safe pass per sum of a factored leaf; for CPU no LAPACK QR
of a sketch.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import umtam_jax


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
