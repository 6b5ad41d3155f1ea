"""What a safetensors reader refuses: pickled weights, truncated or edited files, headers
and indexes that disagree, shards deleted or replaced, and corrupt bytes (checksums)."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests import trees
from tests.checkpoint.safetensors_helpers import BF16, read_all, small_tree
from umtam_jax.checkpoint import (
    CheckpointBusyError,
    CheckpointCorruptError,
    SafetensorsReader,
    safetensors_to_orbax,
    save_safetensors,
)
from umtam_jax.checkpoint import _safetensors as S


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


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
    shard.write_bytes(data[:-3])  # cut after the reader was opened: a changed file
    with pytest.raises(CheckpointBusyError, match=f"{shard.name} was replaced .* or the file"):
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


def test_a_reader_never_mixes_versions_when_saves_reuse_the_inode(tmp_path):
    """Two overwrites give the first file's inode number to the new file (ext4, tmpfs):
    an identity of device and inode alone took it for the file opened and read the new
    version's bytes, with the old header (or failed them as corrupt)."""
    out = tmp_path / "latest"

    def tree(v):
        return {"a": np.full(256, v, np.float32), "b": np.full(7, v, np.float32)}

    save_safetensors(out, tree(0))
    for verify in (False, True):
        reader = SafetensorsReader(out, verify=verify)
        assert reader.read(["a"])[0][0] == 0
        for v in (1, 2):
            save_safetensors(out, tree(v), overwrite=True)
        with pytest.raises(CheckpointBusyError, match="was replaced while it was read"):
            reader.read(["b"])
        save_safetensors(out, tree(0), overwrite=True)
    # A hard link to an input or a chmod of it (a backup, a cache) changes no byte.
    reader = SafetensorsReader(out)
    os.link(out / S.MODEL_FILE, tmp_path / "backup.safetensors")
    os.chmod(out / S.MODEL_FILE, 0o444)
    assert reader.read(["b"])[0][0] == 0


def test_an_unreadable_shard_is_an_os_error_naming_it_not_an_invalid_file(tmp_path, monkeypatch):
    """A shard the process may not read was reported as "not a valid safetensors file"."""
    from umtam_jax.checkpoint import _safetensors_header

    out = sharded(tmp_path)
    shard = sorted(out.glob("*.safetensors"))[1]

    def denied(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(shard):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(_safetensors_header, "open", denied, raising=False)
    with pytest.raises(PermissionError, match=f"cannot read .*{shard.name}: Permission denied"):
        SafetensorsReader(out)
