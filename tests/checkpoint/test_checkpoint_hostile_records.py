"""The JSON records of a checkpoint folder (metadata, checksum record, contents record) are
read safely and checked: a FIFO or a device in their place is refused unopened, a huge
file is refused without reading it whole, and an edited record (with its CRC recomputed,
as anyone can) is a :class:`CheckpointCorruptError` naming the file and the entry, never
a bare error from deep inside the decode or silently unverified arrays."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from typing import NamedTuple

import jax
import numpy as np
import pytest
from etils import epath

from umtam_jax import checkpoint
from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _targets

META = os.path.join("umtam_metadata", "metadata")
SUMS = _integrity.CHECKSUMS_FILE

# ----------------------------------------------------------------------------- helpers


def _save(tmp_path, name="ck"):
    params = {"a": {"w": np.arange(3, dtype=np.float32)}, "b": np.ones(2, np.float32)}
    return checkpoint.save_checkpoint(tmp_path / name, params)


def _edit(path, meta_edit=None, sums_edit=None):
    """Edits the metadata and checksum records, the metadata's CRC recomputed to match."""
    meta = json.loads((path / META).read_text())
    sums = json.loads((path / SUMS).read_text())
    if meta_edit:
        meta_edit(meta)
    if sums_edit:
        sums_edit(sums)
    sums["metadata"] = _integrity.metadata_crc32(meta)
    (path / META).write_text(json.dumps(meta))
    (path / SUMS).write_text(json.dumps(sums))


@contextlib.contextmanager
def _watched_fifo(path):
    """Puts a FIFO at ``path`` and yields a list with an entry for each time something
    opened it for reading. Such an open is released at once (a writer opens and closes
    the FIFO, so the reader sees an end of file): a regression fails, never hangs."""
    os.remove(path)
    os.mkfifo(path)
    opened: list[bool] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader
            except OSError:
                stop.wait(0.005)
                continue
            opened.append(True)
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield opened
    finally:
        stop.set()
        watcher.join()


# ----------------------------------------------------------------------------- special files


def test_a_fifo_as_the_checksum_record_is_refused_unopened(tmp_path):
    path = _save(tmp_path)
    with _watched_fifo(path / SUMS) as opened:
        for read in (checkpoint.restore_params, checkpoint.CheckpointReader):
            with pytest.raises(checkpoint.CheckpointCorruptError) as err:
                read(path)
            assert f"checksum record {path / SUMS} is a FIFO, not a regular file" in str(err.value)
        # Unverified restores do not need the record, and never open it either.
        assert checkpoint.restore_params(path, verify=False)["b"].shape == (2,)
        assert checkpoint.read_metadata(path)["format_version"] == 3
    assert opened == []


def test_a_fifo_as_the_metadata_is_refused_unopened(tmp_path):
    path = _save(tmp_path)
    with _watched_fifo(path / META) as opened:
        for read in (checkpoint.restore_params, checkpoint.read_metadata):
            with pytest.raises(checkpoint.CheckpointCorruptError) as err:
                read(path)
            assert f"damaged metadata: {path / META} is a FIFO, not a regular file" in str(
                err.value
            )
        assert not _targets.is_checkpoint(path)  # a probe: no error
        with pytest.raises(ValueError, match="not a umtam_jax output"):
            checkpoint.save_checkpoint(path, {"w": np.ones(2)}, overwrite=True)
    assert opened == []


def test_a_fifo_as_the_contents_record_is_no_record(tmp_path):
    path = _save(tmp_path)
    with (
        _watched_fifo(path / _targets._CONTENTS_FILE) as opened,
        pytest.raises(ValueError, match="no readable record"),
    ):
        checkpoint.save_checkpoint(path, {"w": np.ones(2)}, overwrite=True)
    assert opened == []


def test_a_fifo_put_in_place_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """The file opened is checked again: opened without blocking, a FIFO swapped in
    after the first check is refused, not waited on."""
    record = tmp_path / "record.json"
    record.write_text("{}")
    monkeypatch.setattr(_targets, "check_regular_file", lambda path, limit: None)
    with (
        _watched_fifo(record),
        pytest.raises(_targets.UnsafeFileError, match="is a FIFO, not a regular file"),
    ):
        _targets.read_record(record, 1024)


_DEV_ZERO_SCRIPT = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))  # before anything is read
resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 2**20, 100 * 2**20))
import json, os, sys, time
import numpy as np
from umtam_jax import checkpoint
from umtam_jax.checkpoint import _targets

report = {}
for name, rel in (("sums", "umtam_checksums.json"), ("meta", "umtam_metadata/metadata")):
    path = checkpoint.save_checkpoint(f"{sys.argv[1]}/{name}", {"w": np.ones(3, np.float32)})
    os.remove(path / rel)
    os.symlink("/dev/zero", path / rel)
    for fn in ("restore_params", "CheckpointReader", "read_metadata"):
        start = time.monotonic()
        try:
            getattr(checkpoint, fn)(path)
            got = ["", ""]
        except BaseException as err:
            got = [type(err).__name__, str(err)]
        report[f"{name} {fn}"] = got + [time.monotonic() - start]
    report[f"{name} is_checkpoint"] = _targets.is_checkpoint(path)
print(json.dumps(report))
"""


def test_a_link_to_dev_zero_is_refused_unread(tmp_path):
    """Read to its end, /dev/zero took all the memory (MemoryError). Run in a process of
    its own with its memory and file sizes bounded, so a regression cannot harm the
    machine."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DEV_ZERO_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for fn in ("restore_params", "CheckpointReader"):
        kind, message, seconds = report[f"sums {fn}"]
        assert kind == "CheckpointCorruptError", report
        assert "umtam_checksums.json is a character device, not a regular file" in message
        assert seconds < 30, report
    assert report["sums read_metadata"][0] == "", report  # its CRC is left to a restore
    for fn in ("restore_params", "CheckpointReader", "read_metadata"):
        kind, message, seconds = report[f"meta {fn}"]
        assert kind == "CheckpointCorruptError", report
        assert (
            "damaged metadata: " in message
            and "umtam_metadata/metadata is a character device" in message
        )
        assert seconds < 30, report
    assert report["sums is_checkpoint"] is True and report["meta is_checkpoint"] is False


def test_records_larger_than_their_bound_are_refused(tmp_path, monkeypatch):
    path = _save(tmp_path)
    monkeypatch.setattr(_integrity, "MAX_RECORD_BYTES", 64)
    size = os.path.getsize(path / SUMS)
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match=f"holds {size} bytes, more than the 64 it may"
    ):
        checkpoint.restore_params(path)
    monkeypatch.setattr(_targets, "MAX_METADATA_BYTES", 64)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="damaged metadata: .* more than"):
        checkpoint.read_metadata(path)
    assert not _targets.is_checkpoint(path)
    small = epath.Path(tmp_path / "small.json")
    small.write_text("abc")
    with pytest.raises(_targets.UnsafeFileError, match="holds 3 bytes, more than the 2"):
        _targets.read_record(small, 2)


# ----------------------------------------------------------------------------- edited records


def test_a_namedtuple_with_other_fields_fails_only_that_item_naming_it(tmp_path):
    """A class whose fields changed since the save (an optax upgrade) or edited metadata:
    one error naming the node when that item is rebuilt; the other items still read."""
    path = _save(tmp_path)
    cls = "umtam_jax.optimizer._state:FactoredStatistics"
    _edit(path, lambda m: m["structures"]["params"].update(t="namedtuple", cls=cls))
    with pytest.raises(ValueError) as err:
        checkpoint.restore_params(path)
    message = str(err.value)
    assert f"cannot rebuild the namedtuple at the root as {cls}" in message
    assert "the checkpoint records the fields (a, b), the class has (u, sigma" in message
    assert checkpoint.read_metadata(path)["format"] == "umtam_jax.checkpoint"


class _Pair(NamedTuple):
    first: int
    second: int = 0


class _NotNamed(tuple):
    pass


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["first", "second"], None),
        (["first"], None),  # a field with a default may be left out
        (["second"], "records the fields (second)"),
        (["first", "third"], "records the fields (first, third)"),
        (["first", "first"], "records the fields (first, first)"),
    ],
)
def test_decode_checks_the_fields_of_a_namedtuple_it_rebuilds(monkeypatch, names, error):
    monkeypatch.setitem(E._KNOWN_NAMEDTUPLES, "t:Pair", _Pair)
    leaf = {"t": "array", "shape": [2], "dtype": "float32"}
    spec = {"t": "namedtuple", "cls": "t:Pair", "children": [[n, "s", leaf] for n in names]}
    arrays = {n: np.zeros(2) for n in names}
    E.check_spec(spec)  # the structure itself is well formed
    if error is None:
        assert isinstance(E.decode(spec, arrays), _Pair)
    else:
        with pytest.raises(
            ValueError, match=re.escape(f"at the root as t:Pair: the checkpoint {error}")
        ):
            E.decode(spec, arrays)
    monkeypatch.setitem(E._KNOWN_NAMEDTUPLES, "t:Pair", _NotNamed)
    with pytest.raises(ValueError, match="names t:Pair, which is not a NamedTuple"):
        E.decode(spec, arrays)
    assert isinstance(E.decode({**spec, "cls": "elsewhere:Pair"}, arrays), dict)  # not rebuilt


def test_a_key_of_an_unknown_implementation_is_named_on_a_partial_read(tmp_path):
    """The engine reads through CheckpointReader, whose decode failed inside JAX
    ("unrecognized PRNG implementation", naming no checkpoint)."""
    params = {"a": {"w": np.arange(3, dtype=np.float32)}, "rng": jax.random.key(1)}
    path = checkpoint.save_checkpoint(tmp_path / "ck", params)
    _edit(path, lambda m: m["structures"]["params"]["children"][1][2].update(impl="nope"))
    reader = checkpoint.CheckpointReader(path)
    expected = f"checkpoint {path}'s params leaf rng is a PRNG key of implementation 'nope'"
    for read in (
        lambda: reader.abstract("params"),
        lambda: reader.restore_subtrees("params", [("rng",)]),
    ):
        with pytest.raises(ValueError) as err:
            read()
        assert expected in str(err.value) and "cannot rebuild" in str(err.value)
        assert not isinstance(err.value, checkpoint.CheckpointCorruptError)  # as restore_params
    # Other subtrees, and the key's raw data, still read.
    [a] = reader.restore_subtrees("params", [("a",)])
    np.testing.assert_array_equal(a["w"], np.arange(3, dtype=np.float32))
    [data] = reader.restore_arrays("params", [("rng",)])
    np.testing.assert_array_equal(data, jax.random.key_data(params["rng"]))


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"crc32": None, "shards": {}}, "malformed shard records of params/b"),
        ({"crc32": True}, "params/b has no valid CRC"),
        ({"shape": [True]}, "malformed record of params/b"),
        ({"crc32": None, "shards": [{"index": [[0, True]], "crc32": 1}]}, "malformed shard"),
    ],
)
def test_a_damaged_checksum_entry_is_damage_not_an_unverified_array(tmp_path, entry, error):
    path = _save(tmp_path)
    _edit(path, sums_edit=lambda s: s["items"]["params"]["b"].update(entry))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"{SUMS} .*{error}"):
        checkpoint.restore_params(path)


def test_a_null_crc_with_shard_checksums_is_verified_by_its_shards(tmp_path):
    path = _save(tmp_path)
    crc = _integrity.crc32(np.ones(2, np.float32))
    shard = lambda c: {"crc32": None, "shards": [{"index": [[0, 2]], "crc32": c}]}  # noqa: E731
    _edit(path, sums_edit=lambda s: s["items"]["params"]["b"].update(shard(crc)))
    np.testing.assert_array_equal(checkpoint.restore_params(path)["b"], np.ones(2))
    _edit(path, sums_edit=lambda s: s["items"]["params"]["b"].update(shard(crc ^ 1)))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/b does not match"):
        checkpoint.restore_params(path)


@pytest.mark.parametrize("version", [True, False, -1, 0, 1.0, "3", None])
def test_a_format_version_that_is_no_whole_number_from_1_is_damage(tmp_path, version):
    path = _save(tmp_path)
    _edit(path, lambda m: m.update(format_version=version))
    for read in (checkpoint.restore_params, checkpoint.read_metadata):
        with pytest.raises(
            checkpoint.CheckpointCorruptError,
            match=f"damaged metadata .*: format_version {version!r} ",
        ):
            read(path)
    _edit(path, lambda m: m.pop("format_version"))  # every version wrote one
    with pytest.raises(checkpoint.CheckpointCorruptError, match="format_version None"):
        checkpoint.read_metadata(path)


def test_a_null_crc_without_shard_records_restores_unverified(tmp_path):
    """What multi-process saves wrote for an array no process saw whole before shard
    checksums existed (format version 3 too): such checkpoints still restore."""
    path = _save(tmp_path)
    _edit(path, sums_edit=lambda s: s["items"]["params"]["b"].update({"crc32": None}))
    np.testing.assert_array_equal(checkpoint.restore_params(path)["b"], np.ones(2))


def test_damage_is_reported_under_the_key_the_user_wrote(tmp_path):
    """Stored names escape ``.``, ``/`` and ``%``; messages undo the escapes."""
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"a.b/c%": np.ones(2, np.float32)})
    stored = "a%2Eb%2Fc%25"
    _edit(path, sums_edit=lambda s: s["items"]["params"][stored].update({"shape": [True]}))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="record of params/a.b/c%"):
        checkpoint.restore_params(path)
    crc = _integrity.crc32(np.ones(2, np.float32)) ^ 1
    _edit(path, sums_edit=lambda s: s["items"]["params"][stored].update(shape=[2], crc32=crc))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="array params/a.b/c% does not"):
        checkpoint.restore_params(path)
    _edit(path, sums_edit=lambda s: s["items"]["params"][stored].update(shape=[3]))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="gives params/a.b/c% dtype"):
        checkpoint.restore_params(path)
