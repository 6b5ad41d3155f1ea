"""Inputs sharded over Explicit mesh axes (``jax.make_mesh``'s default): every merging
method gives the single-device result, sharded like the base; ``momentum`` of a Conv
kernel sharded on inner axes, the oversampled sketch of a column-sharded matrix, and
``state_shardings`` of a lone array parameter work there too."""

from __future__ import annotations

import pytest

from tests.merging.test_method_contract import CASES
from tests.sharding._mesh_script import run_on_devices

_SCRIPT = """
    import optax
    from tests.merging import test_method_contract as C
    from umtam_jax import merging

    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,))

    def spec_of(a):  # the last axis sharded where it splits evenly
        return P(*([None] * (a.ndim - 1)), "x") if a.ndim and a.shape[-1] % 2 == 0 else P()

    def put(tree):
        put_one = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec_of(a)))
        return jax.tree.map(put_one, tree)

    def gap(a, b):
        diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                         - np.asarray(y, np.float64)))), a, b)
        return max(jax.tree.leaves(diffs), default=0.0)

    for name in sorted(C.CASES):
        base, experts, extra = C._inputs(name)
        want = C._call(name, base, experts, extra)
        try:
            with jax.set_mesh(mesh):
                got = C._call(name, put(base), put(experts), put(extra))
        except Exception as err:  # reported by the test of this method
            report[name] = {"error": repr(err)[:500]}
            continue
        kept = jax.tree.map(lambda g, b: trim(g.sharding.spec) == trim(spec_of(b)), got, base)
        report[name] = {"gap": gap(got, want), "kept": all(jax.tree.leaves(kept))}

    # A key and a weight made under the mesh (Explicit arrays among the options), and a
    # jitted merge closing over sharded inputs (the mesh cannot change under jit).
    base, experts, _ = C._inputs("ties")
    want_dare = merging.merge("dare_ties", base, experts, density=0.5, key=jax.random.key(1))
    want_sum = merging.merge("task_arithmetic", base, experts, scaling=0.5)
    with jax.set_mesh(mesh):
        b, e = put(base), put(experts)
        dare = merging.merge("dare_ties", b, e, density=0.5, key=jax.random.key(1))
        summed = jax.jit(lambda: merging.merge("task_arithmetic", b, e, scaling=jnp.float32(0.5)))()
    report["options_and_jit"] = {"gap": max(gap(dare, want_dare), gap(summed, want_sum))}

    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        # A Conv kernel sharded on its input features: momentum's reshapes of U and V.
        conv = {"k": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)}
        opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
        want = umtam_jax.momentum(umtam_jax.statistics(
            opt.update(conv, opt.init(conv), conv)[1]))["k"]
        sharded = {"k": jax.device_put(conv["k"], NamedSharding(mesh, P(None, None, "x")))}
        state = opt.update(sharded, opt.init(sharded), sharded)[1]
        got = umtam_jax.momentum(umtam_jax.statistics(state))["k"]
        report["momentum"] = {"gap": gap(got, want), "spec": trim(got.sharding.spec)}
        # Oversampled sketch columns joined to a warm start sharded on its rows.
        w = {"w": rng.normal(size=(8, 16)).astype(np.float32)}
        opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2, oversampling=2)
        want = opt.update(w, opt.init(w), w)[0]["w"]
        ws = {"w": jax.device_put(w["w"], NamedSharding(mesh, P(None, "x")))}
        got = jax.jit(opt.update)(ws, opt.init(ws), ws)[0]["w"]
        report["oversampling"] = {"gap": gap(got, want), "spec": trim(got.sharding.spec)}
        # One array as the parameters: the schedule's counter is not parameter-shaped.
        lone = jax.device_put(w["w"], NamedSharding(mesh, P(None, "x")))
        opt = umtam_jax.umtam(optax.linear_schedule(1e-2, 0.0, 10), rank=2,
                              min_dim_size_to_factor=2)
        shardings = umtam_jax.state_shardings(opt, lone)
        state = jax.jit(opt.init, out_shardings=shardings)(lone)
        report["lone_array"] = {
            "state_ok": state is not None, "count": trim(shardings[2].count.spec)
        }
"""


@pytest.fixture(scope="module")
def report():
    return run_on_devices(2, _SCRIPT)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_merge_of_explicitly_sharded_inputs_is_the_one_device_merge_sharded_like_the_base(
    report, name
):
    entry = report[name]
    assert "error" not in entry and entry["gap"] <= 1e-5 and entry["kept"], entry


def test_array_options_made_under_the_mesh_and_a_jitted_merge(report):
    assert report["options_and_jit"]["gap"] <= 1e-5, report["options_and_jit"]


def test_momentum_of_a_conv_kernel_sharded_on_an_inner_axis(report):
    entry = report["momentum"]
    assert entry["gap"] <= 1e-6 and entry["spec"] == ["None", "None", "x"], entry


def test_oversampled_sketch_of_a_column_sharded_matrix(report):
    entry = report["oversampling"]
    assert entry["gap"] <= 1e-5 and entry["spec"] == ["None", "x"], entry


def test_state_shardings_of_one_array_replicate_the_schedule_counter(report):
    assert report["lone_array"] == {"state_ok": True, "count": []}
