"""What an output records it holds: its contents record (``.umtam-contents.json``, every
file with its size and modification time, and the writer's stamp), read back to tell the
entries a save wrote from those added since (:func:`added_entries`)."""

from __future__ import annotations

import os
from typing import Any

from etils import epath

from umtam_jax import _json
from umtam_jax.checkpoint._targets import _CONTENTS_FILE, MAX_CONTENTS_BYTES, read_record


def contents(directory: epath.Path) -> dict[str, Any]:
    """What a local output folder holds, recursively: ``{relative path: [size, mtime_ns]}``
    of its files and links (``lstat``, a link never followed) and ``None`` for its folders,
    the contents record itself left out."""
    root = os.fspath(directory)
    found: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel == _CONTENTS_FILE:
                continue
            st = os.lstat(path)
            is_dir = name in dirs and not os.path.islink(path)
            found[rel] = None if is_dir else [st.st_size, st.st_mtime_ns]
    return found


def _contents_record(directory: epath.Path) -> dict[str, Any]:
    """An output's contents record: ``{}`` where missing or unreadable, an older list of
    top-level names as ``{"names": [...]}``."""
    try:
        recorded = _json.loads(read_record(directory / _CONTENTS_FILE, MAX_CONTENTS_BYTES))
    except (OSError, ValueError):
        return {}
    if isinstance(recorded, list):
        recorded = {"names": recorded}
    return recorded if isinstance(recorded, dict) else {}


def recorded_contents(directory: epath.Path) -> dict[str, Any] | list[str] | None:
    """What an output's save recorded it wrote (:func:`contents`, or a list of top-level
    names), or None where the record is missing or unreadable."""
    recorded = _contents_record(directory)
    if isinstance(recorded.get("names"), list):
        return list(map(str, recorded["names"]))
    return recorded["entries"] if isinstance(recorded.get("entries"), dict) else None


def recorded_stamp(directory: epath.Path) -> str | None:
    """The stamp an output's save recorded (see :class:`OutputKind`), or None."""
    return _contents_record(directory).get("written_by")


def added_entries(directory: epath.Path) -> list[str] | None:
    """The entries of an earlier output that its save did not write, or that changed since
    (a file edited, replaced or put into one of its subfolders), as relative paths; None
    when the folder has no readable record (it cannot be told what is ours)."""
    was = recorded_contents(directory)
    if was is None:
        return None
    if isinstance(was, list):  # top-level names only (a remote file system)
        return sorted({p.name for p in directory.iterdir()} - set(was))
    try:
        now = contents(directory)
    except OSError:
        return None
    changed = {k for k, v in now.items() if k not in was or was[k] != v}
    # An added folder is named once, not with everything in it.
    return sorted(k for k in changed if os.path.dirname(k) not in changed)
