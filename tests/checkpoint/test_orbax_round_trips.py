"""Orbax checkpoints of umtam_jax written and restored: hand-built trees bit for bit,
containers, dtypes and targets, shardings (two fake CPU devices) and custom nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests import trees
from tests.checkpoint.orbax_helpers import hand_opt_state, hand_statistics
from umtam_jax.checkpoint import (
    Checkpoint,
    read_metadata,
    restore_checkpoint,
    restore_opt_state,
    restore_params,
    restore_statistics,
    save_checkpoint,
)
from umtam_jax.optimizer._state import DenseStatistics, FactoredStatistics

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
    params = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
    opt_state = hand_opt_state()  # of these parameters' shapes
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
