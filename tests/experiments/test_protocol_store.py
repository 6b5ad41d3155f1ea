"""The protocol's store: atomic writes that keep the old file, clean up temporaries of
killed writers, survive cleaners, keep permissions and name the file they failed on."""

from __future__ import annotations

import errno
import json
import os
import re
import stat

import numpy as np
import pytest

from umtam_jax.experiments import store


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    store.write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert store.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    (tmp_path / ".x.npz.1.tmp").write_bytes(b"PK\x03")  # partial npz: never read
    assert store.read_npz(tmp_path / "x.npz") is None
    store.write_npz(tmp_path / "x.npz", {"a": np.arange(3)})
    np.testing.assert_array_equal(store.read_npz(tmp_path / "x.npz")["a"], np.arange(3))


def test_an_interrupted_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    store.write_atomic(path, lambda f: f.write(b"old"))

    def interrupted(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write_atomic(path, interrupted)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
    store.write_atomic(tmp_path / "new" / "f.txt", lambda f: f.write(b"x"))  # makes the folder
    assert (tmp_path / "new" / "f.txt").read_bytes() == b"x"


def test_a_killed_atomic_writes_temporary_is_deleted_by_the_next_write(tmp_path, monkeypatch):
    """A process killed while writing left its temporary sibling for ever; the next write
    of the path deletes it when nobody holds its lock (the writer's lock died with it, in
    whatever PID namespace or container it ran), and keeps a live writer's (locked), one
    it cannot delete, another file's and any other name."""
    import fcntl
    import subprocess
    import sys

    path = tmp_path / "table.md"
    unlocked = tmp_path / ".table.md.umtam-abcd_123.tmp"  # never locked
    killed = tmp_path / ".table.md.umtam-k1lled_9.tmp"  # its writer locked it and exited
    live = tmp_path / ".table.md.umtam-live_123.tmp"  # a running writer holds its lock
    stuck = tmp_path / ".table.md.umtam-stuck_12.tmp"  # cannot be deleted (EPERM)
    kept = [
        live,
        stuck,
        tmp_path / ".table.md.umtam-ABCD_123.tmp",  # not mkstemp's characters
        tmp_path / ".table.md.umtam-abc_123.tmp",  # 7 characters
        tmp_path / ".table.md.backup01.tmp",  # a user's own: no marker
        tmp_path / ".other.md.umtam-abcd_123.tmp",  # another file's
        tmp_path / ".table.md.umtam-abcd_123.tmp.keep",  # not the pattern
    ]
    for p in [unlocked, killed, *kept]:
        p.write_bytes(b"partial")
    lock_and_exit = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'rb+'), fcntl.LOCK_EX)"
    subprocess.run([sys.executable, "-c", lock_and_exit, os.fspath(killed)], check=True)
    # flock locks belong to an open file description: a second open conflicts with this
    # one as another process's would.
    held = os.open(live, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    real_unlink = os.unlink

    def unlink(p, *args, **kwargs):
        if os.fspath(p).endswith(stuck.name):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(p))
        return real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    try:
        store.write_atomic(path, lambda f: f.write(b"new"))
    finally:
        os.close(held)
    monkeypatch.undo()
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["table.md", *(p.name for p in kept)]
    )
    store.write_atomic(path, lambda f: f.write(b"newer"))  # its writer is gone now
    assert not live.exists() and path.read_bytes() == b"newer"


def test_an_atomic_write_survives_a_cleaner_and_writes_a_long_name(tmp_path, monkeypatch):
    """A cleaner deleting the new temporary file before the writer locked it makes the
    writer start again with a new one; a 235-character name (the temporary file's adds 20)
    is written."""
    import tempfile

    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        if len(made) == 1:
            os.unlink(name)  # as another write's cleanup would, before our lock
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    store.write_atomic(tmp_path / "r.json", lambda f: f.write(b"{}"))
    monkeypatch.undo()
    assert len(made) == 2 and (tmp_path / "r.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    long = tmp_path / ("n" * 231 + ".txt")
    store.write_atomic(long, lambda f: f.write(b"x"))
    store.write_atomic(long, lambda f: f.write(b"y"))
    assert long.read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", long.name])
    assert not store._WRITING  # forgotten once written

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    store.write_atomic(tmp_path / "r.json", lambda f: f.write(b"[]"))
    monkeypatch.undo()
    assert re.fullmatch(r".*/\.r\.json\.umtam-u[a-z0-9_]{8}\.tmp", made[-1])  # no cleanup's
    assert (tmp_path / "r.json").read_bytes() == b"[]" and len(list(tmp_path.iterdir())) == 2


def test_an_atomic_write_keeps_permissions_flushes_the_folder_and_names_its_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "private.json"
    store.write_atomic(path, lambda f: f.write(b"old"))
    os.chmod(path, 0o600)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd),
    )
    store.write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert synced == [False, True]  # the data, then the folder's entry
    monkeypatch.undo()

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {re.escape(str(path))}: No space left"):
        store.write_atomic(path, full)
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]
