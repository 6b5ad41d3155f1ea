"""Orbax checkpoints of real training: a resumed run is bit-identical for every optimizer
layout, statistics come back from the optimizer state, and Flax NNX state is stored."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests import trees
from tests.checkpoint.orbax_helpers import tiny_params
from umtam_jax import engine, merging
from umtam_jax.checkpoint import (
    read_metadata,
    restore_checkpoint,
    restore_opt_state,
    restore_params,
    restore_statistics,
    save_checkpoint,
)


def tiny_batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (16, 8)), jax.random.normal(ky, (16, 6))


def loss_fn(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"].astype(jnp.float32) + params["hidden"]["bias"])
    pred = (h @ params["out"]["kernel"].astype(jnp.float32)) * params["scale"]
    return jnp.mean((pred - y) ** 2)


def make_step(opt):
    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def train(step, params, opt_state, n):
    batch = tiny_batch()
    for _ in range(n):
        params, opt_state = step(params, opt_state, batch)
    return params, opt_state


SMALL = dict(rank=2, min_dim_size_to_factor=4)


# ------------------------------------------------------------------------------------------
# with the real optimizer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        pytest.param(lambda: umtam_jax.umtam(0.05, **SMALL), id="umtam"),
        pytest.param(
            lambda: optax.chain(
                optax.clip_by_global_norm(1.0),
                optax.masked(
                    umtam_jax.umtam(
                        0.05, error_decay=0.0, saliency="final", weight_decay=1e-3, **SMALL
                    ),
                    {
                        "hidden": {"kernel": True, "bias": True},
                        "out": {"kernel": True},
                        "scale": False,
                    },
                ),
            ),
            id="masked-final-saliency",
        ),
        pytest.param(
            lambda: optax.chain(
                umtam_jax.scale_by_umtam(**SMALL),
                optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=0.05),
            ),
            id="inject-hyperparams",
        ),
        pytest.param(
            lambda: optax.MultiSteps(umtam_jax.umtam(0.05, **SMALL), every_k_schedule=2),
            id="multisteps",
        ),
    ],
)
def test_resume_is_bit_identical(tmp_path, make_opt):
    opt = make_opt()
    params0 = tiny_params()
    step = make_step(opt)
    params, opt_state = train(step, params0, opt.init(params0), 3)
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state)

    expected_params, expected_state = train(step, params, opt_state, 3)

    # A fresh "process": a new optimizer, abstract targets, a new jitted step.
    opt2 = make_opt()
    abstract_params = jax.eval_shape(lambda: tiny_params())
    restored_params = restore_params(path, target=abstract_params)
    restored_state = restore_opt_state(path, jax.eval_shape(opt2.init, abstract_params))
    trees.assert_trees_bitwise_equal(restored_state, opt_state)
    resumed_params, resumed_state = train(make_step(opt2), restored_params, restored_state, 3)

    trees.assert_trees_bitwise_equal(resumed_params, expected_params)
    trees.assert_trees_bitwise_equal(resumed_state, expected_state)


def test_statistics_round_trip_from_training(tmp_path):
    opt = umtam_jax.umtam(0.05, **SMALL)
    params0 = tiny_params()
    params, opt_state = train(make_step(opt), params0, opt.init(params0), 2)
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state)
    expected = umtam_jax.statistics(opt_state)
    restored = restore_statistics(path)
    trees.assert_trees_bitwise_equal(restored, expected)
    kinds = read_metadata(path)["statistics_kinds"]["counts"]
    assert kinds["factored"] >= 1 and kinds["dense"] >= 1
    # statistics-only consumers need no optimizer
    chex.assert_trees_all_equal(umtam_jax.saliency(restored), umtam_jax.saliency(opt_state))


def test_bfloat16_params_training(tmp_path):
    opt = umtam_jax.umtam(0.05, **SMALL)
    params0 = tiny_params(jnp.bfloat16)
    params, opt_state = train(make_step(opt), params0, opt.init(params0), 2)
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state)
    restored = restore_params(path)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored))
    trees.assert_trees_bitwise_equal(restored, params)
    state = restore_opt_state(path, jax.eval_shape(opt.init, params0))
    trees.assert_trees_bitwise_equal(state, opt_state)


def test_state_without_umtam_saves_no_statistics(tmp_path):
    params = tiny_params()
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state)
    assert read_metadata(path)["items"] == ["params", "opt_state"]
    with pytest.raises(FileNotFoundError, match="no 'statistics' item"):
        restore_statistics(path)
    assert restore_checkpoint(path).statistics is None
    trees.assert_trees_bitwise_equal(
        restore_opt_state(path, jax.eval_shape(opt.init, params)), opt_state
    )


def test_flax_nnx_state_is_stored_as_its_arrays_and_lines_up_with_its_statistics(tmp_path):
    from flax import nnx

    from umtam_jax import engine, merging

    def model(seed):
        return nnx.Sequential(nnx.Linear(12, 16, rngs=nnx.Rngs(seed)), nnx.relu)

    trained = model(0)
    optimizer = nnx.Optimizer(
        trained, umtam_jax.umtam(0.1, rank=2, min_dim_size_to_factor=8), wrt=nnx.Param
    )
    x = jnp.linspace(-1.0, 1.0, 48).reshape(4, 12)
    for _ in range(2):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(trained)
        optimizer.update(trained, grads)
    params = nnx.state(trained, nnx.Param)
    save_checkpoint(tmp_path / "base", nnx.state(model(0), nnx.Param))
    save_checkpoint(tmp_path / "expert", params, opt_state=optimizer.opt_state)

    restored = restore_params(tmp_path / "expert")  # plain arrays under the Variables' paths
    np.testing.assert_array_equal(restored["layers"][0]["kernel"], params["layers"][0]["kernel"])
    into = restore_params(tmp_path / "expert", target=nnx.state(model(1), nnx.Param))
    fresh = model(1)
    nnx.update(fresh, into)
    np.testing.assert_array_equal(fresh(x), trained(x))

    out = tmp_path / "merged"
    base, expert = tmp_path / "base", tmp_path / "expert"
    engine.merge_checkpoints("umtam", base, [expert], out, progress=False)
    merged = restore_params(out)
    stats = restore_statistics(tmp_path / "expert")
    expected = merging.umtam(restore_params(tmp_path / "base"), [restored], [stats])
    chex.assert_trees_all_equal(merged, expected)


def test_linen_variables_saved_whole_keep_their_statistics_under_params(tmp_path):
    """Linen variables saved whole ({"params": x}) with the state of an optimizer of x:
    the statistics, keyed like x, were saved beside them unwrapped, and every merge
    refused them ("lacks base's leaf ['params']..."); they are saved under "params"."""
    rng = np.random.default_rng(0)
    base = {"Dense_0": {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
                        "bias": np.zeros(4, np.float32)}}  # fmt: skip
    dirs, experts, stats = [], [], []
    for k in range(2):
        x = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), base)
        opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
        _, state = opt.update(x, opt.init(x), x)
        dirs.append(tmp_path / f"e{k}")
        save_checkpoint(dirs[-1], {"params": x}, opt_state=state)
        experts.append(x)
        stats.append(umtam_jax.statistics(state))
    assert list(restore_statistics(dirs[0])) == ["params"]
    save_checkpoint(tmp_path / "b", {"params": base})
    engine.merge_checkpoints("umtam", tmp_path / "b", dirs, tmp_path / "o", density=0.5,
                             progress=False)  # fmt: skip
    want = merging.umtam(base, experts, stats, density=0.5)
    chex.assert_trees_all_close(restore_params(tmp_path / "o"), {"params": want}, rtol=1e-6)
