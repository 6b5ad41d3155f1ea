"""Converters between Orbax checkpoints and safetensors folders: exact both ways, never
over their input, with the copied config naming the written dtype."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import trees
from tests.checkpoint.safetensors_helpers import read_all, small_tree
from umtam_jax.checkpoint import (
    CheckpointReader,
    SafetensorsReader,
    names_from_tree,
    orbax_to_safetensors,
    restore_params,
    safetensors_to_orbax,
    save_checkpoint,
    save_safetensors,
    tree_from_names,
)
from umtam_jax.checkpoint import _safetensors_write as W

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
    with pytest.raises(
        ValueError, match="nested mappings with string or integer keys; layers is a 'list'"
    ):
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


def test_an_nnx_state_exports_under_its_parameters_names(tmp_path):
    """``nnx.state(model, nnx.Param)`` (Variables, integer layer keys of nnx.Sequential)
    is written under the names of ``nnx.to_pure_dict``: without the Variables' ``.value``,
    directly and through a checkpoint; and reads back into the model."""
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(3, 1, rngs=nnx.Rngs(1)))  # fmt: skip
    state = nnx.state(model, nnx.Param)
    want = ["layers.0.bias", "layers.0.kernel", "layers.2.bias", "layers.2.kernel"]
    direct = save_safetensors(tmp_path / "direct", state)
    assert SafetensorsReader(direct).names == want
    ckpt = save_checkpoint(tmp_path / "ckpt", state)
    converted = orbax_to_safetensors(ckpt, tmp_path / "converted")
    assert SafetensorsReader(converted).names == want
    reader = SafetensorsReader(converted)
    tree = tree_from_names(dict(zip(reader.names, reader.read(reader.names), strict=True)))
    back = nnx.state(model, nnx.Param)
    back.replace_by_pure_dict(tree)  # the docs' way into a model with integer keys
    chex.assert_trees_all_equal(nnx.to_pure_dict(back), nnx.to_pure_dict(state))
