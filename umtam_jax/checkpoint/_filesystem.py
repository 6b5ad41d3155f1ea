"""File-system steps of a save: the writer's lock, flushes to the disk, deletions.

Used by :mod:`umtam_jax.checkpoint._safety`; every function acts on a local disk and
does nothing it cannot do on other ``etils.epath`` back ends (no lock, no flush there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator

from etils import epath

from umtam_jax.checkpoint._targets import is_local
from umtam_jax.checkpoint._write_errors import CheckpointBusyError

#: The lock file's suffix: ``.<name>.umtam-lock`` beside the output.
LOCK = "umtam-lock"


def rmtree(path: epath.Path) -> None:
    """Deletes ``path`` (a folder, file or link; a link, never what it points to)."""
    with contextlib.suppress(OSError):
        if not is_local(path):
            if path.exists():
                path.rmtree()
        elif os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)


def fsync_dir(path: epath.Path) -> None:
    if not is_local(path):
        return
    with contextlib.suppress(OSError):
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_synced(path: epath.Path, text: str) -> None:
    """Writes ``text`` to ``path`` (a file of an unpublished staging folder) and, on a
    local disk, flushes it to the disk."""
    path.write_text(text)
    if is_local(path):
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked(directory: epath.Path) -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on ``directory`` for a save."""
    if not is_local(directory):
        yield
        return
    lock_path = os.fspath(directory.parent / f".{directory.name}.{LOCK}")
    while True:
        try:
            # never through a link planted at the lock's name
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OSError(
                    err.errno,
                    f"cannot write checkpoint {directory}: its lock file {lock_path} is a "
                    "symbolic link (delete it if no save to this path is running)",
                ) from None
            raise OSError(
                err.errno, f"cannot write checkpoint {directory}: {err.strerror}", lock_path
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointBusyError(
                errno.EBUSY,
                f"checkpoint {directory} is being written by another process right now "
                f"(lock file {lock_path}); wait for it to finish",
            ) from None
        try:  # the holder before us may have removed the file after we opened it
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
