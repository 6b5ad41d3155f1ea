"""Atomic on-disk records of the evaluation protocol: JSON and ``.npz`` files.

Every file is written to a hidden temporary sibling and moved into place with
:func:`os.replace`, so a reader sees either the old file or the complete new one, never a
half-written one; a temporary file left behind by an interrupted write is never read
(readers only open the final names). :func:`jsonable` turns NumPy and JAX values into
plain JSON values; a JSON object carries a checksum (:mod:`~umtam_jax.experiments._sealed`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax import _files, _json
from umtam_jax.experiments import _sealed

__all__ = ["jsonable", "read_json", "read_npz", "read_npz_record", "write_json", "write_npz"]


def jsonable(value: Any) -> Any:
    """``value`` with NumPy/JAX scalars and arrays as Python numbers and lists.

    Non-finite floats become None (strict JSON has no NaN); other unknown leaves
    become their ``str``.

    Example:
        >>> import numpy as np
        >>> from umtam_jax.experiments.store import jsonable
        >>> jsonable({"a": np.float32(0.5), "b": np.arange(2), "c": (1, float("nan"))})
        {'a': 0.5, 'b': [0, 1], 'c': [1, None]}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return jsonable(np.asarray(value).tolist())
    return str(value)


def write_atomic(path: str | os.PathLike[str], write: Any) -> Path:
    """Writes a file atomically: ``write(f)`` fills a temporary sibling, then it replaces
    ``path`` (``os.replace``), so ``path`` holds the old content or the new, never a part.
    The data and then the folder are flushed to the disk; a replaced file keeps its
    permissions. A system error of the write is an ``OSError`` naming ``path``; a symbolic
    link at ``path`` is refused (``FileExistsError``), never replaced by a regular file.

    The temporary file, ``.NAME.umtam-XXXXXXXX.tmp`` (8 random characters of
    :func:`tempfile.mkstemp`), is locked by its writer (``fcntl.flock``) from its creation
    to the replace. Before writing, the temporary files of ``path`` that nobody locks are
    deleted: a killed writer's lock died with it, whatever host, container or PID
    namespace it ran in, so these are leftovers of killed writes, never a write in
    progress. A leftover that cannot be deleted (another user's in a shared folder) is
    kept and does not fail the write. Where the file system refuses locks, the temporary
    file is named ``.NAME.umtam-uXXXXXXXX.tmp``, which no cleanup deletes. (The marker
    keeps a user's own ``.NAME.backup01.tmp`` out of the cleanup's pattern.)

    Args:
        path: the file to write; its folder is created if missing.
        write: called with the temporary file, opened for binary writing.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import write_atomic
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> write_atomic(p, lambda f: f.write(b"hello")).read_text()
        'hello'
    """
    path = Path(path)
    if path.is_symlink():  # os.replace would put a regular file in the link's place
        raise FileExistsError(
            f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}), "
            "which this write would replace with a regular file; write to the link's "
            "target, or remove the link",
        )
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _delete_killed_writes(path)
        fd, tmp = _locked_temporary(path)
        made = tmp
        try:
            with os.fdopen(fd, "wb") as f:  # closed, so unlocked, after the replace
                try:
                    mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps it
                except FileNotFoundError:
                    umask = os.umask(0)
                    os.umask(umask)
                    mode = 0o666 & ~umask  # as a plain open() would (mkstemp makes 0600)
                os.fchmod(fd, mode)
                write(f)
                f.flush()
                os.fsync(fd)
                os.replace(tmp, path)
                tmp = None
        finally:
            _WRITING.discard(made)
        _files.fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and (
            err.filename in (None, tmp, os.fspath(path.parent))
            or _is_temporary_of(path, err.filename)
        ):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
        raise
    return path


# The temporary files this process is writing: its other threads' cleanups skip them (on
# NFS a flock is a POSIX lock, which does not keep out the process that holds it).
_WRITING: set[str] = set()
# Held while a thread makes and locks a temporary file, or checks and deletes one.
_IN_PROCESS = threading.Lock()
# In the temporary files' names, between the file's name and the random characters.
_MARKER = "umtam-"


def _reset_after_fork() -> None:
    """A forked child starts with this lock free (its holder thread was not copied)."""
    global _IN_PROCESS
    _IN_PROCESS = threading.Lock()
    _WRITING.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _is_temporary_of(path: Path, name: Any) -> bool:
    """Whether ``name`` (an error's file name) is a temporary sibling of ``path``."""
    return (
        isinstance(name, str)
        and os.path.dirname(name) == os.fspath(path.parent)
        and os.path.basename(name).startswith(f".{path.name}.")
        and name.endswith(".tmp")
    )


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary sibling of ``path``: its descriptor, locked, and its name.

    A cleanup may delete the file between its creation and the lock (nobody held it yet):
    then another one is made. Where the file system refuses the lock, the file is made
    again under a name no cleanup matches (``.NAME.umtam-uXXXXXXXX.tmp``), unlocked. The
    lock is never waited for (a cleanup holding it for an instant makes this try another
    file), so no thread waits on another process while it holds this process's lock.
    """
    prefix, folder = f".{path.name}.{_MARKER}", path.parent
    while True:
        with _IN_PROCESS:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a cleanup holds it: it deletes it, make another
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                fd, tmp = tempfile.mkstemp(prefix=f"{prefix}u", suffix=".tmp", dir=folder)
                return fd, tmp
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if os.fstat(fd).st_nlink > 0:
                tmp = os.path.abspath(tmp)
                _WRITING.add(tmp)
                return fd, tmp
        os.close(fd)  # a cleanup deleted it before we locked it: make another


def _delete_killed_writes(path: Path) -> None:
    """Deletes the temporary files of :func:`write_atomic` calls for ``path``
    (``.NAME.umtam-XXXXXXXX.tmp``) that no writer locks, their writers having been killed. Each
    is deleted while this process holds its lock, and only if its name still refers to the
    locked file (not to one a write since moved into place, nor to a new write's). One
    another process locks, or that cannot be opened, locked or deleted, is kept: the
    cleanup never fails the write."""
    pattern = re.compile(re.escape(f".{path.name}.{_MARKER}") + r"[a-z0-9_]{8}\.tmp", re.DOTALL)
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            name = os.path.abspath(entry.path)
            if pattern.fullmatch(entry.name) and name not in _WRITING:
                with contextlib.suppress(OSError), _IN_PROCESS:
                    if name not in _WRITING:
                        _delete_unlocked(name)


def _delete_unlocked(name: str) -> None:
    """Deletes the regular file ``name`` if no process locks it (``flock``)."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never a link's target; no wait
    fd = os.open(name, os.O_RDONLY | flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno != errno.EBADF:
                return  # its writer holds the lock (EWOULDBLOCK), or there are no locks
            # NFS takes an exclusive flock only on a file open for writing.
            os.close(fd)
            fd = -1
            fd = os.open(name, os.O_RDWR | flags)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _files._names_file(name, fd):  # else moved into place, or a new write's
            os.unlink(name)
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Holds an exclusive lock on ``folder`` (its ``.umtam-lock`` file) for ``what``, so a
    second process working in the same folder fails at once instead of overwriting the
    first one's records with its own.

    Raises:
        BlockingIOError: another process holds the lock.
    """
    busy = lambda: BlockingIOError(  # noqa: E731
        errno.EWOULDBLOCK,
        f"{folder} is in use by another process ({what}): wait for it to finish or use "
        "another folder",
    )
    lock = os.path.join(folder, ".umtam-lock")
    with _files.exclusive_lock(lock, cannot=f"cannot lock {folder} for {what}", busy=busy):
        yield


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes ``jsonable(obj)`` to ``path`` atomically (temporary file + ``os.replace``),
    an object with a ``"checksum"`` entry (SHA-256) that the readers verify and remove.

    Raises:
        ValueError: ``obj`` is a mapping with a ``"checksum"`` key (reserved).

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import read_json, write_json
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> _ = write_json(p, {"x": 1}); read_json(p)
        {'x': 1}
    """
    data = json.dumps(_sealed.seal(jsonable(obj)), indent=1, sort_keys=True).encode()
    return write_atomic(Path(path), lambda f: f.write(data))


def read_json(path: str | Path) -> Any:
    """The JSON at ``path``; None when it is missing, unreadable or fails its checksum.

    Args:
        path: The file.

    Returns:
        The value, its ``"checksum"`` removed; or None (a damaged cache entry is recomputed).

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import read_json
        >>> read_json(pathlib.Path(tempfile.mkdtemp()) / "missing.json") is None
        True
    """
    try:
        return _sealed.unseal(_json.loads(Path(path).read_text()))
    except (FileNotFoundError, ValueError):  # undecodable, bad UTF-8, too deep, checksum
        return None


def read_record(path: str | Path) -> Any:
    """The JSON record at ``path`` (a run's results), None when missing; unlike a cache
    entry (:func:`read_json`) a damaged record is an error, never taken for no record.

    Args:
        path: The file.

    Returns:
        The value, its ``"checksum"`` removed; or None when the file does not exist.

    Raises:
        ValueError: the file exists but is not JSON or fails its checksum (name, reason).

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import read_record
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "results.json"
        >>> read_record(p) is None
        True
        >>> _ = p.write_text('{"seeds": [0, 1'); read_record(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../results.json is damaged (...): ...
    """
    try:
        return _sealed.unseal(_json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None
    except ValueError as err:  # undecodable, bad UTF-8, too deep, or checksum
        raise ValueError(f"{path} is damaged ({err}): {_KEPT}") from None


def write_npz(path: str | Path, arrays: Mapping[str, Any]) -> Path:
    """Writes named arrays to ``path`` (an ``.npz``) atomically.

    Args:
        path: The file written (replaced only once complete).
        arrays: Name -> array-like.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import read_npz, write_npz
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
        >>> _ = write_npz(p, {"x": [1, 2]}); read_npz(p)["x"].tolist()
        [1, 2]
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return write_atomic(Path(path), lambda f: np.savez(f, **arrays))


# NumPy's and zipfile's errors on a damaged .npz (even "encrypted" or "unknown method")
_NPZ_DAMAGE = (OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError,
               zipfile.BadZipFile, zlib.error)  # fmt: skip
# How the error on a damaged record (JSON or .npz) ends: what it is, what to do.
_KEPT = ("it is a record of earlier runs, never rebuilt silently; restore it, or start in "
         "another work directory")  # fmt: skip


def read_npz(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of the ``.npz`` cache entry at ``path``, or None when missing or
    unreadable (it is computed again; a run's records use :func:`read_npz_record`).

    Args:
        path: The file.

    Returns:
        Name -> array, read fully (the file is closed), or None.

    Example:
        >>> import tempfile, pathlib
        >>> from umtam_jax.experiments.store import read_npz
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
        >>> _ = p.write_bytes(b"not a zip"); read_npz(p) is None
        True
    """
    try:
        return read_npz_record(path)
    except ValueError:  # damaged: computed again
        return None


def read_npz_record(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of the ``.npz`` record at ``path`` (a run's labels or predictions), None
    when missing; unlike a cache entry (:func:`read_npz`) a damaged one is an error.

    Raises:
        ValueError: the file exists but cannot be read whole (its name and the reason).
    """
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except _NPZ_DAMAGE as err:
        raise ValueError(
            f"{path} is damaged or unreadable ({type(err).__name__}: {err}): {_KEPT}"
        ) from None
