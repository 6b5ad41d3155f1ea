"""Writing a checkpoint directory without ever losing what is already on disk.

Every save goes through :func:`publishing`, which

1. refuses a target it may not write (:func:`._targets.check_target`): a symbolic link,
   a path under a regular file, an existing file or folder that is not a umtam_jax
   checkpoint (even with ``overwrite``), an existing checkpoint without ``overwrite``.
   Writers of other formats pass their own :class:`._targets.OutputKind` (e.g. the
   safetensors writer's marker file), so only their own earlier output is ever replaced;
2. takes an exclusive lock on the target (a hidden ``.<name>.umtam-lock`` file beside it,
   removed when the save ends), so a second writer to the same path fails at once with
   :class:`CheckpointBusyError` instead of mixing its arrays with the first one's;
3. under the lock, repairs what an interrupted earlier save left behind
   (:mod:`._leftovers`: the hidden names, and when an old output is put back);
4. hands the caller a fresh hidden staging folder ``.<name>.umtam-new-<token>`` to write
   the complete checkpoint into;
5. publishes it: a new target is a single ``rename``; an existing checkpoint is swapped
   with the staging folder in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, so at
   every instant either the old or the new checkpoint is at the final path. Where the
   exchange is unavailable (another OS, a file system without it) the old checkpoint is
   first renamed to ``.<name>.umtam-old-<token>`` (put back at once if an exception
   interrupts the save); a process killed between that rename and the next leaves no
   checkpoint at the final path, and the next save to, or restore from, that path
   renames the old checkpoint back.

Every published folder records what it holds (``.umtam-contents.json``: every file with
its size and modification time), and a folder is replaced only while it holds nothing
else: a file or folder added to an earlier
output since it was written (a model card, a ``umtam_statistics`` folder saved into it) makes
``overwrite`` refuse, naming it, rather than delete it with the folder.

The lock and the atomic swap need a local file system; on other ``etils.epath`` back ends
(cloud buckets) the checks still run but writes are neither locked nor atomically swapped.
In a multi-process JAX run every process calls the save together: process 0 alone
repairs, publishes and cleans up, between barriers, and there is no lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from umtam_jax.checkpoint import _processes
from umtam_jax.checkpoint._contents import added_entries, contents
from umtam_jax.checkpoint._filesystem import (
    delete_leftover,
    fsync_dir,
    lock_file,
    locked,
    sync_tree,
    write_synced,
)
from umtam_jax.checkpoint._leftovers import (
    _NEW,
    _OLD,
    _TRASH,
    _discard,
    _hidden,
    _put_back,
    _repair,
)
from umtam_jax.checkpoint._targets import (
    _CONTENTS_FILE,
    CHECKPOINT,
    OutputKind,
    check_target,
    is_empty_folder,
    is_local,
)
from umtam_jax.checkpoint._write_errors import CheckpointBusyError, naming_the_target

# Test hook: called with the name of each step of a save ("locked", "staged", "retired",
# "swapped", "trashed"), so a test can kill the process between any two of them.
_step_hook: Callable[[str], None] | None = None
# Whether renameat2(RENAME_EXCHANGE) may be tried (tests turn it off for the fallback).
_use_exchange = True


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


# ----------------------------------------------------------------------------- contents


def contents_record(entries: dict[str, Any] | list[str], stamp: str | None) -> dict[str, Any]:
    """The contents record of an output: its ``entries`` (:func:`contents`, or on a remote
    file system the top-level names) and its ``stamp`` (see :class:`OutputKind`)."""
    record = {"entries" if isinstance(entries, dict) else "names": entries}
    return record if stamp is None else {**record, "written_by": stamp}


def _record_contents(staging: epath.Path, kind: OutputKind) -> None:
    """Writes what the staged folder holds, every file with its size and modification
    time, into the folder (see :func:`._contents.added_entries`), with ``kind``'s stamp."""
    entries: Any = contents(staging) if is_local(staging) else None
    if entries is None:  # no lstat on remote file systems: the top-level names
        entries = sorted([p.name for p in staging.iterdir()] + [_CONTENTS_FILE])
    record = contents_record(entries, kind.stamp)
    write_synced(staging / _CONTENTS_FILE, json.dumps(record, sort_keys=True))


# ----------------------------------------------------------------------------- publish


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc: Any = None


def _renameat2(src: epath.Path, dst: epath.Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the OS or file system lacks it."""
    global _libc
    if not (_use_exchange and is_local(src) and hasattr(os, "uname")):
        return False
    if os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(os.fspath(src)), at_fdcwd, os.fsencode(os.fspath(dst)), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _keep_if_added(old: epath.Path, staging: epath.Path, directory: epath.Path) -> None:
    """Swaps the replaced output ``old`` back into ``directory`` (the new one to
    ``staging``, which the caller deletes) and raises, where an entry was put into it
    between the last check and the swap: it is never deleted with the folder."""
    if not is_local(directory) or _processes.count() > 1:  # one process publishes there
        return
    added = added_entries(old)
    if added == []:
        return
    if old == staging:  # exchanged: exchange again
        _renameat2(staging, directory, _RENAME_EXCHANGE)
    else:
        directory.rename(staging)
        _put_back(old, directory)
    fsync_dir(directory.parent)
    what = ", ".join(added[:5]) if added else "changes (its contents record is unreadable)"
    raise ValueError(
        f"refusing to replace {directory}: {what} appeared in it while the new output was "
        "being written (replacing the folder would delete them); it is left as it was"
    )


def _publish(staging: epath.Path, directory: epath.Path, token: str, empty: bool) -> None:
    """Puts ``staging`` at ``directory``: renamed to a free path, swapped with an earlier
    output, or, where ``directory`` was found ``empty``, renamed there once the empty
    folder is removed (``rmdir`` fails if anything was put into it since: never swapped
    away with it). The new folder takes the permissions of the folder it replaces (a
    private output stays private)."""
    trash = _hidden(directory, _TRASH, token)
    mode = None
    if is_local(directory) and directory.exists():
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        with contextlib.suppress(OSError):
            os.chmod(staging, mode)
    if empty or not directory.exists():
        try:
            if empty:
                os.rmdir(directory)
            if not _renameat2(staging, directory, _RENAME_NOREPLACE):
                staging.rename(directory)
        except BaseException:  # the empty folder made for the output goes back
            if empty and is_local(directory) and not os.path.lexists(directory):
                with contextlib.suppress(OSError):
                    os.mkdir(directory)
                    os.chmod(directory, mode if mode is not None else 0o755)
            raise
        _step("swapped")
        fsync_dir(directory.parent)
        return
    if _renameat2(staging, directory, _RENAME_EXCHANGE):
        old = staging  # the old checkpoint now sits at the staging name
    else:
        old = _hidden(directory, _OLD, token)
        try:
            directory.rename(old)
            fsync_dir(directory.parent)
            _step("retired")
            staging.rename(directory)
        except BaseException:  # interrupted (not killed) before the new output is in place
            if old.exists() and staging.exists():
                _put_back(old, directory)
            raise
    _step("swapped")
    fsync_dir(directory.parent)
    _keep_if_added(old, staging, directory)
    # Published: an old copy that cannot be deleted now is left for the next save to
    # delete (by its name), not reported as a failed save; without its staging folder
    # beside it, it is never taken for an interrupted swap's.
    try:
        old.rename(trash)
    except OSError as err:
        if old != staging:  # the staging name is deleted by the caller
            warnings.warn(
                f"{directory} was written, but the output it replaced could not be moved "
                f"aside for deletion ({err.strerror or err}): it is left at {old}; the next save "
                "to that path deletes it, or delete it yourself",
                stacklevel=4,
            )
        return
    _step("trashed")
    delete_leftover(trash, f"{directory} was written, but the output it replaced")


@contextlib.contextmanager
def publishing(
    directory: epath.Path,
    *,
    overwrite: bool,
    kind: OutputKind = CHECKPOINT,
) -> Iterator[epath.Path]:
    """Yields a staging folder to write a complete checkpoint into, then publishes it.

    Args:
      directory: the final checkpoint path (absolute).
      overwrite: whether an existing umtam_jax checkpoint at ``directory`` may be replaced.
      kind: the writer's own outputs, the only thing ever replaced (and the only old
        folder a repair puts back); see :func:`check_target`.

    Yields:
      A path that does not exist yet; the body must create the checkpoint there. If the
      body raises, the staging folder is deleted and ``directory`` is left as it was.

    Raises:
      CheckpointBusyError: another save to ``directory`` is in progress.
      ValueError / FileExistsError / NotADirectoryError: see :func:`check_target`.
    """
    check_output(directory, overwrite=overwrite, kind=kind)
    created = _make_parents(directory) if is_local(directory) and _processes.is_primary() else []
    try:
        with naming_the_target(directory):
            if _processes.count() > 1:
                with _publishing_collectively(directory, overwrite, kind) as staging:
                    yield staging
                return
            with locked(directory):
                _step("locked")
                _repair(directory, kind)
                # Again: the repair may have put back an old folder.
                check_target(directory, overwrite=overwrite, kind=kind)
                token = uuid.uuid4().hex[:12]
                staging = _hidden(directory, _NEW, token)
                try:
                    yield staging
                    _record_contents(staging, kind)
                    sync_tree(staging)
                    _step("staged")
                    # Again, just before the swap: the path may have changed while the
                    # checkpoint was written (a folder made there, a file put into it).
                    check_target(directory, overwrite=overwrite, kind=kind)
                    _publish(staging, directory, token, empty=is_empty_folder(directory))
                finally:
                    _discard(staging)
    except BaseException:
        for folder in created:  # a failed save leaves no folder it made for its output
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def check_output(directory: epath.Path, *, overwrite: bool, kind: OutputKind = CHECKPOINT) -> None:
    """:func:`check_target`, done before a writer takes the path's lock (to fail before
    any work), where another save may be in the middle of its swap: a refusal is then
    that save's half-done state, reported as :class:`CheckpointBusyError`.

    Args:
      directory: the output path (absolute).
      overwrite: whether an existing output of ``kind`` may be replaced.
      kind: the writer's own outputs.

    Raises:
      CheckpointBusyError: the path is refused while another save holds its lock.
      ValueError / FileExistsError / NotADirectoryError: see :func:`check_target`.
    """
    try:
        check_target(directory, overwrite=overwrite, kind=kind)
    except (ValueError, OSError):
        _raise_if_busy(directory)
        raise


def _raise_if_busy(directory: epath.Path) -> None:
    """Raises :class:`CheckpointBusyError` where another process holds ``directory``'s
    save lock now (its lock file exists only while a save holds it, or after a crash)."""
    if is_local(directory) and _processes.count() == 1 and os.path.lexists(lock_file(directory)):
        try:
            with locked(directory):
                pass
        except CheckpointBusyError:
            raise
        except OSError:  # a lock file that cannot be opened: the first error stands
            pass


def _make_parents(directory: epath.Path) -> list[str]:
    """Creates the missing folders above ``directory``; returns them, deepest first."""
    missing, parent = [], os.fspath(directory.parent)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.fspath(directory.parent), exist_ok=True)
    return missing


@contextlib.contextmanager
def _publishing_collectively(
    directory: epath.Path, overwrite: bool, kind: OutputKind = CHECKPOINT
) -> Iterator[epath.Path]:
    """:func:`publishing` when every process of a multi-host run calls the save.

    Every process writes its shards into the same staging folder (Orbax coordinates
    them); process 0 alone repairs, publishes and cleans up, between barriers. There is
    no lock: the processes of one run write together, and Orbax's own synchronisation
    keeps them in step.
    """
    token = _processes.shared_token()
    staging = _hidden(directory, _NEW, token)
    if _processes.is_primary():
        _repair(directory, kind)
    _processes.barrier(f"umtam_checkpoint_start_{token}")
    try:
        # Every process checks (the same shared path), so all of them stop together: the
        # repair may have put back an old folder, and the path may change during the save.
        check_target(directory, overwrite=overwrite, kind=kind)
        yield staging
        # Before the barrier: after it, process 0 publishes, and a later check elsewhere
        # would find the new output.
        check_target(directory, overwrite=overwrite, kind=kind)
        _processes.barrier(f"umtam_checkpoint_staged_{token}")
        if _processes.is_primary():
            _record_contents(staging, kind)
            sync_tree(staging)
            _publish(staging, directory, token, empty=is_empty_folder(directory))
        _processes.barrier(f"umtam_checkpoint_published_{token}")
    finally:
        if _processes.is_primary():
            _discard(staging)
