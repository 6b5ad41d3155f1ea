"""Checkpoint data is never silently wrong: checksums catch flipped bytes and edited
metadata or records, keys with separators round-trip exactly, and a failed write (a full
disk, a denied staging folder) or read is one error naming the right path."""

from __future__ import annotations

import asyncio
import errno
import glob
import json
import os
import pathlib
import sys
import time
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from umtam_jax import checkpoint
from umtam_jax.checkpoint import _closed_loop

# ----------------------------------------------------------------------------- integrity


def _data_files(path):
    return sorted(
        (f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)),
        key=os.path.getsize,
    )


@pytest.mark.parametrize("seed", range(6))
def test_flipped_byte_is_detected(tmp_path, seed):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((32, 32)).astype(np.float32)}
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    data = _data_files(path)[-1]  # the array's data file is the largest
    blob = bytearray(pathlib.Path(data).read_bytes())
    blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
    pathlib.Path(data).write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w|corrupt"):
        checkpoint.restore_params(path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w|corrupt"):
        checkpoint.CheckpointReader(path).restore_arrays("params", [("w",)])
    got = checkpoint.restore_params(path, verify=False)  # the explicit opt-out: no check
    assert got["w"].shape == (32, 32)


def test_flipped_statistics_and_opt_state_are_detected(tmp_path):
    import jax

    import umtam_jax

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2)
    state = opt.init(params)
    grads = {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)}
    _, state = opt.update(grads, state, params)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params, opt_state=state)
    for item, restore in [
        ("statistics", lambda: checkpoint.restore_statistics(path)),
        ("opt_state", lambda: checkpoint.restore_opt_state(path, state)),
    ]:
        saved = jax.tree.leaves(restore())
        data = [f for f in _data_files(path) if os.sep + item + os.sep in f][-1]
        original = pathlib.Path(data).read_bytes()
        detected = 0
        for position in range(len(original) // 8, len(original), len(original) // 8):
            blob = bytearray(original)
            blob[position] ^= 0x40
            pathlib.Path(data).write_bytes(blob)
            try:  # either an error naming the corruption, or bytes no array uses
                got = jax.tree.leaves(restore())
            except checkpoint.CheckpointCorruptError as err:
                assert "corrupt" in str(err)
                detected += 1
            else:
                chex.assert_trees_all_equal(got, saved)
        assert detected >= 4
        pathlib.Path(data).write_bytes(original)
        restore()


def test_edited_metadata_dtype_and_missing_checksums(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones((2, 2))})
    meta = path / "umtam_metadata" / "metadata"
    text = meta.read_text()
    for edited in ("float16", "int32"):
        meta.write_text(text.replace('"float32"', f'"{edited}"'))
        # The metadata's own CRC catches the edit first (older records: the dtype check).
        with pytest.raises(checkpoint.CheckpointCorruptError, match="metadata does not match"):
            checkpoint.restore_params(path)
    meta.write_text(text)
    (path / "umtam_checksums.json").unlink()
    with pytest.raises(checkpoint.CheckpointCorruptError, match="checksum record .* missing"):
        checkpoint.restore_params(path)


def _edit_record(path, edit):
    record = path / "umtam_checksums.json"
    data = json.loads(record.read_text())
    edit(data)
    record.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["items"]["params"].clear(),  # an emptied item
        lambda d: d["items"].update(paraos=d["items"].pop("params")),  # a flipped key bit
        lambda d: d["items"]["params"].pop("w"),  # one array's entry
    ],
)
def test_an_array_missing_from_the_checksum_record_is_damage(tmp_path, edit):
    """With the data damaged too, a record that skipped the array would let it through."""
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": np.arange(64.0, dtype=np.float32)})
    data = _data_files(path)[-1]
    blob = bytearray(pathlib.Path(data).read_bytes())
    blob[len(blob) // 2] ^= 0x40
    pathlib.Path(data).write_bytes(blob)
    _edit_record(path, edit)
    for restore in (
        lambda: checkpoint.restore_params(path),
        lambda: checkpoint.CheckpointReader(path).restore_arrays("params", [("w",)]),
    ):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="params/w has no entry"):
            restore()


def test_a_checksum_record_without_the_metadata_crc_is_damage(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", {"w": np.ones(3, np.float32)})
    _edit_record(path, lambda d: d.pop("metadata"))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="no checksum of the metadata"):
        checkpoint.restore_params(path)
    assert checkpoint.restore_params(path, verify=False)["w"].shape == (3,)  # the opt-out


def test_a_version_2_record_may_leave_arrays_out_and_a_null_crc_is_not_verified():
    """Format 2 recorded only arrays the saving process could see (multi-host sharding);
    format 3 records those with a null CRC."""
    from umtam_jax.checkpoint import _integrity

    leaves = {"w": {"dtype": "float32", "shape": [3]}}
    old = _integrity.Records({"params": {}})
    _integrity.check_spec(pathlib.Path("ck"), "params", leaves, old)  # no error
    new = _integrity.Records({"params": {"w": {**leaves["w"], "crc32": None}}})
    new.complete = True
    _integrity.check_spec(pathlib.Path("ck"), "params", leaves, new)
    _integrity.verify(pathlib.Path("ck"), "params", "w", np.zeros(3, np.float32), new)
    new["params"]["w"]["crc32"] = 0
    with pytest.raises(checkpoint.CheckpointCorruptError, match="does not match its checksum"):
        _integrity.verify(pathlib.Path("ck"), "params", "w", np.ones(3, np.float32), new)


@pytest.mark.parametrize(
    "tree",
    [
        {"a.b": 1.0, "a": {"b": 2.0}},
        {"a/b": 1.0, "a": {"b": 2.0}},
        {"%2E": 1.0, ".": 2.0, "%": 3.0, "": 4.0},
        {"x.y": {"z.w": 1.0}, "x": {"y": {"z": {"w": 2.0}}}},
    ],
)
def test_keys_with_separators_round_trip_exactly(tmp_path, tree):
    import jax

    arrays = jax.tree.map(lambda v: np.full((3,), v, np.float32), tree)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", arrays)
    got = checkpoint.restore_params(path)
    chex.assert_trees_all_equal(got, arrays)
    reader = checkpoint.CheckpointReader(path)
    assert jax.tree.structure(reader.abstract("params")) == jax.tree.structure(arrays)


@pytest.mark.parametrize(
    ("old", "new"), [('"step": 5000', '"step": 4000'), ("lr.scale", "lr.scalf")]
)
def test_an_edit_of_the_metadata_that_still_parses_is_detected(tmp_path, old, new):
    """One changed character of the metadata record (a user value, the original name of
    an escaped key) parsed and was restored silently: its CRC is in the checksum record."""
    path = checkpoint.save_checkpoint(
        tmp_path / "ck", {"lr.scale": np.ones(3, np.float32)}, metadata={"step": 5000}
    )
    meta = path / "umtam_metadata" / "metadata"
    text = meta.read_text()
    edited = text.replace(old, new).replace(old.replace(" ", ""), new.replace(" ", ""))
    assert edited != text  # with or without the space JSON may put after the colon
    meta.write_text(edited)
    for read in (checkpoint.read_metadata, checkpoint.restore_params):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="metadata does not match"):
            read(path)


def test_a_partial_restore_of_damaged_data_is_a_corrupt_error_naming_the_leaf(tmp_path):
    """CheckpointReader raised a plain ValueError for a deleted data file, unlike
    restore_params, and named no leaf."""
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"w": np.ones((64, 48), np.float32)})
    reader = checkpoint.CheckpointReader(path)
    for data in glob.glob(f"{path}/params/**/d/*", recursive=True):
        os.unlink(data)
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match="cannot restore w of item 'params'"
    ):
        reader.restore_arrays("params", [("w",)])


# ----------------------------------------------------------------------------- write failures


def test_a_failed_write_names_the_output_and_a_failed_read_keeps_its_own_error(tmp_path):
    """A full disk while writing is one OSError naming the output (not the hidden staging
    folder, not tensorstore's ValueError); an input that cannot be read while the output
    is written keeps its own error, naming the input."""
    like = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
    out = tmp_path / "out"

    def missing_input(i):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/e1/model")

    with pytest.raises(FileNotFoundError, match="/data/e1/model"):
        checkpoint.save_params_streaming(out, like, missing_input)

    def full_disk(i):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "w" at local file "{tmp_path}/.out.umtam-new-'
            "abc/params\": No space left on device [os_error_code='28']"
        )

    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device") as err:
        checkpoint.save_params_streaming(out, like, full_disk)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, ValueError)

    def denied_in_staging(i):
        raise PermissionError(errno.EACCES, "Permission denied", f"{tmp_path}/.out.umtam-new-x/a")

    with pytest.raises(PermissionError, match=f"cannot write {out}: Permission denied"):
        checkpoint.save_params_streaming(out, like, denied_in_staging)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("streaming", [False, True])
def test_a_real_full_disk_is_one_error_naming_the_output_and_no_logged_traceback(
    small_disk, caplog, streaming
):
    """Saving 4 MiB onto a 1 MiB disk: the caller gets one OSError naming the output;
    Orbax's threads log no traceback of it first (through absl); nothing is left."""
    big = {"w": np.random.default_rng(0).standard_normal((1024, 1024), np.float32)}
    out = small_disk / "out"
    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device"):
        if streaming:
            like = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}
            checkpoint.save_params_streaming(out, like, lambda i: big["w"])
        else:
            checkpoint.save_checkpoint(out, big)
    assert not [r for r in caplog.records if r.name == "absl" and r.exc_info]
    assert os.listdir(small_disk) == []


def test_a_save_keeps_other_threads_logged_tracebacks(tmp_path, caplog):
    """Only a failure in this save's staging folder is dropped from the absl log: another
    thread's full disk elsewhere, logged while the save runs, is kept."""
    import logging
    import threading

    from umtam_jax.checkpoint._write_errors import naming_the_target

    def other():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/log/other.db")
        except OSError:
            logging.getLogger("absl").exception("a background job failed")

    with naming_the_target(epath.Path(tmp_path / "out")):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["a background job failed"]


def test_only_this_saves_staging_folder_counts_as_its_write_failure():
    """``/scratch/x/.out.umtam-new-1`` is another save's staging folder, not ``/x/out``'s,
    though its name ends the same way."""
    from umtam_jax.checkpoint._write_errors import _write_failure

    out = epath.Path("/x/out")
    ours = OSError(errno.ENOENT, "gone", "/x/.out.umtam-new-1/f")
    other = OSError(errno.ENOENT, "gone", "/scratch/x/.out.umtam-new-1/f")
    assert _write_failure(ours, out, on_staging=True) == errno.ENOENT
    assert _write_failure(other, out, on_staging=True) is None
    assert _write_failure(other, out) is None
    quoted = ValueError("""writing local file "/x/.out.umtam-new-1/p" [os_error_code='28']""")
    assert _write_failure(quoted, out, on_staging=True) == errno.ENOSPC
    elsewhere = ValueError("""local file "/scratch/x/.out.umtam-new-1/p" [os_error_code='2']""")
    assert _write_failure(elsewhere, out, on_staging=True) is None


def test_a_failed_read_prints_no_closed_event_loop_callbacks(tmp_path, capfd, monkeypatch):
    """Orbax reads an item's arrays concurrently and closes its event loop when one
    fails; tensorstore then reported the others' completions to the closed loop, and
    Python printed "RuntimeError: Event loop is closed" tracebacks after the clean error
    (in about a third of such reads). Other unraisable exceptions still reach the hook."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # both restored after the test
    monkeypatch.setattr(_closed_loop, "_installed", False)
    monkeypatch.setattr(_closed_loop, "_wrapped", None)
    paths = []
    for k in range(12):
        params = {f"w{i}": np.ones((64, 48), np.float32) for i in range(8)}
        paths.append(checkpoint.save_checkpoint(tmp_path / f"ck{k}", params))
        for data in glob.glob(f"{paths[-1]}/params/**/d/*", recursive=True):
            blob = pathlib.Path(data).read_bytes()
            pathlib.Path(data).write_bytes(blob[: len(blob) // 2])
    for path in paths:
        with pytest.raises(checkpoint.CheckpointCorruptError, match="cannot restore"):
            checkpoint.restore_params(path)
        with pytest.raises(checkpoint.CheckpointCorruptError, match="cannot restore"):
            checkpoint.CheckpointReader(path).restore_arrays("params", [("w0",), ("w1",)])
    time.sleep(0.2)  # completions of reads left running
    assert "Event loop is closed" not in capfd.readouterr().err
    assert seen == []
    # The chained hook passes every other unraisable exception on.
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        closed_loop = err
    # As tensorstore's threads call it: the traceback starts in call_soon_threadsafe.
    native = closed_loop.__traceback__.tb_next
    sys.unraisablehook(SimpleNamespace(exc_value=closed_loop, exc_traceback=native))
    other = ValueError("another library's")
    sys.unraisablehook(SimpleNamespace(exc_value=other, exc_traceback=None))
    # Called from Python code (another library's callback): passed on.
    from_python = SimpleNamespace(exc_value=closed_loop, exc_traceback=closed_loop.__traceback__)
    sys.unraisablehook(from_python)
    assert [u.exc_value for u in seen] == [other, closed_loop]
    seen.remove(from_python)
    # A hook installed later that calls its predecessor (this one), then another read:
    # each other exception reaches both hooks once (it looped between them until
    # RecursionError when a read chained this hook again on top).
    wrapped, previous = [], sys.unraisablehook
    sys.unraisablehook = lambda u: (wrapped.append(u), previous(u))
    with pytest.raises(checkpoint.CheckpointCorruptError):
        checkpoint.restore_params(paths[0])
    seen.clear()
    sys.unraisablehook(SimpleNamespace(exc_value=other, exc_traceback=None))
    # (The hook on top also sees the failed read's callbacks before this one drops them.)
    mine = [u.exc_value for u in wrapped if not _closed_loop._is_closed_loop_callback(u)]
    assert mine == [other] and [u.exc_value for u in seen] == [other]
    time.sleep(0.3)  # the last read's callbacks land before the hooks are put back
