"""Decoding JSON the library did not write itself: one error type for every bad input.

Headers, indexes, records and configs come from files that may be damaged or hostile. Python's
decoder raises ``JSONDecodeError`` (bad syntax), ``UnicodeDecodeError`` (bad UTF-8), both
``ValueError``, and ``RecursionError`` for nesting deeper than its stack; :func:`loads` turns
the last into a ``ValueError`` too, so a reader catches ``ValueError`` alone and names the file.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes, *, unique_keys: bool = False) -> Any:
    """``json.loads(text)``, raising ``ValueError`` for any input it cannot decode.

    Args:
      text: the JSON document.
      unique_keys: refuse an object that gives a key twice (Python's decoder keeps the
        last one silently): for tables of tensors, where a repeated name hides one.

    Returns:
      The decoded value.

    Raises:
      ValueError: ``text`` is not JSON, not UTF-8, or nested too deeply to decode; with
        ``unique_keys``, an object gives a key twice.

    Example:
      >>> from umtam_jax._json import loads
      >>> loads('{"a": [1, 2]}')
      {'a': [1, 2]}
      >>> loads("[" * 100_000)
      Traceback (most recent call last):
      ...
      ValueError: JSON nested too deeply to decode (Python's recursion limit)
      >>> loads('{"a": 1, "a": 2}', unique_keys=True)
      Traceback (most recent call last):
      ...
      ValueError: the key 'a' is given twice
    """
    try:
        return json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode (Python's recursion limit)") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out
