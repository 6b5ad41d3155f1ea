"""File-system steps of a save: the writer's lock, flushes to the disk, deletions.

Used by :mod:`umtam_jax.checkpoint._safety`; every function acts on a local disk and
does nothing it cannot do on other ``etils.epath`` back ends (no lock, no flush there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

from etils import epath

from umtam_jax import _files
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
    """Flushes the entries of ``path`` (a local folder) to the disk."""
    if is_local(path):
        _files.fsync_dir(path)


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
    """Holds an exclusive, non-blocking lock on ``directory`` for a save (a hidden
    ``.<name>.umtam-lock`` file beside it, on a local disk)."""
    if not is_local(directory):
        yield
        return
    lock_path = os.fspath(directory.parent / f".{directory.name}.{LOCK}")
    busy = lambda: CheckpointBusyError(  # noqa: E731
        errno.EBUSY,
        f"checkpoint {directory} is being written by another process right now "
        f"(lock file {lock_path}); wait for it to finish",
    )
    with _files.exclusive_lock(lock_path, cannot=f"cannot write checkpoint {directory}", busy=busy):
        yield
