"""Decoding JSON the library did not write itself: one error type for every bad input.

Headers, indexes, records and configs come from files that may be damaged or hostile. Python's
decoder raises ``JSONDecodeError`` (bad syntax), ``UnicodeDecodeError`` (bad UTF-8), both
``ValueError``, and ``RecursionError`` for nesting deeper than its stack; :func:`loads` turns
the last into a ``ValueError`` too, so a reader catches ``ValueError`` alone and names the file.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, raising ``ValueError`` for any input it cannot decode.

    Args:
      text: the JSON document.

    Returns:
      The decoded value.

    Raises:
      ValueError: ``text`` is not JSON, not UTF-8, or nested too deeply to decode.

    Example:
      >>> from umtam_jax._json import loads
      >>> loads('{"a": [1, 2]}')
      {'a': [1, 2]}
      >>> loads("[" * 100_000)
      Traceback (most recent call last):
      ...
      ValueError: JSON nested too deeply to decode (Python's recursion limit)
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode (Python's recursion limit)") from None
