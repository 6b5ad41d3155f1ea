"""Factored N-D leaves sharded on an axis that their matrix view merges into a more major
one (or a batch axis after another batch axis): the compiled update gathers no
parameter-sized array onto every device.

Reshaping such a leaf to its m×n matrix would merge the sharded axis (``(2, 8@x, 4)`` as
``(16, 4)``), which an Auto mesh's propagation can only do by gathering the whole array;
the optimizer keeps the m×n arrays in the leaf's layout and contracts them over several
axes instead (``umtam_jax.optimizer._nd``). Only thin m×r / n×r arrays may be gathered.
"""

from __future__ import annotations

import pytest

from tests.sharding._mesh_script import run_on_devices

# Runs after _mesh_script's prelude (jax, jnp, np, umtam_jax, P, trim, on_mesh, report).
_SCRIPT = """
    import math, re

    CASES = {
        "rows_merged": ((2, 8, 4), P(None, "x", None), None),
        "cols_merged": ((8, 4, 8), P(None, None, "x"), lambda p, s: 1),
        "scanned_rows": ((2, 8, 8), P(None, "x", None), umtam_jax.scanned()),
        # the second of two batch axes sharded: mapped over, never merged with the first
        "two_batch_axes": ((2, 4, 8, 8), P(None, "x"), lambda p, s: umtam_jax.MatrixAxes(2, 1)),
        # [d_in, L, d_out] with the rows sharded: transposed into (batch, rows, cols)
        # order and back, never gathered
        "layer_axis_second_rows": ((8, 4, 8), P("x"), umtam_jax.scanned(axis=1)),
    }
    CONFIGS = {
        "default": {},
        # no momentum buffer (the unmaterialised low-rank-plus-dense momentum) and the
        # fixed-basis projection between refreshes
        "lean": {"error_decay": 0.0, "svd_every": 2},
    }
    GATHER = re.compile(r"= (.*?) all-gather(?:-start)?\\(")
    SHAPE = re.compile(r"[a-z]+[0-9]*\\[([0-9,]*)\\]")

    def full_gathers(hlo, size):
        out = []
        for result in GATHER.findall(hlo):
            for dims in SHAPE.findall(result):
                if math.prod(int(d) for d in dims.split(",") if d) >= size:
                    out.append(result)
        return out

    rng = np.random.default_rng(0)
    for name, (shape, spec, row_axes) in CASES.items():
        w = rng.normal(size=shape).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        for config, extra in CONFIGS.items():
            kw = {} if row_axes is None else {"row_axes": row_axes}
            opt = umtam_jax.umtam(1.0, rank=2, min_dim_size_to_factor=1, **kw, **extra)
            state = opt.init(jnp.asarray(w))
            want, _ = jax.jit(opt.update)(jnp.asarray(g), state, jnp.asarray(w))
            for kind in ("Auto", "Explicit"):
                with on_mesh(kind, spec, w, g) as (params, grads):
                    s0 = opt.init(params)
                    compiled = jax.jit(opt.update).lower(grads, s0, params).compile()
                    hlo = compiled.as_text()
                    got, _ = compiled(grads, s0, params)  # the executable inspected
                report[f"{name}/{config}/{kind}"] = {
                    "full_gathers": full_gathers(hlo, w.size),
                    "gathers": len(GATHER.findall(hlo)),
                    "err": float(jnp.max(jnp.abs(got - want))),
                    "scale": float(jnp.max(jnp.abs(want))),
                    "update_spec": trim(got.sharding.spec),
                    "param_spec": trim(params.sharding.spec),
                }
"""

_CASES = [
    "rows_merged",
    "cols_merged",
    "scanned_rows",
    "two_batch_axes",
    "layer_axis_second_rows",
]


@pytest.fixture(scope="module")
def report():
    return run_on_devices(4, _SCRIPT)


@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
@pytest.mark.parametrize("config", ["default", "lean"])
@pytest.mark.parametrize("case", _CASES)
def test_update_gathers_no_parameter_sized_array(report, case, config, kind):
    entry = report[f"{case}/{config}/{kind}"]
    assert entry["full_gathers"] == [], entry


@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
@pytest.mark.parametrize("config", ["default", "lean"])
@pytest.mark.parametrize("case", _CASES)
def test_update_keeps_the_sharding_and_equals_the_unsharded_one(report, case, config, kind):
    entry = report[f"{case}/{config}/{kind}"]
    assert entry["update_spec"] == entry["param_spec"], entry
    assert entry["err"] <= 1e-5 * max(entry["scale"], 1.0), entry


# A layer-stacked leaf sharded on its layer axis beside a matrix sharded on its rows, on a
# 2-D Explicit mesh: their k×k Gram matrices and cores, partitioned differently, are
# batched together (gathered, being small), never the parameters.
_MIXED_SCRIPT = """
    import math, re

    GATHER = re.compile(r"= (.*?) all-gather(?:-start)?\\(")
    SHAPE = re.compile(r"[a-z]+[0-9]*\\[([0-9,]*)\\]")
    LAYOUT = {"blocks": ((2, 16, 8), P("y", "x", None)), "head": ((16, 8), P("x", None))}
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in LAYOUT.items()}
    g = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in LAYOUT.items()}
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    for config, extra in {"default": {}, "lean": {"error_decay": 0.0, "svd_every": 2}}.items():
        opt = umtam_jax.umtam(
            1.0, rank=2, min_dim_size_to_factor=1, row_axes=umtam_jax.scanned("blocks"), **extra
        )
        want, _ = jax.jit(opt.update)(g, opt.init(w), w)  # one device
        with jax.set_mesh(mesh):
            sharding = {k: NamedSharding(mesh, s) for k, (_, s) in LAYOUT.items()}
            params, grads = (jax.device_put(t, sharding) for t in (w, g))
            s0 = opt.init(params)
            compiled = jax.jit(opt.update).lower(grads, s0, params).compile()
            hlo = compiled.as_text()
            got, s1 = compiled(grads, s0, params)
        smallest = min(x.size for x in w.values())
        report[config] = {
            "full_gathers": [
                r for r in GATHER.findall(hlo) for dims in SHAPE.findall(r)
                if math.prod(int(d) for d in dims.split(",") if d) >= smallest
            ],
            "err": {k: float(jnp.max(jnp.abs(got[k] - want[k]))) for k in w},
            "scale": {k: float(jnp.max(jnp.abs(want[k]))) for k in w},
            "update_spec": {k: trim(got[k].sharding.spec) for k in w},
            "param_spec": {k: trim(params[k].sharding.spec) for k in w},
            "types_equal": jax.tree.map(jax.typeof, s0) == jax.tree.map(jax.typeof, s1),
        }
"""


@pytest.fixture(scope="module")
def mixed_report():
    return run_on_devices(8, _MIXED_SCRIPT)


@pytest.mark.parametrize("config", ["default", "lean"])
def test_differently_sharded_stacks_update_together_like_one_device(mixed_report, config):
    entry = mixed_report[config]
    assert entry["full_gathers"] == [], entry
    assert entry["update_spec"] == entry["param_spec"], entry
    assert entry["types_equal"], entry
    for name, err in entry["err"].items():
        assert err <= 1e-5 * max(entry["scale"][name], 1.0), entry
