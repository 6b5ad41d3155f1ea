"""Stable keys of the experiments: content hashes for cache keys and per-task seeds.

Every cache of the pipeline (tokenized ``.npz`` arrays, expert checkpoint directories,
compiled optimizer transforms) is named by :func:`stable_hash` of the settings it depends
on, and every per-task random choice (head init, batch order, dropout, random merges) is
seeded by :func:`seed_for`. Both are part of the on-disk format: changing either would
orphan the caches of trained experts.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import jax
import numpy as np

__all__ = ["arrays_hash", "seed_for", "stable_hash"]


def stable_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON (``str`` for the rest).

    Args:
        obj: A JSON-able value (non-JSON leaves are written with ``str``).

    Returns:
        The hash, stable across processes and machines.

    Example:
        >>> from umtam_jax.experiments._keys import stable_hash
        >>> stable_hash({"b": 1, "a": [2, 3]}) == stable_hash({"a": [2, 3], "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arrays_hash(tree: Any) -> str:
    """16 hex digits of the SHA-256 of every array of a pytree: its path, dtype, shape and
    bytes, so any change of any value changes the hash.

    Args:
        tree: A pytree of arrays (JAX or NumPy; lists of numbers are arrays too).

    Returns:
        The hash, stable across processes and machines.

    Example:
        >>> import numpy as np
        >>> from umtam_jax.experiments._keys import arrays_hash
        >>> a = {"x": np.arange(3), "y": np.zeros(2)}
        >>> arrays_hash(a) == arrays_hash({"y": np.zeros(2), "x": np.arange(3)})
        True
        >>> arrays_hash(a) == arrays_hash({"x": np.arange(3), "y": np.ones(2)})
        False
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        head = [jax.tree_util.keystr(path), str(array.dtype), list(array.shape)]
        digest.update(json.dumps(head).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def seed_for(seed: int, *salt: str) -> int:
    """A 31-bit seed derived from the experiment seed and a purpose (e.g. ``"head"``, task).

    Args:
        seed: The experiment seed (:attr:`PipelineConfig.seed`).
        *salt: Strings naming the purpose, joined with ``/``.

    Returns:
        A seed in ``[0, 2**31)``.

    Example:
        >>> from umtam_jax.experiments._keys import seed_for
        >>> seed_for(0, "merge") == seed_for(0, "merge") != seed_for(1, "merge")
        True
    """
    return (seed * 1_000_003 + zlib.crc32("/".join(salt).encode())) % (2**31)
