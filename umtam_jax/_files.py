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


#: What a lock file made by :func:`exclusive_lock` holds: the mark of a file it may remove.
LOCK_MARK = b"umtam_jax lock file\n"


@contextlib.contextmanager
def exclusive_lock(lock_path: str, *, cannot: str, busy: Callable[[], OSError]) -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on the file ``lock_path`` (never opened
    through a symbolic link). A missing file is made holding :data:`LOCK_MARK`, and one
    holding it is removed on release; any other file at that name (a user's) serves as the
    lock unchanged and is kept.

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
            fd = _open_lock_file(lock_path)
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
            if _names_file(lock_path, fd) and _holds_mark(fd):
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
        finally:
            os.close(fd)


def _open_lock_file(path: str) -> int:
    """Opens the lock file at ``path`` for reading and writing, made holding
    :data:`LOCK_MARK` when missing (an existing file is opened as it is)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # removed since: made next time
                return os.open(path, flags)
            continue
        with contextlib.suppress(OSError):  # unmarked (a full disk): kept on release
            os.write(fd, LOCK_MARK)
        return fd


def _holds_mark(fd: int) -> bool:
    """Whether the file open as ``fd`` holds :data:`LOCK_MARK` alone."""
    try:
        return os.pread(fd, len(LOCK_MARK) + 1, 0) == LOCK_MARK
    except OSError:  # not a regular file (a FIFO): not one this made
        return False


def _names_file(path: str, fd: int) -> bool:
    """Whether ``path`` is the file open as ``fd``."""
    try:
        at_path, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)
