"""Where a save may write: the checks every writer runs before anything is written.

:func:`check_target` refuses a path that is not the writer's own earlier output (a file, a
symbolic link, a foreign folder, an output holding entries added since it was written) and
:func:`check_output_not_input` an output that is, holds or lies in an input;
:func:`is_checkpoint` recognises a umtam_jax checkpoint. The writing itself is
:mod:`._safety`'s.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from umtam_jax import _json

# Names of the files that identify a umtam_jax checkpoint (see _format.py).
_METADATA_FILE = ("umtam_metadata", "metadata")
_FORMAT_NAME = "umtam_jax.checkpoint"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"

_CONTENTS_FILE = ".umtam-contents.json"

# The most bytes a reader takes from the JSON records of a checkpoint folder: generous
# bounds (the metadata holds one structure entry per array, the contents record one entry
# per file), so that a damaged or hostile file cannot exhaust the memory.
MAX_METADATA_BYTES = 64 * 2**20
MAX_CONTENTS_BYTES = 64 * 2**20


def is_local(path: epath.Path) -> bool:
    """Whether ``path`` is on a local (POSIX) file system."""
    return "://" not in os.fspath(path)


class UnsafeFileError(ValueError):
    """A file of a checkpoint folder that a reader refuses to read: not a regular file (a
    FIFO, whose read may never return; a device such as ``/dev/zero``, whose read never
    ends), or larger than the bound for what it records. The message completes a
    sentence whose subject is the file ("<path> is a FIFO, not a regular file")."""


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _check_stat(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"is {_file_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise UnsafeFileError(f"holds {st.st_size} bytes, more than the {limit} it may hold")


def check_regular_file(path: epath.Path, limit: int) -> None:
    """Raises unless the local file ``path`` is a regular file (links followed) of at most
    ``limit`` bytes; a path on another back end is not checked. Nothing is opened.

    Raises:
      FileNotFoundError: it does not exist (or is a link to nothing).
      UnsafeFileError: it is not a regular file, or is larger than ``limit``.
      OSError: it cannot be examined.
    """
    if is_local(path):
        _check_stat(os.stat(os.fspath(path)), limit)


def read_record(path: epath.Path, limit: int) -> str:
    """The text (UTF-8) of a record file of a checkpoint folder, read with a size bound.

    A local file must be a regular file of at most ``limit`` bytes
    (:func:`check_regular_file`): it is checked before it is opened, and the file opened
    (without blocking, so a FIFO put there meanwhile cannot hang the open) is checked
    again. A path on another back end is read as it is.

    Args:
      path: the file.
      limit: the most bytes it may hold.

    Raises:
      FileNotFoundError: it does not exist.
      UnsafeFileError: it is not a regular file, or is larger than ``limit``.
      UnicodeDecodeError: it is not UTF-8 (a ``ValueError``).
      OSError: it cannot be read.

    Example:
      >>> import os, tempfile
      >>> from etils import epath
      >>> from umtam_jax.checkpoint._targets import read_record
      >>> folder = epath.Path(tempfile.mkdtemp())
      >>> _ = (folder / "record.json").write_text("{}")
      >>> read_record(folder / "record.json", 1024)
      '{}'
      >>> os.mkfifo(folder / "fifo")
      >>> read_record(folder / "fifo", 1024)
      Traceback (most recent call last):
      ...
      umtam_jax.checkpoint._targets.UnsafeFileError: is a FIFO, not a regular file
    """
    if not is_local(path):
        return path.read_text()
    check_regular_file(path, limit)  # a device or FIFO is never opened
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(os.fspath(path), flags), "rb") as f:
        _check_stat(os.fstat(f.fileno()), limit)  # the file may have been replaced since
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"holds more than the {limit} bytes it may hold")
    return data.decode("utf-8")


def is_regular_file(path: epath.Path) -> bool:
    """Whether ``path`` is a regular file (links followed); etils' ``is_file`` also
    accepts a FIFO or a device. On another back end, ``is_file``."""
    return os.path.isfile(os.fspath(path)) if is_local(path) else path.is_file()


def is_checkpoint(path: epath.Path) -> bool:
    """Whether ``path`` is a folder holding a umtam_jax checkpoint's metadata (a probe:
    False for metadata that is not a regular file of at most
    :data:`MAX_METADATA_BYTES`, which is never opened)."""
    meta = path.joinpath(*_METADATA_FILE)
    try:
        record = _json.loads(read_record(meta, MAX_METADATA_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == _FORMAT_NAME


class OutputKind(NamedTuple):
    """How a writer recognises its own earlier output, the only kind it ever replaces.

    Attributes:
      is_own: whether an existing folder is such an output.
      marker: the entry ``is_own`` looks for, named when a folder lacks it.
      refuse: raises where an output of this kind must still not be replaced by this
        writer (a merge never replaces a training checkpoint); None: none refused.
      written_by_orbax: whether Orbax writes it (its path must then hold no '[': Orbax
        finds the arrays it wrote with a glob of the folder's path).
      stamp: what wrote the output (``"merge"``), recorded in it: only an output with
        this stamp is replaced; None: every output of the format.
    """

    is_own: Callable[[epath.Path], bool]
    marker: str
    refuse: Callable[[epath.Path], None] | None = None
    written_by_orbax: bool = False
    stamp: str | None = None


#: A umtam_jax (Orbax) checkpoint.
CHECKPOINT = OutputKind(is_checkpoint, "/".join(_METADATA_FILE), written_by_orbax=True)


def check_target(
    directory: epath.Path,
    *,
    overwrite: bool,
    kind: OutputKind = CHECKPOINT,
) -> None:
    """Raises a clear error if a save may not write ``directory``.

    Args:
      directory: the path to be written.
      overwrite: whether an existing output of ours at ``directory`` may be replaced.
      kind: the writer's outputs (the only folders ever replaced); by default umtam_jax
        checkpoints.

    Raises:
      TypeError: ``overwrite`` is not a bool.
      ValueError: an empty name, a path with '[' (a checkpoint: Orbax would lose its
        arrays), a symbolic link, a file or a folder that is not a
        umtam_jax checkpoint (whatever ``overwrite`` says), a folder inside a checkpoint
        Orbax wrote or named as a step beside a ``CheckpointManager``'s steps, or an
        output of this format that ``kind.stamp`` does not mark as the writer's.
      NotADirectoryError: a component of the parent path is a file.
      FileExistsError: an existing checkpoint and ``overwrite`` is False.
    """
    if not isinstance(overwrite, bool | np.bool_):  # "no" would replace the folder
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if directory.name in ("", ".", ".."):
        raise ValueError(f"not a valid checkpoint path: {directory!s}")
    if _ORBAX_TMP_SUFFIX in directory.name:
        raise ValueError(f"checkpoint name must not contain {_ORBAX_TMP_SUFFIX!r}: {directory}")
    full = os.path.abspath(directory) if is_local(directory) else os.fspath(directory)
    if kind.written_by_orbax and "[" in full:
        # Under a "[" Orbax's glob finds none of the arrays it wrote and publishes a
        # checkpoint without them.
        raise ValueError(
            f"cannot write checkpoint {directory}: its path {full} contains '[', which "
            "Orbax reads as a pattern (the arrays it writes would not be found); choose a "
            "path without '['"
        )
    if is_local(directory):
        for parent in reversed(directory.parents):
            if os.path.lexists(parent) and not os.path.isdir(parent):
                what = (
                    "a symbolic link that leads to no folder (a loop or a missing target)"
                    if os.path.islink(parent)
                    else "a file, not a folder"
                )
                raise NotADirectoryError(f"cannot write checkpoint {directory}: {parent} is {what}")
        if os.path.islink(directory):
            raise ValueError(
                f"refusing to write checkpoint {directory}: it is a symbolic link "
                f"(to {os.readlink(directory)}); give the real path"
            )
        from umtam_jax.checkpoint._orbax_folders import orbax_conflict

        conflict = orbax_conflict(directory)
        if conflict is not None:
            raise ValueError(
                f"refusing to write checkpoint {directory}: {conflict}; write elsewhere"
            )
    if not directory.exists() or is_empty_folder(directory):
        return  # an empty folder made for the output holds nothing to lose
    if not directory.is_dir():
        raise ValueError(
            f"refusing to write checkpoint {directory}: a file of that name exists and "
            "is not a umtam_jax checkpoint (it is never replaced)"
        )
    if is_local(directory) and os.path.isdir(directory) and not os.listdir(directory):
        what = (
            "the working directory"
            if _real(directory) == _real(os.getcwd())
            else ("a mount point" if os.path.ismount(directory) else "not replaceable")
        )
        raise ValueError(
            f"refusing to write checkpoint {directory}: it is an empty folder, but {what} "
            "(a save puts its output in place by renaming a finished folder there, which "
            "this folder cannot give way to); name a new folder inside it"
        )
    if not kind.is_own(directory):
        raise ValueError(
            f"refusing to write checkpoint {directory}: the folder exists and is not a "
            f"umtam_jax output of this format (it has no valid {kind.marker}; only such an output "
            "is ever replaced, even with overwrite)"
        )
    if kind.refuse is not None:
        kind.refuse(directory)
    from umtam_jax.checkpoint._contents import added_entries, recorded_stamp

    if kind.stamp is not None and (stamp := recorded_stamp(directory)) != kind.stamp:
        by = (
            f"records {stamp!r} as its writer"
            if stamp
            else f"records no writer (saved by save_checkpoint or save_safetensors, or an "
            f"older {kind.stamp})"
        )
        raise ValueError(
            f"refusing to replace {directory}: it is a umtam_jax output that {by}, and a "
            f"{kind.stamp} replaces only its own output, even with overwrite; write elsewhere, "
            "or delete it yourself"
        )
    if not overwrite:
        raise FileExistsError(
            f"checkpoint directory {directory} already exists; pass overwrite=True to replace it"
        )
    added = added_entries(directory)
    if added is None:
        raise ValueError(
            f"refusing to replace {directory}: it has no readable record of the entries "
            f"umtam_jax wrote there ({_CONTENTS_FILE} is missing or damaged: the folder was "
            "copied, or written by an older version), so whatever else it holds would be "
            "deleted; delete the folder yourself, or write elsewhere"
        )
    if added:
        shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise ValueError(
            f"refusing to replace {directory}: it holds {shown}, which umtam_jax did not write "
            "there or which changed since (replacing the folder would delete them); move them "
            "out first"
        )


def is_empty_folder(path: epath.Path) -> bool:
    """Whether ``path`` is a local folder with no entries that a save may take the place
    of: not a link, a mount point or the working directory, and listable."""
    if not is_local(path) or os.path.islink(path) or not os.path.isdir(path):
        return False
    if os.path.ismount(path) or _real(path) == _real(os.getcwd()):
        return False
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _real(path: Any) -> str:
    return os.path.realpath(os.fspath(path))


def _identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing local path, else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _self_and_parents(path: str) -> list[str]:
    """``path`` and every folder above it, nearest first."""
    out = [path]
    while os.path.dirname(out[-1]) != out[-1]:
        out.append(os.path.dirname(out[-1]))
    return out


def check_output_not_input(output: Any, inputs: Sequence[tuple[str, Any]]) -> None:
    """Raises ValueError if ``output`` is, contains or lies inside one of the ``inputs``.

    Args:
      output: the path to be written.
      inputs: ``(what, path)`` pairs, e.g. ``("the base", "ckpt/base")``.
    """
    out = _real(output)
    for what, path in inputs:
        src = _real(path)
        if out == src:
            raise ValueError(f"the output {output} is {what} ({path})")
        if src.startswith(out.rstrip(os.sep) + os.sep):
            raise ValueError(f"the output {output} contains {what} ({path})")
        if out.startswith(src.rstrip(os.sep) + os.sep):
            raise ValueError(f"the output {output} is inside {what} ({path})")
        # By identity too: a bind mount (or another mount of the same file system) shows
        # one folder under two real paths.
        src_id, out_ids = _identity(src), [_identity(p) for p in _self_and_parents(out)]
        if src_id is not None and src_id in out_ids:
            where = "is" if out_ids[0] == src_id else "is inside"
            raise ValueError(f"the output {output} {where} {what} ({path}), seen through a mount")
        out_id = out_ids[0]
        if out_id is not None and out_id in [_identity(p) for p in _self_and_parents(src)]:
            raise ValueError(f"the output {output} contains {what} ({path}), seen through a mount")
