"""Silencing the leftovers of a failed Orbax read.

Orbax reads the arrays of an item concurrently on an event loop it closes when the read
ends. When one array fails (a damaged file), the read ends at once while the others are
still under way, and Python later reports two kinds of leftovers of those abandoned reads
as unraisable exceptions, printed after the caller's clean error:

* tensorstore's completions of the other reads call the closed loop's
  ``call_soon_threadsafe`` from a tensorstore thread: "RuntimeError: Event loop is
  closed", with a traceback that holds only asyncio's frames (the caller is native);
* the unfinished read coroutines (Orbax's ``_read_array_index_and_device_put``) are
  closed when they are garbage collected, by a ``GeneratorExit`` thrown in at their
  ``await``; Orbax's ``except BaseException`` around that read turns it into an
  ``Exception("Encountered error while reading array index ...")``, which ``close``
  raises: "Exception ignored in: <coroutine object _read_array_index_and_device_put>",
  with a TensorStore spec of some sixty lines.

Neither can do anything (the caller already has the read's error):
:func:`drop_closed_loop_callbacks` chains a ``sys.unraisablehook`` that drops exactly these
two and passes every other unraisable exception on.

A third kind goes through asyncio's logger: the failed reads of the other arrays (each
file of a damaged checkpoint fails in turn), whose errors nobody retrieves once the first
one ended the read, are logged when garbage collected as "Future exception was never
retrieved" or "Task exception was never retrieved", with TensorStore's error naming the
checkpoint's files. :func:`note_failed_read` adds the folder of a read that failed to
those whose such reports a filter on the ``asyncio`` logger drops; every other record
passes.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any

_lock = threading.Lock()
_installed = False
_wrapped: Any = None  # the hook that was current when this one was chained

# Orbax's coroutine that reads one array index (orbax/checkpoint/.../serialization.py),
# and the start of the message its ``except BaseException`` raises.
_READ_COROUTINE = "_read_array_index_and_device_put"
_READ_ERROR = "Encountered error while reading array index"


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether ``unraisable`` is a closed loop's ``call_soon_threadsafe`` called from
    native code (tensorstore's completion threads): its traceback starts in that asyncio
    method, with no Python caller of it."""
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (
        bool(frames)
        and frames[0].name == "call_soon_threadsafe"
        and all("asyncio" in os.path.normpath(f.filename).split(os.sep) for f in frames)
    )


def _is_abandoned_read(unraisable: Any) -> bool:
    """Whether ``unraisable`` is an unfinished Orbax read coroutine's ``GeneratorExit``,
    turned into Orbax's read error when the coroutine was closed (see the module's
    docstring)."""
    coroutine, err = getattr(unraisable, "object", None), unraisable.exc_value
    if not (inspect.iscoroutine(coroutine) and coroutine.cr_code.co_name == _READ_COROUTINE):
        return False
    if "orbax" not in os.path.normpath(coroutine.cr_code.co_filename).split(os.sep):
        return False
    return (
        type(err) is Exception
        and isinstance(err.__cause__, GeneratorExit)
        and str(err).startswith(_READ_ERROR)
    )


def _drop_closed_loop_callbacks(unraisable: Any) -> None:
    if not (_is_closed_loop_callback(unraisable) or _is_abandoned_read(unraisable)):
        (_wrapped or sys.__unraisablehook__)(unraisable)


def drop_closed_loop_callbacks() -> None:
    """Chains the hook (see the module's docstring); called before every Orbax read.

    The hook is chained once per process, at its first read, over the hook current then,
    and stays: the leftovers of a failed read may come at any later time. A hook
    installed later replaces it, or chains it by calling its predecessor.
    """
    global _installed, _wrapped
    with _lock:
        if not _installed:
            _wrapped, sys.unraisablehook = sys.unraisablehook, _drop_closed_loop_callbacks
            _installed = True


#: Folders (absolute, with a trailing separator) of Orbax reads that failed in this process.
_failed_folders: set[str] = set()
_NEVER_RETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


class _AbandonedReadReports(logging.Filter):
    """Drops asyncio's reports of unretrieved errors that name a failed read's folder."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_NEVER_RETRIEVED) or not record.exc_info:
            return True
        text = str(record.exc_info[1])
        return not any(re.search(rf"(?:^|[\s\"'(=]){re.escape(folder)}", text)
                       for folder in list(_failed_folders))  # fmt: skip


_filter = _AbandonedReadReports()


def note_failed_read(folder: str | os.PathLike[str]) -> None:
    """Marks ``folder``'s Orbax read as failed: asyncio's later reports of its other
    arrays' unretrieved errors are dropped (see the module's docstring). Called where
    the failure is raised to the caller as the library's own error."""
    with _lock:
        for path in {os.path.abspath(folder), os.path.realpath(folder)}:
            _failed_folders.add(path.rstrip(os.sep) + os.sep)
        logger = logging.getLogger("asyncio")
        if _filter not in logger.filters:
            logger.addFilter(_filter)
