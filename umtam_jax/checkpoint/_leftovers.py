"""The hidden names a save uses beside its target, and the repair of what an interrupted
save left there.

A save to ``DIR/NAME`` writes its output into ``DIR/.NAME.umtam-new-<token>`` (its
staging folder); where no atomic exchange is available it first sets the old output aside
as ``DIR/.NAME.umtam-old-<token>``; a replaced output is renamed to
``DIR/.NAME.umtam-trash-<token>`` before it is deleted, so a partly deleted folder is
never mistaken for an output to recover. Tokens are 12 hex digits and names are matched
literally, so nothing else is ever taken for one of them.

An old output is put back only while its save's staging folder is beside it: that proves
the swap never finished (the staging folder is kept for as long as its old output is set
aside). An old copy without one (a finished save could not delete it, or an older
version's interrupted save left it) is never put back by itself: a restore of the missing
path names it, and a save that replaces the output at the path deletes it.
"""

from __future__ import annotations

import os
import re
import warnings

from etils import epath

from umtam_jax.checkpoint._filesystem import delete_leftover, fsync_dir, locked, rmtree
from umtam_jax.checkpoint._targets import (
    _CONTENTS_FILE,
    _ORBAX_TMP_SUFFIX,
    CHECKPOINT,
    OutputKind,
    is_empty_folder,
    is_regular_file,
)
from umtam_jax.checkpoint._write_errors import CheckpointBusyError

_NEW = "umtam-new-"
_OLD = "umtam-old-"
_TRASH = "umtam-trash-"


def _hidden(directory: epath.Path, kind: str, token: str = "") -> epath.Path:
    return directory.parent / f".{directory.name}.{kind}{token}"


def _with_prefix(folder: epath.Path, prefix: str) -> list[epath.Path]:
    """The entries of ``folder`` whose names start with ``prefix`` (taken literally, not
    as a glob pattern: a target named ``run[0-9]`` matches only itself)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _siblings(directory: epath.Path, kind: str) -> list[epath.Path]:
    """The hidden entries a save to ``directory`` names ``kind`` (:func:`_hidden` with a
    token of 12 hex digits, with Orbax's temporaries of those names): the exact pattern,
    so a user's ``.ck.umtam-new-backup`` is never taken for one."""
    pattern = re.compile(
        rf"\.{re.escape(directory.name)}\.{re.escape(kind)}[0-9a-f]{{12}}"
        rf"({re.escape(_ORBAX_TMP_SUFFIX)}.*)?"
    )
    return [p for p in _with_prefix(directory.parent, f".{directory.name}.{kind}")
            if pattern.fullmatch(p.name)]  # fmt: skip


def _repair(
    directory: epath.Path, kind: OutputKind = CHECKPOINT, *, warn_of_copy: bool = True
) -> None:
    """Under the lock: puts back an interrupted swap's old output, drops leftovers.

    The old output is put back whichever writer made it (a reader or writer of the other
    format finds its path as it was, and refuses it) where the path is free or holds an
    empty folder (one made for the output since); old copies are deleted only once the
    path holds an output again, so nothing that was at the path is ever lost. With
    ``warn_of_copy`` (a save's repair), an old copy left without an output at the path is
    named in a warning; a restore raises naming it instead.
    """

    def is_output(p: epath.Path) -> bool:
        return kind.is_own(p) or is_regular_file(p / _CONTENTS_FILE)

    empty = is_empty_folder(directory)
    pending = [p for p in _siblings(directory, _OLD) if is_output(p) and _interrupted(p)]
    if pending and (empty or not directory.exists()):
        newest = max(pending, key=lambda p: p.stat().mtime)
        if empty:
            os.rmdir(directory)  # fails if anything was put into it meanwhile
        newest.rename(directory)
        fsync_dir(directory.parent)
        pending.remove(newest)
    # Once an output is at the path every old copy is superseded by it; until then an
    # interrupted swap's pair (its old output and staging folder) is kept for a repair.
    output = is_output(directory)
    keep = set() if output else {_same_save(p, _OLD, _NEW) for p in pending}
    if warn_of_copy and not output and not pending and (olds := _siblings(directory, _OLD)):
        warnings.warn(
            f"{directory} holds no output, and a copy of an earlier one is at {olds[-1]} "
            "(one a finished save could not delete, or one an interrupted save of an older "
            f"version left): it is not put back; rename it to {directory.name} to use it, "
            "before a save replaces what is written there now (which deletes it)",
            stacklevel=2,
        )
    for prefix in (_NEW, _TRASH, _OLD) if output else (_NEW, _TRASH):
        for leftover in _siblings(directory, prefix):  # with Orbax's temporaries
            if leftover not in keep:
                delete_leftover(leftover, f"a leftover of an earlier save to {directory}")


def _same_save(entry: epath.Path, kind: str, other: str) -> epath.Path:
    """The hidden entry named ``other`` of the save whose entry named ``kind`` is
    ``entry`` (the same target and token): an old output's staging folder, and back."""
    name, token = entry.name.rsplit(kind, 1)
    return entry.parent / f"{name}{other}{token[:12]}"


def _interrupted(old: epath.Path) -> bool:
    """Whether the old output ``old`` was set aside by a swap that never finished: its
    save's staging folder is still there (kept until the old output is back). Once the
    new output is in place, an old copy left behind is never put back."""
    return _same_save(old, _OLD, _NEW).exists()


def recover(directory: epath.Path, kind: OutputKind = CHECKPOINT) -> None:
    """Puts back the checkpoint of a save killed in the middle of a swap, if any.

    Called by the restore functions when ``directory`` does not exist or is an empty
    folder; does nothing when there is nothing to recover or another process holds the
    lock. ``kind`` as in :func:`check_target`.
    """
    if directory.exists() and not is_empty_folder(directory):
        return  # the common case: no listing of the parent folder
    olds = _siblings(directory, _OLD)
    if not olds:
        return
    busy = False
    try:
        with locked(directory):
            _repair(directory, kind, warn_of_copy=False)
    except CheckpointBusyError:
        busy = True  # a save to it is running: its old output may be set aside right now
    except OSError as err:  # e.g. read-only media
        raise OSError(
            err.errno,
            f"{directory} is missing or empty and the copy a killed save left at {olds[-1]} "
            f"cannot be put back: {err.strerror}",
        ) from None
    left = [p for p in _siblings(directory, _OLD) if p.exists()]
    if not left or (directory.exists() and not is_empty_folder(directory)):
        return
    if busy:
        raise CheckpointBusyError(
            f"{directory} is being replaced by a save right now (its old output is set "
            f"aside at {left[-1]}): read it again"
        )
    # Not an interrupted swap's (that was put back): never put back unasked.
    raise FileNotFoundError(
        f"no checkpoint at {directory}; a copy of an earlier output is at {left[-1]} (one "
        "a finished save could not delete, or one an interrupted save of an older "
        f"version left): rename it to {directory.name} to use it"
    )


def _put_back(old: epath.Path, directory: epath.Path) -> None:
    """Renames the old output of an unfinished swap back; where that fails (something
    took the path meanwhile), the pair stays for the next save or restore to finish."""
    try:
        old.rename(directory)
        fsync_dir(directory.parent)
    except OSError as err:
        warnings.warn(
            f"the save to {directory} failed after moving the output it replaces aside, "
            f"and putting it back failed too ({err.strerror or err}): it is kept at {old}, and "
            f"the next save to, or restore from, {directory} puts it back once the path "
            "is free or an empty folder",
            stacklevel=5,
        )


def _discard(staging: epath.Path) -> None:
    """Deletes a save's staging folder, unless an unfinished swap's old output of the
    same save is still set aside (the staging folder marks it for the repair)."""
    if not _same_save(staging, _NEW, _OLD).exists():
        rmtree(staging)
    for leftover in _with_prefix(staging.parent, f"{staging.name}{_ORBAX_TMP_SUFFIX}"):
        rmtree(leftover)
