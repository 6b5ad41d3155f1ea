"""The integrity checksum of the JSON records the library writes.

A record that is a JSON object carries one more top-level entry, ``"checksum":
"sha256:<hex>"``: the SHA-256 of the canonical text (:func:`canonical`) of the object
without that entry. A reader recomputes it from the decoded object (Python's floats
round-trip through their text, so the layout of the file does not matter), and a flipped
digit, which would otherwise read as another number, is detected. An object without the
entry (written before it existed, or by hand) is read as it is; any other value (a list,
a number) carries none.

Only the standard library: the benchmarks' records use it too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: The top-level entry that holds a record's checksum.
KEY = "checksum"
#: What the entry's value starts with (the digest in lowercase hex follows).
PREFIX = "sha256:"
# Appended to every error: the one way to accept a record edited on purpose.
_HINT = f'if it was edited by hand, deleting its "{KEY}" entry accepts it as it is'


def canonical(body: Any) -> str:
    """The text the checksum covers: sorted keys, no spaces, ASCII only.

    Args:
        body: A JSON value (the record without its checksum entry).

    Returns:
        ``body`` as compact JSON; decoding and encoding it again gives the same text.

    Example:
        >>> from umtam_jax.experiments._sealed import canonical
        >>> canonical({"b": [1, 0.5], "a": "é"})
        '{"a":"\\\\u00e9","b":[1,0.5]}'
    """
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)  # fmt: skip


def checksum(body: Any) -> str:
    """The checksum entry's value for ``body``: ``"sha256:"`` and the hex digest.

    Args:
        body: A JSON value (the record without its checksum entry).

    Returns:
        ``"sha256:<64 hex digits>"`` of :func:`canonical` ``(body)``.

    Example:
        >>> import hashlib
        >>> from umtam_jax.experiments._sealed import checksum
        >>> checksum({"x": 1}) == "sha256:" + hashlib.sha256(b'{"x":1}').hexdigest()
        True
    """
    return PREFIX + hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def seal(value: Any) -> Any:
    """``value`` as it is written: an object gets its ``"checksum"`` entry.

    Args:
        value: A JSON value (a dict with string keys is an object).

    Returns:
        A new dict with the entry, or ``value`` itself when it is not a dict.

    Raises:
        ValueError: ``value`` already has a ``"checksum"`` key (the name is reserved).

    Example:
        >>> from umtam_jax.experiments._sealed import seal, unseal
        >>> sealed = seal({"x": 1})
        >>> sorted(sealed), unseal(sealed)
        (['checksum', 'x'], {'x': 1})
    """
    if not isinstance(value, dict):
        return value
    if KEY in value:
        raise ValueError(
            f'a JSON record cannot have a top-level "{KEY}" entry: the name is reserved '
            "for the record's integrity checksum; rename it"
        )
    return {**value, KEY: checksum(value)}


def unseal(value: Any) -> Any:
    """``value`` as it was written: an object's checksum verified and its entry removed.

    Args:
        value: A decoded JSON value.

    Returns:
        ``value`` without its ``"checksum"`` entry (a new dict), or ``value`` itself when
        it is not a dict or has no such entry.

    Raises:
        ValueError: the entry is not a ``"sha256:..."`` string, or the content does not
            match it (the file was damaged, or edited): the message says which, without
            the file's name (the caller's error names it).

    Example:
        >>> from umtam_jax.experiments._sealed import unseal
        >>> unseal({"x": 2, "checksum": "sha256:00"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: its content does not match its checksum; if it was edited by hand, ...
    """
    if not isinstance(value, dict) or KEY not in value:
        return value
    body = {k: v for k, v in value.items() if k != KEY}
    recorded = value[KEY]
    if not (isinstance(recorded, str) and recorded.startswith(PREFIX)):
        raise ValueError(f'its "{KEY}" entry is not a "{PREFIX}<hex>" string; {_HINT}')
    if recorded != checksum(body):
        raise ValueError(f"its content does not match its checksum; {_HINT}")
    return body
