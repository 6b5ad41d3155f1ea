"""Tests of umtam_jax.checkpoint: round trips, bit-identical resume, atomicity, errors."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import umtam_jax
from tests import trees
from umtam_jax.checkpoint import (
    Checkpoint,
    read_metadata,
    restore_checkpoint,
    restore_opt_state,
    restore_params,
    restore_statistics,
    save_checkpoint,
)
from umtam_jax.optimizer._state import (
    DenseLeafState,
    DenseStatistics,
    FactoredLeafState,
    FactoredStatistics,
    ScaleByUmtamState,
)

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def tiny_params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "hidden": {
            "kernel": (0.3 * jax.random.normal(k1, (8, 6))).astype(dtype),
            "bias": jnp.zeros((6,), dtype),
        },
        "out": {"kernel": (0.3 * jax.random.normal(k2, (6, 6))).astype(dtype)},
        "scale": (1.0 + 0.1 * jax.random.normal(k3, (6,))).astype(dtype),
    }


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


def hand_statistics():
    """A statistics pytree with factored, dense, None fields, MaskedNode and bfloat16."""
    return {
        "enc": {
            "kernel": FactoredStatistics(
                u=jnp.arange(8.0).reshape(4, 2),
                sigma=jnp.diag(jnp.array([2.0, 1.0])),
                v=jnp.ones((3, 2)),
                row=jnp.full((4,), 0.5),
                col=jnp.full((3,), 0.25),
                saliency=jnp.linspace(0, 1, 12).reshape(4, 3),
            ),
            "bias": DenseStatistics(
                mu=jnp.array([1.0, -1.0, 0.5], jnp.bfloat16), nu=jnp.ones(3), saliency=None
            ),
        },
        "frozen": optax.MaskedNode(),
        "head": FactoredStatistics(
            u=jnp.ones((2, 1)),
            sigma=jnp.ones((1, 1)),
            v=jnp.ones((5, 1)),
            row=jnp.ones(2),
            col=jnp.ones(5),
            saliency=None,
        ),
    }


def hand_opt_state():
    """An optax.chain-like state built from the UMTAM NamedTuples, with None fields."""
    leaves = {
        "w": FactoredLeafState(
            u=jnp.ones((4, 2)),
            sigma=jnp.eye(2),
            v=jnp.full((3, 2), 0.5),
            dense_momentum=None,
            row=jnp.ones(4),
            col=jnp.ones(3),
            saliency=jnp.zeros((4, 3)),
            initial=jnp.arange(12.0).reshape(4, 3),
            rank=jnp.int32(2),
        ),
        "b": DenseLeafState(
            mu=jnp.ones(3, jnp.bfloat16), nu=jnp.ones(3), saliency=None, initial=None
        ),
        "m": optax.MaskedNode(),
    }
    return (
        ScaleByUmtamState(count=jnp.int32(3), leaves=leaves),
        optax.EmptyState(),
        optax.ScaleByScheduleState(count=jnp.int32(7)),
    )


# ------------------------------------------------------------------------------------------
# round trips on hand-built trees
# ------------------------------------------------------------------------------------------


def test_hand_built_round_trip(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3, jnp.bfloat16)}
    opt_state = hand_opt_state()
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state, metadata={"step": 3})

    trees.assert_trees_bitwise_equal(restore_params(path), params)
    stats = restore_statistics(path)
    trees.assert_trees_bitwise_equal(stats, umtam_jax.statistics(opt_state))
    assert isinstance(stats["w"], FactoredStatistics)
    assert isinstance(stats["b"], DenseStatistics) and stats["b"].saliency is None
    assert isinstance(stats["m"], optax.MaskedNode)
    assert stats["b"].mu.dtype == jnp.bfloat16
    restored = restore_opt_state(path, jax.eval_shape(lambda: opt_state))
    trees.assert_trees_bitwise_equal(restored, opt_state)
    assert isinstance(jax.tree.leaves(restored)[0], jax.Array)


def test_statistics_tree_saved_directly(tmp_path):
    stats = hand_statistics()
    path = save_checkpoint(tmp_path / "ckpt", {"p": jnp.zeros(2)}, statistics=stats)
    restored = restore_statistics(path)
    trees.assert_trees_bitwise_equal(restored, stats)
    assert restored["head"].saliency is None
    assert restored["enc"]["bias"].mu.dtype == jnp.bfloat16
    kinds = read_metadata(path)["statistics_kinds"]
    assert kinds["counts"] == {"factored": 2, "dense": 1, "masked": 1}
    assert kinds["paths"]["['frozen']"] == "masked"
    # merging helpers work on restored statistics
    curv = umtam_jax.curvature(restored)
    assert curv["enc"]["kernel"].shape == (4, 3)


def test_param_containers_and_scalars(tmp_path):
    params = {
        "layers": [
            {"w": jnp.ones((2, 2), jnp.bfloat16)},
            {"w": jnp.full((2, 2), 2.0, jnp.bfloat16)},
        ],
        "pair": (np.arange(3, dtype=np.int32), np.float32(1.5)),
        "by_index": {0: jnp.array(7.0), 1: jnp.array([1, 2], jnp.int8)},
        "odd.key/with:chars": jnp.zeros(1),
        "empty": {},
        "nothing": None,
    }
    path = save_checkpoint(tmp_path / "ckpt", params)
    restored = restore_params(path)
    assert set(restored) == set(params)
    assert isinstance(restored["layers"], list) and isinstance(restored["pair"], tuple)
    assert restored["empty"] == {} and restored["nothing"] is None
    assert restored["layers"][1]["w"].dtype == jnp.bfloat16
    trees.assert_trees_bitwise_equal(restored, jax.tree.map(jnp.asarray, params))


def test_64_bit_values_beyond_32_bits_are_an_error_without_x64(tmp_path):
    """Without x64, 64-bit arrays come back 32-bit: where a value does not fit, restoring
    names the leaf instead of wrapping 2**40 + 1 to 1 or turning 1e300 into inf."""
    path = save_checkpoint(
        tmp_path / "c", {"n": np.array([2**40 + 1, 3]), "u": np.array([7], np.uint64)}
    )
    with pytest.raises(ValueError, match=r"params leaf n holds 1099511627777, beyond int32"):
        restore_params(path)
    path = save_checkpoint(tmp_path / "f", {"f": np.array([1e300])})
    with pytest.raises(ValueError, match=r"leaf f holds 1e\+300, beyond float32"):
        restore_params(path)
    nan = save_checkpoint(tmp_path / "nan", {"f": np.array([np.nan, 1e300, -np.inf])})
    with pytest.raises(ValueError, match=r"leaf f holds 1e\+300"):  # not hidden by the NaN
        restore_params(nan)
    small = save_checkpoint(tmp_path / "s", {"n": np.array([-(2**31), 2**31 - 1])})
    restored = restore_params(small)["n"]
    assert restored.dtype == np.int32
    assert restored.tolist() == [-(2**31), 2**31 - 1]
    with jax.enable_x64(True):
        assert restore_params(path)["f"].tolist() == [1e300]


def test_inputs_not_modified(tmp_path):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.0)}
    opt_state = hand_opt_state()
    before = jax.tree.map(np.array, (params, opt_state))
    save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state)
    trees.assert_trees_bitwise_equal((params, opt_state), before)
    assert isinstance(params["w"], np.ndarray)


def test_restore_checkpoint_everything(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3, jnp.bfloat16)}
    opt_state = hand_opt_state()
    path = save_checkpoint(tmp_path / "ckpt", params, opt_state=opt_state, metadata={"task": "t"})
    ckpt = restore_checkpoint(path, opt_state_target=jax.eval_shape(lambda: opt_state))
    assert isinstance(ckpt, Checkpoint)
    trees.assert_trees_bitwise_equal(ckpt.params, params)
    trees.assert_trees_bitwise_equal(ckpt.statistics, umtam_jax.statistics(opt_state))
    trees.assert_trees_bitwise_equal(ckpt.opt_state, opt_state)
    assert ckpt.metadata["user"] == {"task": "t"}
    assert ckpt.metadata["library_version"] == umtam_jax.__version__
    assert ckpt.metadata["items"] == ["params", "statistics", "opt_state"]
    assert "structures" not in ckpt.metadata
    # Without an opt_state target the optimizer state is not restored.
    assert restore_checkpoint(path).opt_state is None


def test_params_target_gives_structure_and_sharding(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3, jnp.bfloat16)}
    path = save_checkpoint(tmp_path / "ckpt", params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params
    )
    restored = restore_params(path, target=target)
    trees.assert_trees_bitwise_equal(restored, params)
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_a_target_dtype_casts_within_its_kind_and_never_overflows(tmp_path):
    """A wider or same-kind target dtype casts; one that truncates (float to int) or
    overflows (to ±inf) is refused naming the leaf: both were silent."""
    path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.array([1.5, 7e4]), "n": jnp.arange(2)})
    like = {"w": jnp.zeros(2, jnp.bfloat16), "n": jnp.zeros(2, jnp.float32)}
    restored = restore_params(path, target=like)
    np.testing.assert_array_equal(restored["n"], [0.0, 1.0])
    assert restored["w"].dtype == jnp.bfloat16 and restored["n"].dtype == jnp.float32
    with pytest.raises(TypeError, match="params leaf w is float32; the target asks int32"):
        restore_params(path, target={**like, "w": jnp.zeros(2, jnp.int32)})
    with pytest.raises(ValueError, match="params leaf w holds 70000, beyond float16"):
        restore_params(path, target={**like, "w": jnp.zeros(2, jnp.float16)})
    big = save_checkpoint(tmp_path / "int", {"n": jnp.array([100_000], jnp.int32)})
    with pytest.raises(ValueError, match="params leaf n holds 100000, beyond float16"):
        restore_params(big, target={"n": jnp.zeros(1, jnp.float16)})
    # An integer a float target would round (2**24 + 1 in float32) is refused too.
    odd = save_checkpoint(tmp_path / "odd", {"n": jnp.array([3, 2**24 + 1], jnp.int32)})
    with pytest.raises(TypeError, match="leaf n holds integers that float32 .* cannot represent"):
        restore_params(odd, target={"n": jnp.zeros(2, jnp.float32)})


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


# ------------------------------------------------------------------------------------------
# overwrite and atomicity
# ------------------------------------------------------------------------------------------


def test_overwrite_refused_then_allowed(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, {"w": jnp.zeros(3)})
    with pytest.raises(FileExistsError, match=str(target)):
        save_checkpoint(target, {"w": jnp.ones(3)})
    np.testing.assert_array_equal(restore_params(target)["w"], np.zeros(3))

    save_checkpoint(target, {"w": jnp.ones(3)}, overwrite=True)
    np.testing.assert_array_equal(restore_params(target)["w"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging leftovers


def _fail_metadata_write(monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated failure mid-save")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", boom)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", boom)


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    _fail_metadata_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_checkpoint(tmp_path / "ckpt", tiny_params(), opt_state=hand_opt_state())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_checkpoint(target, {"w": jnp.zeros(3)})
    _fail_metadata_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_checkpoint(target, {"w": jnp.ones(3)}, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    np.testing.assert_array_equal(restore_params(target)["w"], np.zeros(3))


def test_bad_metadata_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)}, metadata={"f": object()})
    assert os.listdir(tmp_path) == []


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


def test_empty_array_is_refused_with_its_path_and_writes_nothing(tmp_path):
    params = {"w": jnp.ones((3, 3)), "extra_tokens": jnp.zeros((0, 3))}
    with pytest.raises(ValueError, match=r"params: the array at \['extra_tokens'\] is empty"):
        save_checkpoint(tmp_path / "ckpt", params)
    opt = umtam_jax.umtam(0.1, rank=1, min_dim_size_to_factor=1)
    with pytest.raises(ValueError, match=r"\['extra_tokens'\].*is empty"):
        save_checkpoint(tmp_path / "ckpt", {"w": params["w"]}, opt_state=opt.init(params))
    assert os.listdir(tmp_path) == []


def test_an_array_of_objects_or_strings_is_refused_with_its_path_and_writes_nothing(tmp_path):
    """It reached TensorStore, whose threads printed tracebacks before its own error."""
    for bad in (np.array([object()]), np.array(["a", "b"])):
        with pytest.raises(TypeError, match=r"params: the array at \['tokens'\] has dtype"):
            save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones(3), "tokens": bad})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("dtype", "why"),
    [(">f4", "byte order is not the machine's"), (">i8", "byte order"),
     (np.longdouble, "no such dtype"), (np.clongdouble, "no such dtype")],
)  # fmt: skip
def test_an_array_no_restore_could_read_is_refused_before_writing(tmp_path, dtype, why):
    """A big-endian array (np.fromfile, FITS, HDF5) was saved and then every restore called
    the checkpoint corrupt; float128 reached TensorStore, which printed tracebacks."""
    wide = np.dtype(dtype).itemsize > (16 if np.dtype(dtype).kind == "c" else 8)
    if why == "no such dtype" and not wide:
        pytest.skip("this platform's long double is a float64")
    with pytest.raises(TypeError, match=rf"params: the array at \['a'\]\['w'\] .*{why}"):
        save_checkpoint(tmp_path / "ckpt", {"a": {"w": np.ones(3, dtype)}})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# missing or corrupt checkpoints
# ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3, jnp.bfloat16)}
    return save_checkpoint(tmp_path / "ckpt", params, opt_state=hand_opt_state())


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    for fn in (restore_params, restore_statistics, restore_checkpoint, read_metadata):
        with pytest.raises(FileNotFoundError, match="nope"):
            fn(missing)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="umtam_metadata"):
        restore_params(tmp_path / "empty")


def test_missing_item(saved):
    shutil.rmtree(saved / "statistics")
    with pytest.raises(FileNotFoundError, match="'statistics'") as info:
        restore_statistics(saved)
    assert str(saved) in str(info.value)
    np.testing.assert_array_equal(restore_params(saved)["w"], np.arange(12.0).reshape(4, 3))


def test_opt_state_not_saved(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)})
    with pytest.raises(FileNotFoundError, match="'opt_state'"):
        restore_opt_state(path, hand_opt_state())


def test_truncated_array_file(saved):
    for f in glob.glob(str(saved / "params" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(5)
    with pytest.raises(ValueError, match="'params'.*corrupt") as info:
        restore_params(saved)
    assert str(saved) in str(info.value)
    assert len(str(info.value)) < 1000


def test_truncated_metadata(saved):
    with open(saved / "umtam_metadata" / "metadata", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match="umtam_metadata.*corrupt"):
        restore_params(saved)


def test_unfinished_save_directory(saved):
    tmp = saved.parent / (saved.name + ".orbax-checkpoint-tmp")
    saved.rename(tmp)
    with pytest.raises(ValueError, match="incomplete"):
        restore_params(tmp)


def test_target_mismatch_names_paths(saved):
    bad = hand_opt_state()
    bad[0].leaves["w"] = bad[0].leaves["w"]._replace(u=jnp.ones((4, 3)))
    bad = (bad[0], bad[1])  # also drop an element
    with pytest.raises(ValueError, match="does not match") as info:
        restore_opt_state(saved, bad)
    msg = str(info.value)
    assert "0/leaves/w/u: shape (4, 2) in the checkpoint, (4, 3) in the target" in msg
    assert "2/count: in the checkpoint but not in the target" in msg
    assert "build the target with the rank, row_axes, min_dim_size_to_factor" in msg
    with pytest.raises(ValueError, match="does not match") as info:  # params: no such hint
        restore_params(saved, target={"w": jnp.ones((2, 2))})
    assert "row_axes" not in str(info.value)


# ------------------------------------------------------------------------------------------
# sharding (two fake CPU devices, in a subprocess so the device count can be set)
# ------------------------------------------------------------------------------------------

_SHARDING_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from umtam_jax.checkpoint import restore_params, save_checkpoint

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    row = NamedSharding(mesh, P("x", None))
    col = NamedSharding(mesh, P(None, "x"))
    params = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8), row)}
    path = save_checkpoint(sys.argv[1], params)
    target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=col)}
    restored = restore_params(path, target=target)
    assert restored["w"].sharding == col, restored["w"].sharding
    np.testing.assert_array_equal(restored["w"], np.arange(32.0).reshape(4, 8))
    plain = restore_params(path)
    assert len(plain["w"].sharding.device_set) == 1
    np.testing.assert_array_equal(plain["w"], np.arange(32.0).reshape(4, 8))
    print("OK")
    """
)


def test_restore_honours_target_sharding(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDING_SCRIPT, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_relative_path_and_custom_nodes(tmp_path, monkeypatch):
    from flax.core import FrozenDict

    monkeypatch.chdir(tmp_path)
    params = FrozenDict({"a": {"k": jnp.ones((2, 2))}, "b": jnp.zeros(3)})
    path = save_checkpoint("sub/ckpt", params)
    assert path == tmp_path / "sub" / "ckpt"
    plain = restore_params("sub/ckpt")  # custom nodes come back as plain dicts
    assert type(plain) is dict and type(plain["a"]) is dict
    trees.assert_trees_bitwise_equal(plain, params.unfreeze())
    restored = restore_params("sub/ckpt", target=params)  # ... or as the target's nodes
    assert isinstance(restored, FrozenDict)
    trees.assert_trees_bitwise_equal(restored, params)
