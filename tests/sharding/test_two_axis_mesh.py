"""A parameter sharded over both axes of a 2-D Auto mesh (``P("data", "model")``, a
scanned stack ``P(None, "data", "model")``).

On Auto meshes the compiler chooses the shardings of a jitted step's outputs; for such a
parameter it gives ``u`` and ``row`` the other mesh axis, and the next step compiles
again. The documented recipe, ``out_shardings`` from ``state_shardings``, keeps the state
where ``init`` put it with one executable, and the updates equal one device's.
"""

from __future__ import annotations

import pytest

from tests.sharding._mesh_script import run_on_devices

_SCRIPT = """
    import optax
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    D = 16
    CASES = {
        "matrix": ((D, D), P("data", "model"), None),
        "scanned": ((3, D, D), P(None, "data", "model"), umtam_jax.scanned("w")),
    }
    rng = np.random.default_rng(0)
    for name, (shape, spec, row_axes) in CASES.items():
        opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4, row_axes=row_axes)
        w0 = rng.normal(size=shape).astype(np.float32)
        grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]

        def step(p, s, g):
            u, s = opt.update({"w": g}, s, p)
            return optax.apply_updates(p, u), s

        # one device
        p, s = {"w": jnp.asarray(w0)}, opt.init({"w": jnp.asarray(w0)})
        for g in grads:
            p, s = jax.jit(step)(p, s, jnp.asarray(g))
        want = np.asarray(p["w"])
        with jax.set_mesh(mesh):
            sharding = NamedSharding(mesh, spec)
            p = {"w": jax.device_put(jnp.asarray(w0), sharding)}
            s = opt.init(p)
            planned = umtam_jax.state_shardings(opt, p)
            jitted = jax.jit(step, out_shardings=({"w": sharding}, planned))
            for g in grads:
                p, s = jitted(p, s, jax.device_put(jnp.asarray(g), sharding))
            kept = jax.tree.map(lambda a, c: a.sharding.is_equivalent_to(c, a.ndim), s, planned)
            report[name] = {
                "err": float(np.max(np.abs(np.asarray(p["w"]) - want))),
                "param_spec": trim(p["w"].sharding.spec),
                "state_kept": all(jax.tree.leaves(kept)),
                "executables": jitted._cache_size(),
            }
"""


@pytest.fixture(scope="module")
def report():
    return run_on_devices(4, _SCRIPT)


@pytest.mark.parametrize("case", ["matrix", "scanned"])
def test_out_shardings_from_state_shardings_keep_a_two_axis_layout(report, case):
    entry = report[case]
    assert entry["err"] <= 1e-5, entry
    assert entry["param_spec"] == (["data", "model"] if case == "matrix" else
                                   ["None", "data", "model"]), entry  # fmt: skip
    assert entry["state_kept"], entry
    assert entry["executables"] == 1, entry


_STACK_SCRIPT = """
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    layout = {
        "kernel": ((4, 16, 8), P("data", "model")),
        "bias": ((4, 8), P(None, ("data", "model"))),
    }
    rng = np.random.default_rng(0)
    blocks = umtam_jax.scanned("blocks")
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=4, row_axes=blocks)
    with jax.set_mesh(mesh):
        put = lambda: {"blocks": {
            k: jax.device_put(rng.normal(size=s).astype(np.float32), NamedSharding(mesh, spec))
            for k, (s, spec) in layout.items()
        }}
        p, g = put(), put()
        s = jax.jit(opt.init, out_shardings=umtam_jax.state_shardings(opt, p))(p)
        u, s2 = jax.jit(opt.update)(g, s, p)
        report["update"] = {k: trim(u["blocks"][k].sharding.spec) for k in layout}
        report["bias_state"] = sorted({
            str(trim(x.sharding.spec)) for path, x in jax.tree_util.tree_flatten_with_path(s2)[0]
            if "bias" in jax.tree_util.keystr(path) and x.ndim == 2
        })
"""


def test_a_stacked_bias_keeps_its_sharding_beside_a_layer_sharded_stacked_kernel():
    """The stacked kernel's layer-axis partition used to win the bias's sharding group on
    an Auto mesh: its update and state came back sharded over the layers, gathered whole."""
    report = run_on_devices(4, _STACK_SCRIPT)
    assert report["update"] == {"kernel": ["data", "model"], "bias": ["None", "('data', 'model')"]}
    assert report["bias_state"] == ["['None', \"('data', 'model')\"]"], report
