"""Where the out-of-core engine reads models from: one small interface, one class per format.

A :class:`Source` is a model on disk, read a few leaves at a time. Its leaves are indexed
by their position in JAX's flattening order of :meth:`Source.abstract` (the same order for
every input of a merge, whose structures are checked equal first), so the engine never
sees a format's own names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np


class Source(Protocol):
    """A model on disk whose parameters (and UMTAM statistics) are read leaf by leaf."""

    location: str  # shown in messages

    def abstract(self) -> Any:
        """The parameters' pytree with ``jax.ShapeDtypeStruct`` leaves."""

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        """The parameters at these flattening positions."""

    def has_statistics(self) -> bool:
        """Whether UMTAM statistics are stored with the parameters."""

    def abstract_statistics(self) -> Any:
        """The statistics' pytree with ``jax.ShapeDtypeStruct`` leaves."""

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        """The statistics node (a dict of arrays, or an array) of each of these leaves."""


def _subspec(spec: dict[str, Any], path: tuple[str, ...], what: str) -> dict[str, Any]:
    """The structure record at stored ``path`` inside ``spec``."""
    for name in path:
        children = {c[0]: c[2] for c in spec.get("children", [])}
        if name not in children:
            raise ValueError(f"{what} has no entry {'/'.join(path)}")
        spec = children[name]
    return spec


class OrbaxSource:
    """A umtam_jax (Orbax) checkpoint: its ``params`` item, and ``statistics`` if saved.

    Args:
      directory: the checkpoint directory.
      what: how messages name it (``"the base"``, ``"expert 1"``).
    """

    def __init__(self, directory: str | os.PathLike, what: str):
        from umtam_jax.checkpoint import _checkpoint as C
        from umtam_jax.checkpoint import _encoding as E
        from umtam_jax.checkpoint._streaming import CheckpointReader

        self._C, self._E = C, E
        try:
            self.reader = CheckpointReader(directory)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cannot read {what} checkpoint {directory}: {err}") from None
        self.location = os.fspath(self.reader.directory)
        self.directory = self.reader.directory
        spec = self.reader.structure(C.PARAMS)
        stored = [path for path, _ in E.spec_arrays(spec)]
        index_tree: dict[str, Any] = {}
        for i, path in enumerate(stored):
            E.nested_set(index_tree, path, i)
        # Stored paths in JAX's flattening order of the decoded tree.
        self._stored = [stored[i] for i in jax.tree.leaves(E.decode(spec, index_tree))]
        # A bare-array params tree is stored under "value"; its statistics node is the root.
        self._root_array = spec["t"] == "root_array"

    def abstract(self) -> Any:
        return self.reader.abstract(self._C.PARAMS)

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        return self.reader.restore_arrays(self._C.PARAMS, [self._stored[j] for j in leaves])

    def has_statistics(self) -> bool:
        return self.reader.has_item(self._C.STATISTICS)

    def abstract_statistics(self) -> Any:
        return self.reader.abstract(self._C.STATISTICS)

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        E, item = self._E, self._C.STATISTICS
        what = f"the statistics of {self.location}"
        spec = self.reader.structure(item)
        paths = [()] if self._root_array else [self._stored[j] for j in leaves]
        node_specs = [_subspec(spec, p, what) for p in paths]
        full = [
            [p + sub for sub, _ in E.spec_arrays(ns)] if ns["t"] != "array" else [p]
            for p, ns in zip(paths, node_specs, strict=True)
        ]
        flat = self.reader.restore_arrays(item, [q for f in full for q in f])
        nodes, start = [], 0
        for p, ns, f in zip(paths, node_specs, full, strict=True):
            if ns["t"] == "array":
                nodes.append(flat[start])
            else:
                arrays: dict[str, Any] = {}
                for q, a in zip(f, flat[start : start + len(f)], strict=True):
                    E.nested_set(arrays, q[len(p) :], a)
                nodes.append(E.decode(ns, arrays))
            start += len(f)
        return nodes
