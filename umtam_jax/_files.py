"""Local file-system steps shared by the checkpoint writer and the experiment records:
flushing a folder's entries to the disk, and an exclusive lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flushes ``folder``'s entries (a rename, a new file) to the disk; does nothing where
    the operating system cannot open a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: str, *, cannot: str, busy: Callable[[], OSError]) -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on the file ``lock_path`` (made if missing,
    removed on release; never opened through a symbolic link).

    Args:
      lock_path: the lock file.
      cannot: the start of the error raised when the lock file cannot be opened, e.g.
        ``"cannot write checkpoint /x"``.
      busy: makes the error raised when another process holds the lock.

    Returns:
      A context manager holding the lock.

    Raises:
      OSError: the lock file cannot be opened (a symbolic link at its name is named so), or
        ``busy()``'s error.

    Example:
      >>> import os, tempfile
      >>> from umtam_jax._files import exclusive_lock
      >>> lock = os.path.join(tempfile.mkdtemp(), ".work.lock")
      >>> with exclusive_lock(lock, cannot="cannot use work", busy=lambda: OSError("busy")):
      ...     os.path.exists(lock)
      True
    """
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OSError(
                    err.errno,
                    f"{cannot}: its lock file {lock_path} is a symbolic link (delete it if "
                    "no other process is using it)",
                ) from None
            raise OSError(err.errno, f"{cannot}: {err.strerror}", lock_path) from None
        try:  # the file is closed on any exception (Ctrl-C too): it holds the lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy() from None
            if _names_file(lock_path, fd):  # else the holder before us removed it meanwhile
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:  # only our file: one removed under us (by hand) may since be another holder's
            if _names_file(lock_path, fd):
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
        finally:
            os.close(fd)


def _names_file(path: str, fd: int) -> bool:
    """Whether ``path`` is the file open as ``fd``."""
    try:
        at_path, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)
