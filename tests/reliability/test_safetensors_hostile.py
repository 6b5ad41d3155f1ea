"""Hostile Hugging Face folders: special files, links out of the folder, crafted shapes.

Nothing here may hang, read without end or copy a file the model does not own: each case
is one ``ValueError`` naming the file (and tensor), raised before anything is written.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from umtam_jax.checkpoint import SafetensorsReader, save_safetensors

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")


def _foreign(folder, **files) -> str:
    """A folder as transformers writes it (no umtam_jax marker), with extra text files."""
    os.makedirs(folder)
    save_file({"w": np.ones(2, np.float32)}, os.path.join(folder, "model.safetensors"))
    for name, text in files.items():
        with open(os.path.join(folder, name.replace("_", ".")), "w") as f:
            f.write(text)
    return str(folder)


def _raw(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_a_fifo_or_device_is_never_opened_as_a_shard_or_index(tmp_path):
    fifo_shard = tmp_path / "fifo"
    fifo_shard.mkdir()
    os.mkfifo(fifo_shard / "model-1.safetensors")  # opening it would wait for a writer
    index = {"weight_map": {"w": "model-1.safetensors"}}
    (fifo_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-1.safetensors is not a valid .*not a regular"):
        SafetensorsReader(fifo_shard)
    endless_index = tmp_path / "zero"
    endless_index.mkdir()
    os.symlink("/dev/zero", endless_index / "model.safetensors.index.json")
    with pytest.raises(ValueError, match="index.json is a character device, not a regular file"):
        SafetensorsReader(endless_index)


def test_a_special_marker_file_reads_as_a_foreign_folder(tmp_path):
    folder = _foreign(tmp_path / "m")
    os.mkfifo(os.path.join(folder, "umtam_jax_safetensors.json"))
    np.testing.assert_array_equal(SafetensorsReader(folder).read(["w"])[0], np.ones(2))


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_special_file_to_copy_is_refused_before_anything_is_written(tmp_path, special):
    folder = _foreign(tmp_path / "m")
    target = os.path.join(folder, "tokenizer.json")
    os.mkfifo(target) if special == "fifo" else os.symlink(special, target)
    kind = "a FIFO" if special == "fifo" else "a character device"
    with pytest.raises(ValueError, match=f"refusing to copy {target}: it is {kind}, not a regular"):
        save_safetensors(tmp_path / "out", {"w": np.ones(2, np.float32)}, copy_files_from=folder)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_a_file_linking_out_of_the_folder_is_never_copied(tmp_path):
    """A base whose tokenizer.json links to a private file would publish it in the merge."""
    (tmp_path / "private.txt").write_text("SECRET")
    folder = _foreign(tmp_path / "m", config_json="{}")
    os.symlink(tmp_path / "private.txt", os.path.join(folder, "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json: it links to .*private.txt, outside"):
        save_safetensors(tmp_path / "out", {"w": np.ones(2, np.float32)}, copy_files_from=folder)
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_into_a_hub_cache_blob_are_copied(tmp_path):
    """A Hugging Face cache's snapshots/<revision> files link to ../../blobs/<hash>."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "a1b2").write_text('{"model_type": "bert"}')
    snapshot = _foreign(repo / "snapshots" / "rev", vocab_txt="[PAD]\n")
    os.symlink("../../blobs/a1b2", os.path.join(snapshot, "config.json"))
    os.symlink("vocab.txt", os.path.join(snapshot, "merges.txt"))  # inside the folder
    tree = {"w": np.ones(2, np.float32)}
    out = save_safetensors(tmp_path / "out", tree, copy_files_from=snapshot)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert (out / "merges.txt").read_text() == "[PAD]\n"
    assert not os.path.islink(out / "config.json")
    # A model in a subfolder of a snapshot; a 'blobs' folder outside a cache is not one.
    nested = _foreign(repo / "snapshots" / "rev" / "sub")
    os.symlink("../../../blobs/a1b2", os.path.join(nested, "config.json"))
    out = save_safetensors(tmp_path / "out2", tree, copy_files_from=nested)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x").write_text("SECRET")
    other = _foreign(tmp_path / "d" / "m")
    os.symlink(tmp_path / "blobs" / "x", os.path.join(other, "vocab.txt"))
    with pytest.raises(ValueError, match="vocab.txt: it links to .*blobs/x, outside"):
        save_safetensors(tmp_path / "out3", tree, copy_files_from=other)
    os.remove(os.path.join(other, "vocab.txt"))
    os.symlink(tmp_path / "missing", os.path.join(other, "vocab.txt"))  # skipped, as before
    out = save_safetensors(tmp_path / "out4", tree, copy_files_from=other)
    assert not os.path.lexists(out / "vocab.txt")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1] * 65, "tensor 'w' has an invalid entry"),  # NumPy's 64 dimensions
        ("", "tensor 'w' has an invalid entry"),  # not a list
        ([0, 2**64], r"tensor 'w': its shape \[0, 18446744073709551616\] is too large"),
        ([0, 2**62, 4], "tensor 'w': its shape .* is too large for an array"),
    ],
)
def test_a_shape_no_array_can_have_is_named_with_its_file(tmp_path, shape, message):
    path = tmp_path / "model.safetensors"
    _raw(path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(ValueError, match=f"{path} is not a valid safetensors file: {message}"):
        SafetensorsReader(path)


def test_a_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    _raw(path, {"__metadata__": {"format": "pt"}})
    with pytest.raises(ValueError, match=f"the safetensors model at {path} holds no tensors"):
        SafetensorsReader(path)


def test_a_tensor_named_twice_in_a_header_or_index_is_named(tmp_path):
    """JSON keeps the last of two equal keys: a repeated tensor name hid the other entry,
    and the header was refused for its offsets, or the index for a shard it never named."""

    def entry(begin):
        return json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [begin, begin + 4]})

    text = f'{{"w": {entry(0)}, "w": {entry(4)}}}'.encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(ValueError, match=f"{path} is not a valid .*the key 'w' is given twice"):
        SafetensorsReader(path)
    folder = tmp_path / "sharded"
    folder.mkdir()
    _raw(folder / "a.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
         bytes(4))  # fmt: skip
    index = '{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}'
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match="the key 'w' is given twice"):
        SafetensorsReader(folder)
