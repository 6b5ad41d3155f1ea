"""Factored N-D leaves (batch axes included) with any axis sharded, on Auto and Explicit
meshes: updates keep the parameter's sharding and equal single-device updates; the state's
types do not change between init and update (Optax's sharding contract)."""

from __future__ import annotations

import pytest

from tests.sharding._mesh_script import run_on_devices

# Runs after _mesh_script's prelude (jax, jnp, np, umtam_jax, P, trim, on_mesh, report),
# with EAGER, the cases also updated eagerly, set by the fixture below.
_SCRIPT = """
    ADAPT = {"adaptive_rank": True, "rank_update_every": 1}
    CASES = {
        "3d_middle_axis": ((2, 8, 4), P(None, "x"), None),
        "3d_last_axis": ((2, 4, 8), P(None, None, "x"), None),
        "batched_middle_axis": ((2, 16, 8), P(None, "x"), umtam_jax.MatrixAxes(1, 1)),
        "batched_batch_axis": ((8, 16, 8), P("x"), umtam_jax.MatrixAxes(1, 1)),
        # [d_in, L, d_out] (the layer axis second): updated in (batch, rows, cols) order,
        # its state kept in the parameter's order; the layer axis sharded below
        "layer_axis_second_rows": ((8, 4, 8), P("x"), umtam_jax.MatrixAxes((1,), (0,))),
        # adaptive rank: one int32 rank per matrix, partitioned like the batch axis
        "batched_batch_axis_adaptive": ((8, 16, 8), P("x"), umtam_jax.MatrixAxes(1, 1), ADAPT),
        "layer_axis_second_adaptive": (
            (4, 8, 8), P(None, "x"), umtam_jax.MatrixAxes((1,), (0,)), ADAPT
        ),
    }
    rng = np.random.default_rng(0)

    for name, (shape, spec, axes, *extra) in CASES.items():
        row_axes = None if axes is None else (lambda p, s, a=axes: a)
        kw = extra[0] if extra else {}
        opt = umtam_jax.umtam(1.0, rank=2, min_dim_size_to_factor=1, row_axes=row_axes, **kw)
        w = rng.normal(size=shape).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        state = opt.init(jnp.asarray(w))
        want, _ = jax.jit(opt.update)(jnp.asarray(g), state, jnp.asarray(w))  # one device
        for kind in ("Explicit", "Auto"):
            with on_mesh(kind, spec, w, g) as (params, grads):
                s0 = opt.init(params)
                step = jax.jit(opt.update)
                jitted, s2 = step(grads, s0, params)
                first = step._cache_size()
                _, s3 = step(grads, s2, params)
                compiled = step._cache_size()
                step(grads, s3, params)
                kept = jax.tree.map(
                    lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim), s0, s2
                )
                planned = jax.tree.map(
                    lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                    s0,
                    umtam_jax.state_shardings(opt, params),
                )
                types = jax.tree.map(jax.typeof, s0)
                entry = report[f"{name}/{kind}"] = {
                    "jit_err": float(jnp.max(jnp.abs(jitted - want))),
                    "scale": float(jnp.max(jnp.abs(want))),
                    "update_spec": trim(jitted.sharding.spec),
                    "param_spec": trim(params.sharding.spec),
                    "types_equal": types == jax.tree.map(jax.typeof, s2),
                    "state_shardings_kept": all(jax.tree.leaves(kept)),
                    # init places the state as state_shardings plans it
                    "state_shardings_planned": all(jax.tree.leaves(planned)),
                    # the state from init and states coming out of jitted steps run
                    # the same executable
                    "recompiled": step._cache_size() != compiled or compiled != first,
                }
                if name in EAGER:
                    eager, s1 = opt.update(grads, s0, params)
                    entry["eager_err"] = float(jnp.max(jnp.abs(eager - want)))
                    entry["eager_spec"] = trim(eager.sharding.spec)
                    entry["eager_types_equal"] = types == jax.tree.map(jax.typeof, s1)
"""


_CASES = [
    "3d_middle_axis",
    "3d_last_axis",
    "batched_middle_axis",
    "batched_batch_axis",
    "layer_axis_second_rows",
    "batched_batch_axis_adaptive",
    "layer_axis_second_adaptive",
]
# Eager updates run op by op (slow on a fake mesh) through the same code as jit: the
# plain N-D leaf of Optax's sharding test and a sharded batch axis are enough.
_EAGER_CASES = ["3d_middle_axis", "batched_batch_axis"]


@pytest.fixture(scope="module")
def report():
    return run_on_devices(8, f"    EAGER = {_EAGER_CASES!r}\n" + _SCRIPT)


@pytest.mark.parametrize(
    "case",
    _CASES,
)
@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_sharded_nd_leaf_updates_like_one_device(report, case, kind):
    entry = report[f"{case}/{kind}"]
    assert entry["jit_err"] <= 1e-5 * max(entry["scale"], 1.0), entry


@pytest.mark.parametrize("case", _EAGER_CASES)
@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_eager_sharded_nd_leaf_updates_like_one_device_and_keep_the_sharding(report, case, kind):
    entry = report[f"{case}/{kind}"]
    assert entry["eager_err"] <= 1e-5 * max(entry["scale"], 1.0), entry
    assert entry["eager_spec"] == entry["param_spec"], entry
    assert entry["eager_types_equal"], entry


@pytest.mark.parametrize(
    "case",
    [
        # The sharded axis is merged into the rows after an unsharded one: the compiler's
        # propagation cannot carry the partition through that reshape (it used to come back
        # replicated); the optimizer keeps the update and the state alike their inputs.
        *_CASES,
    ],
)
def test_sharded_nd_leaf_updates_keep_the_sharding_on_auto_meshes(report, case):
    entry = report[f"{case}/Auto"]
    assert entry["update_spec"] == entry["param_spec"], entry
    assert entry["state_shardings_kept"] and entry["state_shardings_planned"], entry
    assert not entry["recompiled"], entry


@pytest.mark.parametrize("case", _CASES)
def test_sharded_nd_leaf_updates_keep_the_sharding_on_explicit_meshes(report, case):
    entry = report[f"{case}/Explicit"]
    assert entry["update_spec"] == entry["param_spec"], entry
    assert entry["types_equal"], entry
    assert entry["state_shardings_kept"] and entry["state_shardings_planned"], entry
    assert not entry["recompiled"], entry


_REPLICATED_GRADIENT = """
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(1)
    shapes = {"kernel": (4, 16, 8), "bias": (4, 8)}  # a scanned stack's kernel and bias
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    opt = umtam_jax.umtam(1.0, rank=2, min_dim_size_to_factor=1, row_axes=umtam_jax.scanned())
    want, _ = jax.jit(opt.update)(g, opt.init(w), w)
    with jax.set_mesh(mesh):
        params = jax.device_put(w, NamedSharding(mesh, P("x")))
        replicated = jax.device_put(g, NamedSharding(mesh, P()))  # e.g. all-reduced
        for how, grads in (("replicated", replicated), ("numpy", g)):
            got, _ = jax.jit(opt.update)(grads, opt.init(params), params)
            for k in shapes:
                report[f"{how}/{k}"] = {
                    "err": float(jnp.max(jnp.abs(got[k] - want[k]))),
                    "scale": float(jnp.max(jnp.abs(want[k]))),
                    "spec": trim(got[k].sharding.spec),
                }
"""


def test_a_replicated_gradient_of_a_sharded_scanned_leaf_on_an_explicit_mesh():
    """vmap over the layers refused a gradient partitioned unlike its parameter (replicated,
    or a NumPy array: "Mapped away dimension ... should be sharded the same"), where
    Optax's own transforms and unscanned leaves take it: it is resharded like the
    parameter first."""
    report = run_on_devices(4, _REPLICATED_GRADIENT)
    for name, entry in report.items():
        assert entry["err"] <= 1e-5 * max(entry["scale"], 1.0), (name, entry)
        assert entry["spec"] == ["x"], (name, entry)
