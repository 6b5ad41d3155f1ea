"""Typed PRNG key leaves round-trip through checkpoints (a train state's dropout key, the
``nnx.Rngs`` of ``nnx.state(model)``), and a target sharding that does not fit a saved
leaf is a plain configuration ``ValueError`` naming the leaf, not corruption."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sharding._mesh_script import run_on_devices
from umtam_jax import checkpoint
from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity
from umtam_jax.checkpoint._format import FORMAT_VERSION

# ----------------------------------------------------------------------------- helpers


def _train_state():
    """A small train state with typed keys of every built-in kind and a legacy raw key."""
    return {
        "params": {"w": jnp.arange(12.0).reshape(4, 3)},
        "dropout_rng": jax.random.key(1),
        "many": jax.random.split(jax.random.key(2), 3),
        "rbg": jax.random.key(3, impl="rbg"),
        "unsafe": jax.random.key(4, impl="unsafe_rbg"),
        "legacy": jax.random.PRNGKey(5),  # a raw uint32 key: stays a uint32 array
    }


def _assert_same_key(got, want):
    """Same key type, implementation, bits and the same draws."""
    assert jnp.issubdtype(got.dtype, jax.dtypes.prng_key), got.dtype
    assert got.dtype == want.dtype and got.shape == want.shape
    assert jax.random.key_impl(got) == jax.random.key_impl(want)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    draw = jax.vmap(lambda k: jax.random.normal(k, (3,))) if want.ndim else jax.random.normal
    args = () if want.ndim else ((3,),)
    np.testing.assert_array_equal(draw(got, *args), draw(want, *args))


def _assert_state_equal(got, want):
    np.testing.assert_array_equal(got["params"]["w"], want["params"]["w"])
    for name in ("dropout_rng", "many", "rbg", "unsafe"):
        _assert_same_key(got[name], want[name])
    assert got["legacy"].dtype == jnp.uint32
    np.testing.assert_array_equal(got["legacy"], want["legacy"])


# ----------------------------------------------------------------------------- PRNG keys


def test_typed_keys_round_trip_without_a_target(tmp_path):
    state = _train_state()
    path = checkpoint.save_checkpoint(tmp_path / "ck", state)
    _assert_state_equal(checkpoint.restore_params(path), state)
    # The structure record names the implementation; the stored array is the key data.
    structure = checkpoint.CheckpointReader(path).structure("params")
    entries = {e[0]: e[2] for e in structure["children"]}
    assert entries["rbg"] == {
        "t": "key",
        "impl": "rbg",
        "leaf": {"t": "array", "shape": [4], "dtype": "uint32"},
    }
    assert entries["legacy"] == {"t": "array", "shape": [2], "dtype": "uint32"}
    assert dict(E.spec_arrays(structure))[("many",)] == entries["many"]["leaf"]


@pytest.mark.parametrize("kind", ["concrete", "eval_shape"])
def test_typed_keys_restore_into_a_target(tmp_path, kind):
    state = _train_state()
    path = checkpoint.save_checkpoint(tmp_path / "ck", state)
    other = jax.tree.map(lambda x: x, state)
    other.update(dropout_rng=jax.random.key(9), many=jax.random.split(jax.random.key(8), 3))
    target = other if kind == "concrete" else jax.eval_shape(lambda: other)
    _assert_state_equal(checkpoint.restore_params(path, target=target), state)
    got = checkpoint.restore_checkpoint(path, params_target=target).params
    _assert_state_equal(got, state)


def test_a_key_as_the_whole_tree_and_in_the_optimizer_state(tmp_path):
    key = jax.random.split(jax.random.key(7), 2)
    path = checkpoint.save_checkpoint(tmp_path / "ck", key, opt_state={"rng": key[0]})
    _assert_same_key(checkpoint.restore_params(path), key)
    _assert_same_key(checkpoint.restore_params(path, target=jax.eval_shape(lambda: key)), key)
    got = checkpoint.restore_opt_state(path, {"rng": jax.random.key(0)})
    _assert_same_key(got["rng"], key[0])


def test_nnx_rngs_and_dropout_keys_round_trip(tmp_path):
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    trained = Model(nnx.Rngs(0, dropout=1))
    x = jnp.ones((2, 4))
    trained(x)  # advances the dropout stream: its count and key are not the initial ones
    path = checkpoint.save_checkpoint(tmp_path / "ck", nnx.state(trained))
    for target in (
        nnx.state(Model(nnx.Rngs(5, dropout=6))),
        jax.eval_shape(lambda: nnx.state(Model(nnx.Rngs(5, dropout=6)))),
    ):
        fresh = Model(nnx.Rngs(5, dropout=6))
        nnx.update(fresh, checkpoint.restore_params(path, target=target))
        rngs, want = fresh.drop.rngs, trained.drop.rngs
        _assert_same_key(rngs.key[...], want.key[...])
        assert int(rngs.count[...]) == int(want.count[...]) == 1
        # the same dropout mask (a clone: a call advances the model's stream)
        np.testing.assert_array_equal(fresh(x), nnx.clone(trained)(x))
    plain = checkpoint.restore_params(path)  # without a target: arrays under their paths
    _assert_same_key(plain["drop"]["rngs"]["key"], trained.drop.rngs.key[...])


def test_key_data_is_checksummed_and_verified(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"rng": jax.random.key(1)})
    record_file = path / _integrity.CHECKSUMS_FILE
    data = json.loads(record_file.read_text())
    entry = data["items"]["params"]["rng"]
    assert (entry["dtype"], entry["shape"]) == ("uint32", [2])
    want = jax.random.key_data(jax.random.key(1))
    assert entry["crc32"] == _integrity.crc32(np.asarray(want))
    entry["crc32"] ^= 1
    record_file.write_text(json.dumps(data))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/rng"):
        checkpoint.restore_params(path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/rng"):
        checkpoint.restore_params(path, target={"rng": jax.random.key(0)})


def test_the_partial_reader_gives_key_data_and_abstract_keys(tmp_path):
    key = jax.random.split(jax.random.key(3), 4)
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"k": key, "w": jnp.ones(3)})
    reader = checkpoint.CheckpointReader(path)
    abstract = reader.abstract("params")
    assert abstract["k"].shape == (4,) and abstract["k"].dtype == key.dtype
    assert reader.leaf_paths("params") == [("k",), ("w",)]
    [data] = reader.restore_arrays("params", [("k",)])
    assert isinstance(data, np.ndarray) and data.dtype == np.uint32
    np.testing.assert_array_equal(data, jax.random.key_data(key))
    [sub] = reader.restore_subtrees("params", [("k",)])
    _assert_same_key(sub, key)


def test_check_spec_accepts_key_nodes_and_refuses_malformed_ones():
    leaf = {"t": "array", "shape": [2], "dtype": "uint32"}
    E.check_spec({"t": "key", "impl": "threefry2x32", "leaf": leaf})
    E.check_spec({"t": "root_array", "leaf": {"t": "key", "impl": "rbg", "leaf": leaf}})
    bad = [
        ({"t": "key", "leaf": leaf}, "names no PRNG implementation"),
        ({"t": "key", "impl": 3, "leaf": leaf}, "names no PRNG implementation"),
        ({"t": "key", "impl": "rbg"}, "no node type"),
        ({"t": "key", "impl": "rbg", "leaf": {"t": "dict", "children": []}}, "not an array"),
        ({"t": "key", "impl": "rbg", "leaf": {**leaf, "shape": [-2]}}, "no valid shape"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            E.check_spec({"t": "dict", "children": [["k", "s", spec]]})


def test_a_target_with_another_key_kind_is_refused_naming_the_leaf(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"rng": jax.random.key(1)})
    for target, message in [
        ({"rng": jax.random.key(1, impl="rbg")}, "rng: a threefry2x32 key in the checkpoint"),
        ({"rng": jax.random.PRNGKey(1)}, "rng: a threefry2x32 key in the checkpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            checkpoint.restore_params(path, target=target)
    legacy = checkpoint.save_checkpoint(tmp_path / "legacy", {"rng": jax.random.PRNGKey(1)})
    with pytest.raises(ValueError, match="rng: an array in the checkpoint, a threefry2x32 key"):
        checkpoint.restore_params(legacy, target={"rng": jax.random.key(1)})


def test_non_numeric_leaves_are_still_refused_naming_the_leaf(tmp_path):
    for leaf in (np.array(["a", "b"]), np.array([object()], dtype=object)):
        with pytest.raises(TypeError, match=r"\['s'\] has dtype .* only numeric"):
            checkpoint.save_checkpoint(tmp_path / "ck", {"s": leaf})
    with pytest.raises(ValueError, match="empty"):
        checkpoint.save_checkpoint(tmp_path / "ck", {"k": jax.random.split(jax.random.key(0), 0)})
    assert E.dtype_of(jax.random.key(0)) == jax.random.key(0).dtype  # no NumPy TypeError


def test_a_streaming_save_refuses_a_key_up_front_naming_the_leaf(tmp_path):
    """save_params_streaming stores numeric arrays: a key leaf of abstract_params (abstract
    or an array) is one TypeError before anything is produced or written (a key produced
    was JAX's TypeError naming no leaf)."""
    key = jax.random.key(3)
    produced = []

    def produce(i):
        produced.append(i)
        return key if i == 0 else np.ones(2, np.float32)

    for k in (jax.ShapeDtypeStruct((), key.dtype), key):
        like = {"k": k, "w": jax.ShapeDtypeStruct((2,), np.float32)}
        with pytest.raises(TypeError, match=r"leaf \['k'\] .* is a PRNG key.*save_checkpoint"):
            checkpoint.save_params_streaming(tmp_path / "ck", like, produce)
    assert produced == [] and not (tmp_path / "ck").exists()


def _edit_metadata(path, edit):
    """Edits the metadata record and its CRC in the checksum record to match: a
    checkpoint written so, not a damaged one."""
    meta_file = path / "umtam_metadata" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    record_file = path / _integrity.CHECKSUMS_FILE
    record = json.loads(record_file.read_text())
    record["metadata"] = _integrity.metadata_crc32(meta)
    record_file.write_text(json.dumps(record))


def test_format_versions_old_restore_and_newer_ask_for_an_upgrade(tmp_path):
    keyless = checkpoint.save_checkpoint(tmp_path / "keyless", {"w": jnp.ones(3)})
    # Older readers restore a checkpoint without keys: it stays version 3.
    assert checkpoint.read_metadata(keyless)["format_version"] == 3
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"w": jnp.ones(3), "k": jax.random.key(0)})
    assert checkpoint.read_metadata(path)["format_version"] == FORMAT_VERSION == 4
    _edit_metadata(keyless, lambda meta: meta.update(format_version=2))
    np.testing.assert_array_equal(checkpoint.restore_params(keyless)["w"], np.ones(3))
    np.testing.assert_array_equal(checkpoint.restore_params(path)["w"], np.ones(3))
    _edit_metadata(path, lambda meta: meta.update(format_version=5))
    with pytest.raises(ValueError, match="upgrade umtam_jax") as err:
        checkpoint.restore_params(path)
    assert not isinstance(err.value, checkpoint.CheckpointCorruptError)


def test_a_key_implementation_this_jax_lacks_is_not_called_damage(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"rng": jax.random.key(1)})
    rename = lambda meta: meta["structures"]["params"]["children"][0][2].update(impl="new")  # noqa: E731
    _edit_metadata(path, rename)
    with pytest.raises(
        ValueError, match="params leaf rng is a PRNG key of implementation 'new'"
    ) as err:
        checkpoint.restore_params(path)
    assert not isinstance(err.value, checkpoint.CheckpointCorruptError)


# ----------------------------------------------------------------------------- shardings

_SHARDING_SCRIPT = """
import tempfile
from umtam_jax import checkpoint
from umtam_jax.checkpoint import _metadata

reads = []  # the items of every Orbax read (a failed one prints its storage specs)
restore_items = _metadata.restore_items
_metadata.restore_items = lambda d, args: reads.extend(args) or restore_items(d, args)

def attempt(fn):
    reads.clear()
    try:
        fn()
        return {"type": None, "reads": reads[:]}
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "reads": reads[:],
                "corrupt": isinstance(e, checkpoint.CheckpointCorruptError)}

keys = jax.random.split(jax.random.key(3), 8)
tree = {"w": jnp.arange(64.0 * 32).reshape(64, 32), "b": jnp.arange(30.0),
        "keys": keys, "six": jax.random.split(jax.random.key(4), 6)}
root = tempfile.TemporaryDirectory()  # removed when the script ends
path = checkpoint.save_checkpoint(root.name + "/ck", tree)
mesh = jax.make_mesh((4,), ("model",))
def sds(x, spec):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
good = {"w": sds(tree["w"], P(None, "model")), "b": sds(tree["b"], P()),
        "keys": sds(keys, P("model")), "six": sds(tree["six"], P())}
for case, leaf, spec in [("indivisible", "b", P("model")), ("key", "six", P("model"))]:
    target = dict(good, **{leaf: sds(tree[leaf], spec)})
    report[case] = dict(attempt(lambda: checkpoint.restore_params(path, target=target)),
                        path=str(path))
concrete = dict(good, keys=jax.device_put(keys, NamedSharding(mesh, P("model"))))
for case, target in [("good", good), ("concrete", concrete)]:
    got = checkpoint.restore_params(path, target=target)
    report[case] = {
        "w": bool((got["w"] == tree["w"]).all()), "w_spec": trim(got["w"].sharding.spec),
        "keys": bool((jax.random.key_data(got["keys"]) == jax.random.key_data(keys)).all()),
        "keys_dtype": str(got["keys"].dtype), "keys_spec": trim(got["keys"].sharding.spec),
        "draws": bool((jax.vmap(jax.random.normal)(got["keys"])
                       == jax.vmap(jax.random.normal)(keys)).all()),
    }
"""


@pytest.fixture(scope="module")
def sharding_report():
    return run_on_devices(4, _SHARDING_SCRIPT)


@pytest.mark.parametrize(
    ("case", "leaf", "shape", "spec"),
    [
        ("indivisible", "b", "(30,)", "P('model',)"),
        ("key", "six", "(6, 2)", "P('model',)"),
    ],
)
def test_a_target_sharding_that_does_not_fit_is_a_config_error(
    sharding_report, case, leaf, shape, spec
):
    entry = sharding_report[case]
    assert entry["type"] == "ValueError" and not entry["corrupt"], entry
    message = entry["message"]
    for part in (entry["path"], "params", f"leaf {leaf}", f"shape {shape}", spec):
        assert part in message, (part, message)
    assert "corrupt" not in message, message
    assert entry["reads"] == ["umtam_metadata"], entry  # refused before Orbax read arrays


@pytest.mark.parametrize("case", ["good", "concrete"])
def test_fitting_target_shardings_restore_keys_and_arrays_sharded(sharding_report, case):
    entry = sharding_report[case]
    assert entry["w"] and entry["keys"] and entry["draws"], entry
    assert entry["keys_dtype"] == "key<fry>", entry
    assert entry["w_spec"] == ["None", "model"] and entry["keys_spec"] == ["model"], entry
