"""Runs UMTAM on 8 simulated CPU devices and prints a JSON report (used by the tests).

Executed in a subprocess: the device count must be fixed before JAX initialises, and only
this process may see 8 devices.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import umtam_jax  # noqa: E402

MESHES = {
    "data_x_model": ((2, 4), {"a": P("data", "model"), "b": P("model", None), "bias": P("model")}),
    "model_only": ((1, 8), {"a": P(None, "model"), "b": P("model", None), "bias": P(None)}),
    "replicated": ((2, 4), {"a": P(), "b": P(), "bias": P()}),
}


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
        "bias": jnp.zeros(64, jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(5)
    ]
    return params, grads


def _run(opt, params, grads):
    @jax.jit
    def step(params, state, g):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = jax.jit(opt.init)(params)
    updates = []
    for g in grads:
        params, state, u = step(params, state, g)
        updates.append(u)
    return params, state, updates


def _put(mesh, specs, tree):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _spec(x):
    return tuple(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else None


def _normalized(spec):
    spec = list(spec or ())
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def checkpoint_to_another_mesh(directory: str) -> dict:
    """Trains on a (2, 4) mesh, saves, restores onto a (4, 2) mesh with other partitions."""
    from umtam_jax import checkpoint
    from umtam_jax.optimizer._sharding import state_shardings

    opt = umtam_jax.umtam(1e-2, rank=16, min_dim_size_to_factor=64)
    params, grads = _problem()
    specs = MESHES["data_x_model"][1]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        trained, state, _ = _run(
            opt, _put(mesh, specs, params), [_put(mesh, specs, g) for g in grads]
        )
        checkpoint.save_checkpoint(directory, trained, opt_state=state)
        saved = jax.device_get((trained, state))
    other = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    other_specs = {"a": P("model", "data"), "b": P(None, "model"), "bias": P("data")}
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, other_specs[k]))
        for k, v in params.items()
    }
    target_shardings = state_shardings(opt, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(opt.init, abstract),
        target_shardings,
    )
    restored_state = checkpoint.restore_opt_state(directory, target)
    restored_params = checkpoint.restore_params(directory, target=abstract)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        (restored_params, restored_state),
        saved,
    )
    leaf = restored_state[0].leaves["a"]
    return {
        "values_equal": all(jax.tree.leaves(same)),
        "u_spec": _normalized(leaf.u.sharding.spec),
        "v_spec": _normalized(leaf.v.sharding.spec),
        "dense_momentum_spec": _normalized(leaf.dense_momentum.sharding.spec),
        "a_spec": _normalized(restored_params["a"].sharding.spec),
        "n_devices_u": len(leaf.u.sharding.device_set),
    }


def main(svd_method: str) -> dict:
    opt = umtam_jax.umtam(1e-2, rank=16, min_dim_size_to_factor=64, svd_method=svd_method)
    params, grads = _problem()
    reference, ref_state, ref_updates = _run(opt, params, grads)
    report = {}
    for name, (shape, specs) in MESHES.items():
        for axis_type in (AxisType.Auto, AxisType.Explicit):
            mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
            key = f"{name}/{axis_type.name}"
            with jax.set_mesh(mesh):
                out, state, updates = _run(
                    opt, _put(mesh, specs, params), [_put(mesh, specs, g) for g in grads]
                )
                errors = [
                    float(jnp.linalg.norm(u[k] - r[k]) / jnp.linalg.norm(r[k]))
                    for u, r in zip(updates, ref_updates, strict=True)
                    for k in r
                ]
                leaf = state[0].leaves["a"]
                report[key] = {
                    "max_update_rel_err": max(errors),
                    "param_rel_err": max(
                        float(
                            jnp.linalg.norm(out[k] - reference[k]) / jnp.linalg.norm(reference[k])
                        )
                        for k in reference
                    ),
                    "update_specs": {k: _spec(v) for k, v in updates[-1].items()},
                    "input_specs": {k: tuple(s) for k, s in specs.items()},
                    "state_a": {
                        f: _spec(getattr(leaf, f))
                        for f in ("u", "v", "row", "col", "dense_momentum")
                    },
                }
    return report


def grouped_on_meshes() -> dict:
    """``group_leaves=True`` (the GPU/TPU option) with two equally shaped matrices and two
    equal biases, sharded alike: Auto meshes stack them (the compiler shards the stack),
    Explicit ones update them one by one. Compared with single-device per-leaf training."""
    rng = np.random.default_rng(1)
    params = {
        "a": jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
        "a2": jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=64), jnp.float32),
        "bias2": jnp.asarray(rng.normal(size=64), jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(4)
    ]
    specs = {"a": P("data", "model"), "a2": P("data", "model"), "bias": P("model")}
    specs["bias2"] = P("model")

    def opt(group_leaves):
        return umtam_jax.umtam(1e-2, rank=16, min_dim_size_to_factor=64, group_leaves=group_leaves)

    reference, _, _ = _run(opt(False), params, grads)
    report = {}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            out, _, updates = _run(
                opt(True), _put(mesh, specs, params), [_put(mesh, specs, g) for g in grads]
            )
        report[axis_type.name] = {
            "param_rel_err": max(
                float(jnp.linalg.norm(out[k] - reference[k]) / jnp.linalg.norm(reference[k]))
                for k in reference
            ),
            "update_specs": {k: _normalized(_spec(v)) for k, v in updates[-1].items()},
        }
    return report


def eager_on_devices() -> dict:
    """Eager updates of one configuration with inputs on two devices (one compilation
    each), and inputs split between devices (the error)."""
    from umtam_jax.optimizer import _eager

    d0, d1 = jax.devices()[:2]
    params = {"b": jnp.ones(6)}
    opt = umtam_jax.scale_by_umtam()
    _eager.clear()
    for device in (d0, d1, d0):
        p = jax.device_put(params, device)
        opt.update(p, opt.init(p), p)
    entries = _eager.kept_executables()
    p = jax.device_put(params, d1)
    try:
        opt.update(jax.device_put(params, d0), opt.init(p), p)
        message = ""
    except ValueError as err:
        message = str(err)
    return {"entries": entries, "message": message}


if __name__ == "__main__":
    report = main(sys.argv[1])
    report["eager"] = eager_on_devices()
    report["grouped"] = grouped_on_meshes()
    if len(sys.argv) > 2:
        report["checkpoint"] = checkpoint_to_another_mesh(sys.argv[2])
    print(json.dumps(report))
