"""Silencing the callbacks a failed Orbax read leaves behind.

Orbax reads the arrays of an item concurrently on an event loop it closes when the read
ends. When one array fails (a damaged file), the read ends at once while tensorstore still
reads the others; their completions then call the closed loop's ``call_soon_threadsafe``
from a tensorstore thread, and Python prints each "RuntimeError: Event loop is closed" as
an unraisable exception after the caller's clean error. Those callbacks can do nothing:
:func:`orbax_reading` chains a ``sys.unraisablehook`` that drops exactly them (that
exception, raised in ``call_soon_threadsafe``) and passes every other one on.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_readers = 0  # reads running now
_sticky = False  # a read has failed: its callbacks may come at any later time
_previous_hook: Any = None  # the hook this one passes the others to
_first_previous: Any = None  # the hook it wrapped when first installed
_passing = threading.local()


def _is_closed_loop_callback(unraisable: Any) -> bool:
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)


def _drop_closed_loop_callbacks(unraisable: Any) -> None:
    if _is_closed_loop_callback(unraisable):
        return
    if getattr(_passing, "on", False):
        # Back here through a hook installed after this one that calls its predecessor
        # (this hook): pass it to the hook this one first wrapped, ending the chain.
        (_first_previous or sys.__unraisablehook__)(unraisable)
        return
    _passing.on = True
    try:
        (_previous_hook or sys.__unraisablehook__)(unraisable)
    finally:
        _passing.on = False


@contextlib.contextmanager
def orbax_reading() -> Iterator[None]:
    """Runs an Orbax read with the hook chained (see the module's docstring).

    The hook is chained while reads run and removed after the last one, unless one has
    failed: reads Orbax left running may complete after the caller has its error, so it
    then stays chained. A hook installed later that calls its predecessor (this one)
    reaches the hook this one wrapped first, once.
    """
    global _readers, _sticky, _previous_hook, _first_previous
    with _lock:
        if sys.unraisablehook is not _drop_closed_loop_callbacks:
            _previous_hook, sys.unraisablehook = sys.unraisablehook, _drop_closed_loop_callbacks
            _first_previous = _first_previous or _previous_hook
        _readers += 1
    failed = True
    try:
        yield
        failed = False
    finally:
        with _lock:
            _readers -= 1
            _sticky = _sticky or failed
            if not (_readers or _sticky) and sys.unraisablehook is _drop_closed_loop_callbacks:
                sys.unraisablehook, _previous_hook = _previous_hook, None
