"""A failed write, named by the output it was writing.

A save writes into a hidden staging folder beside its output; a system error there (a full
disk, a read-only file system, a permission) would name that hidden path, and Orbax
reports it as tensorstore's ValueError. :func:`naming_the_target` turns it into one
``OSError`` naming the output. :class:`CheckpointBusyError` (another save holds the
output's lock) is never renamed.
"""

from __future__ import annotations

import contextlib
import errno
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


@contextlib.contextmanager
def naming_the_target(directory: epath.Path) -> Iterator[None]:
    """A write into the output that fails for a system reason (a full disk, a read-only
    file system, a permission) is an ``OSError`` naming ``directory``, not the hidden
    staging path (and for Orbax outputs not tensorstore's ValueError). Other errors, such
    as a failed read of an input while the output is written, pass unchanged."""
    ours = f"{directory.parent}{os.sep}.{directory.name}.umtam-"
    try:
        yield
    except CheckpointBusyError:
        raise
    except (OSError, ValueError) as err:
        if isinstance(err, OSError):
            code, names = err.errno, [str(err.filename or ""), str(err.filename2 or "")]
        else:
            found = _TENSORSTORE_ERRNO.search(str(err))
            code, names = (int(found.group(1)) if found else None), [str(err)]
        if code is None or not (code in _WRITE_ERRNOS or any(ours in n for n in names)):
            raise
        raise OSError(code, f"cannot write {directory}: {os.strerror(code)}") from err
