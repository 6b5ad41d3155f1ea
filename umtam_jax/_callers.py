"""Where a warning points: the user's code that called into the library."""

from __future__ import annotations

import sys

#: The packages whose frames a warning skips (the library and the wrappers it runs in,
#: ``contextlib``'s included: the library's own ``with`` blocks run through it).
_LIBRARIES = ("umtam_jax", "optax", "jax", "jaxlib", "flax", "chex", "contextlib")


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called from the function that warns,
    of the first frame outside :data:`_LIBRARIES`: the user's call, however many of
    optax's wrappers (``chain``, ``inject_hyperparams``) or JAX's tracing lie between.

    Returns:
      1 for the warning function's own frame, 2 for its caller's, and so on.

    Example:
      >>> import warnings
      >>> from umtam_jax._callers import user_stacklevel
      >>> def library_function():  # here the doctest's own frame is the user's
      ...     warnings.warn("x", stacklevel=user_stacklevel())
    """
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] not in _LIBRARIES:
            break
        frame, level = frame.f_back, level + 1
    return level
