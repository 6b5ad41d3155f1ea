"""A failed write, named by the output it was writing.

A save writes into a hidden staging folder beside its output; a system error there (a full
disk, a read-only file system, a permission) would name that hidden path, and Orbax
reports it as tensorstore's ValueError after logging its traceback.
:func:`naming_the_target` turns it into one ``OSError`` naming the output, without the
logged traceback. :class:`CheckpointBusyError` (another save holds the output's lock) is
never renamed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator

from etils import epath


class CheckpointBusyError(OSError):
    """Another process (or thread) is writing the same checkpoint path right now."""


# Tensorstore (under Orbax) reports a failed write as a ValueError carrying the errno.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
# Errors only a write raises (a read of an input never does).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_failure(
    err: BaseException, directory: epath.Path, *, on_staging: bool = False
) -> int | None:
    """The errno of ``err`` when it is a system failure to write ``directory``'s output
    (an errno only writes raise, or any errno on its staging path; with ``on_staging``,
    only an error that names the staging path), else None."""
    ours = f"{directory.parent}{os.sep}.{directory.name}.umtam-"
    if isinstance(err, CheckpointBusyError):
        return None
    if isinstance(err, OSError):
        code, names = err.errno, [str(err.filename or ""), str(err.filename2 or "")]
    elif isinstance(err, ValueError):
        found = _TENSORSTORE_ERRNO.search(str(err))
        code, names = (int(found.group(1)) if found else None), [str(err)]
    else:
        return None
    # The staging prefix begins the path (an OSError's file name) or a quoted path in
    # tensorstore's message: not the tail of another folder's name.
    staged = re.compile(r"(?:^|[\"'\s]|file://)" + re.escape(ours))
    named = any(staged.search(n) for n in names)
    if code is None or not (named or (code in _WRITE_ERRNOS and not on_staging)):
        return None
    return code


class _HideWriteFailures(logging.Filter):
    """Drops the tracebacks Orbax's threads log (through absl) for a write failure in this
    save's staging folder before the save re-raises it: the caller gets the failure once,
    as the ``OSError``. Records of other errors (another thread's full disk elsewhere)
    pass."""

    def __init__(self, directory: epath.Path):
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return err is None or _write_failure(err, self.directory, on_staging=True) is None


@contextlib.contextmanager
def naming_the_target(directory: epath.Path) -> Iterator[None]:
    """A write into the output that fails for a system reason (a full disk, a read-only
    file system, a permission) is an ``OSError`` naming ``directory``, not the hidden
    staging path (and for Orbax outputs not tensorstore's ValueError), and Orbax's logged
    tracebacks of it are dropped. Other errors, such as a failed read of an input while
    the output is written, pass unchanged."""
    hide = _HideWriteFailures(directory)
    absl_logger = logging.getLogger("absl")  # Orbax logs through absl
    absl_logger.addFilter(hide)
    try:
        yield
    except (OSError, ValueError) as err:
        code = _write_failure(err, directory)
        if code is None:
            raise
        raise OSError(code, f"cannot write {directory}: {os.strerror(code)}") from err
    finally:
        absl_logger.removeFilter(hide)
