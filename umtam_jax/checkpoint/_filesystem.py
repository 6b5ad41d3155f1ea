"""File-system steps of a save: the writer's lock, flushes to the disk, deletions.

Used by :mod:`umtam_jax.checkpoint._safety`; every function acts on a local disk and
does nothing it cannot do on other ``etils.epath`` back ends (no lock, no flush there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import warnings
from collections.abc import Iterator

from etils import epath

from umtam_jax import _files
from umtam_jax._callers import user_stacklevel
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


def delete_leftover(path: epath.Path, what: str) -> None:
    """Deletes ``path``, a writer's own leftover; where it cannot be deleted (its
    permissions), says so in a warning, ``what`` naming it, rather than leaving it
    behind unnoticed."""
    rmtree(path)
    if is_local(path) and os.path.lexists(path):
        warnings.warn(
            f"{what} could not be deleted: it is left at {path}; delete it yourself "
            "(check its permissions)",
            stacklevel=user_stacklevel(),
        )


def fsync_dir(path: epath.Path) -> None:
    """Flushes the entries of ``path`` (a local folder) to the disk."""
    if is_local(path):
        _files.fsync_dir(path)


def sync_tree(path: epath.Path) -> None:
    """Flushes every file and folder under ``path`` (a local staging folder) to the disk,
    deepest first: what a writer left unflushed (Orbax flushes its data files, not its
    metadata) is on the disk before the folder takes an older output's place, whose copy
    is deleted right after."""
    if not is_local(path):
        return
    for root, _, files in os.walk(os.fspath(path), topdown=False):
        for name in files:
            file = os.path.join(root, name)
            if not stat.S_ISREG(os.lstat(file).st_mode):  # a link: its target is not ours
                continue
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _files.fsync_dir(root)


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


def lock_file(directory: epath.Path) -> epath.Path:
    """The lock file of saves to ``directory``: ``.<name>.umtam-lock`` beside it."""
    return directory.parent / f".{directory.name}.{LOCK}"


@contextlib.contextmanager
def locked(directory: epath.Path) -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on ``directory`` for a save (a hidden
    ``.<name>.umtam-lock`` file beside it, on a local disk)."""
    if not is_local(directory):
        yield
        return
    lock_path = os.fspath(lock_file(directory))
    busy = lambda: CheckpointBusyError(  # noqa: E731
        errno.EBUSY,
        f"checkpoint {directory} is being written by another process right now "
        f"(lock file {lock_path}); wait for it to finish",
    )
    with _files.exclusive_lock(lock_path, cannot=f"cannot write checkpoint {directory}", busy=busy):
        yield
