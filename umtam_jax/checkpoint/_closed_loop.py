"""Silencing the callbacks a failed Orbax read leaves behind.

Orbax reads the arrays of an item concurrently on an event loop it closes when the read
ends. When one array fails (a damaged file), the read ends at once while tensorstore still
reads the others; their completions then call the closed loop's ``call_soon_threadsafe``
from a tensorstore thread, and Python prints each "RuntimeError: Event loop is closed" as
an unraisable exception after the caller's clean error. Those callbacks can do nothing:
:func:`drop_closed_loop_callbacks` chains a ``sys.unraisablehook`` that drops exactly them (that
exception, raised in ``call_soon_threadsafe``) and passes every other one on.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

_lock = threading.Lock()
_installed = False
_wrapped: Any = None  # the hook that was current when this one was chained


def _is_closed_loop_callback(unraisable: Any) -> bool:
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)


def _drop_closed_loop_callbacks(unraisable: Any) -> None:
    if not _is_closed_loop_callback(unraisable):
        (_wrapped or sys.__unraisablehook__)(unraisable)


def drop_closed_loop_callbacks() -> None:
    """Chains the hook (see the module's docstring); called before every Orbax read.

    The hook is chained once per process, at its first read, over the hook current then,
    and stays: the callbacks of a failed read may come at any later time. A hook
    installed later replaces it, or chains it by calling its predecessor.
    """
    global _installed, _wrapped
    with _lock:
        if not _installed:
            _wrapped, sys.unraisablehook = sys.unraisablehook, _drop_closed_loop_callbacks
            _installed = True
