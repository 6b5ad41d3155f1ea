"""The merge engine's source for folders Orbax wrote itself (a training run's checkpoints).

:class:`PlainOrbaxSource` finds the parameters in what a training loop saved with Orbax
and the UMTAM statistics in the optimizer state saved beside them, and reads both a few
arrays at a time (:class:`umtam_jax.checkpoint.OrbaxFolderReader`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from umtam_jax import _pytrees
from umtam_jax.checkpoint._orbax_folders import OrbaxFolderReader, shown
from umtam_jax.engine._sources import Source
from umtam_jax.optimizer._statistics import NoUmtamStateError, _is_stat_node, statistics

# The entries of a saved tree that hold the parameters, each with the entries one of which
# must lie beside it (none: it is enough alone). ``model`` counts only beside an optimizer
# state: many models have a submodule of that name.
_OPTIMIZER_KEYS = ("opt_state", "optimizer")
_PARAMETER_KEYS = (("params", ()), ("model", _OPTIMIZER_KEYS))


class _Stored:
    """A leaf of the saved tree: its item, its stored path and its abstract array."""

    __slots__ = ("item", "path", "struct")

    def __init__(self, item: str, path: tuple[str | int, ...], struct: Any):
        self.item, self.path, self.struct = item, path, struct


def _stored_tree(reader: OrbaxFolderReader, item: str) -> Any:
    def stored(keypath: Any, struct: Any) -> _Stored:
        return _Stored(item, tuple(_pytrees.key_name(k) for k in keypath), struct)

    return jax.tree_util.tree_map_with_path(stored, reader.abstract(item))


def _is_value_wrapper(node: Any) -> bool:
    wrapper = isinstance(node, Mapping) and set(node) == {"value"}
    return wrapper and isinstance(node["value"], _Stored)


def _without_value_wrappers(tree: Any) -> Any:
    """A ``flax.nnx`` state as Orbax stores it (every array under a ``value`` key of its
    Variable) with each Variable replaced by its array, as ``nnx.to_pure_dict`` does; any
    other tree unchanged."""
    nodes = jax.tree.leaves(tree, is_leaf=_is_value_wrapper)
    if nodes and all(_is_value_wrapper(n) for n in nodes):
        return jax.tree.map(lambda n: n["value"], tree, is_leaf=_is_value_wrapper)
    return tree


def _unwrapped(tree: Any) -> Any:
    """Each largest subtree of a saved tree that is an nnx state (every array under a
    ``value`` key) unwrapped by :func:`_without_value_wrappers`: an nnx optimizer state
    beside a plain step counter."""
    unwrapped = _without_value_wrappers(tree)
    if unwrapped is not tree:
        return unwrapped
    if isinstance(tree, Mapping):
        return {k: _unwrapped(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unwrapped(v) for v in tree]
    return tree


def _statistics_in(tree: Any) -> tuple[Any, bool] | None:
    """The statistics (leaves :class:`_Stored`) of the UMTAM state in a saved tree, read
    as saved or with its nnx Variables unwrapped, and whether they were; None where it
    holds no UMTAM state.

    Raises:
      ValueError: a state :func:`umtam_jax.statistics` refuses (two for one parameter).
    """
    for wrapped, candidate in ((False, tree), (True, _unwrapped(tree))):
        try:
            return statistics(candidate), wrapped
        except NoUmtamStateError:
            continue
    return None


def _is_stored(node: Any) -> bool:
    return isinstance(node, _Stored)


def _flat(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stored)[0]


def _replaced(tree: Any, part: Any) -> Any:
    """``tree`` with the subtree ``part`` (found by identity) replaced by None."""
    if tree is part:
        return None
    if isinstance(tree, Mapping):
        return {k: _replaced(v, part) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replaced(v, part) for v in tree]
    return tree


def _holds_optimizer(tree: Any) -> bool:
    """Whether a saved tree looks like it holds an optimizer state: an UMTAM state, an
    ``opt_state``/``optimizer`` entry, or Adam-like ``mu`` and ``nu`` moments."""

    def walk(node: Any) -> bool:
        if isinstance(node, Mapping):
            keys = set(map(str, node))
            if keys & set(_OPTIMIZER_KEYS) or {"mu", "nu"} <= keys:
                return True
            return any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)

    try:
        return walk(tree) or _statistics_in(tree) is not None
    except ValueError:  # a UMTAM state statistics() refuses is a state all the same
        return True


def _rekeyed(tree: Any, like: Any) -> Any:
    """``tree`` with each string key that is a number where ``like`` has that number as
    an integer key (and not the string) renamed to the integer."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        new = key
        if isinstance(key, str) and key.isdigit() and key not in like and int(key) in like:
            new = int(key)
        out[new] = _rekeyed(value, like.get(new))
    return out


def _struct(tree: Any) -> Any:
    return jax.tree.map(lambda s: s.struct, tree, is_leaf=_is_stored)


class PlainOrbaxSource(Source):
    """A model saved with Orbax by a training loop, and its UMTAM statistics if the
    optimizer state saved beside it holds an UMTAM state.

    Where the parameters are: the item ``params`` of a step with several items
    (``ocp.args.Composite(params=..., opt_state=...)``); otherwise the one saved tree, or
    its ``params`` entry (a ``{"params": ..., "opt_state": ...}`` dict, a Flax
    ``TrainState``, Linen variables), or its ``model`` entry beside an ``optimizer`` or
    ``opt_state`` one (``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}``).
    ``flax.nnx`` states are read as their pure dicts (``nnx.to_pure_dict``). The
    statistics are those :func:`umtam_jax.statistics` finds in the rest of the saved
    trees (any Optax wrapper, an ``nnx.Optimizer``).

    Args:
      directory: a ``CheckpointManager`` step (``runs/3``) or one of its item folders, or
        a folder written by ``StandardCheckpointer().save``.
      what: how messages name it.

    Attributes:
      reader: the :class:`~umtam_jax.checkpoint.OrbaxFolderReader` of the folder.
      location: the folder's absolute path, as messages give it.
      directory: the folder (an ``epath.Path``): what outputs must stay clear of.
      folder: the same folder, the model's.

    Raises:
      FileNotFoundError: no Orbax checkpoint at ``directory``.
      ValueError: the parameters cannot be told apart (several items, none ``params``; an
        optimizer state in the one tree without a ``params`` entry), or they hold
        something that is not an array.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax, orbax.checkpoint as ocp
      >>> import umtam_jax
      >>> from umtam_jax import engine
      >>> params = {"w": jnp.ones((4, 3))}
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), umtam_jax.umtam(1e-2))
      >>> state = {"params": params, "opt_state": tx.init(params)}
      >>> with ocp.CheckpointManager(tempfile.mkdtemp() + "/run") as manager:
      ...     _ = manager.save(100, args=ocp.args.StandardSave(state))
      ...     manager.wait_until_finished()
      ...     step = manager.directory / "100"
      >>> source = engine.open_source(step, "expert 0's")
      >>> type(source).__name__, source.abstract()["w"].shape, source.has_statistics()
      ('PlainOrbaxSource', (4, 3), True)
      >>> source.read_statistics([0])[0].nu.shape
      (4, 3)

    References:
      Orbax checkpointing, https://orbax.readthedocs.io; Flax NNX checkpointing,
      https://flax.readthedocs.io/en/latest/guides/checkpointing.html
    """

    def __init__(self, directory: str | os.PathLike, what: str):
        try:
            self.reader = OrbaxFolderReader(directory)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cannot read {what} checkpoint {directory}: {err}") from None
        self.location = os.fspath(self.reader.directory)
        self.directory = self.folder = self.reader.directory
        trees = {item: _stored_tree(self.reader, item) for item in self.reader.items}
        params, rest = self._split(trees, what)
        # nnx Variables are saved as {"value": array}: the parameters are read as arrays
        # when the optimizer state beside them (if any) is saved that way too.
        self._statistics, wrapped = self._find_statistics(rest)
        self._params = _without_value_wrappers(params) if wrapped is not False else params
        self._index()
        for key, leaf in zip(self._keys, self._leaves, strict=True):
            if not isinstance(getattr(leaf, "struct", None), jax.ShapeDtypeStruct):
                kind = type(getattr(leaf, "struct", leaf)).__name__
                raise ValueError(
                    f"cannot merge {what} checkpoint {self.location}: its parameter "
                    f"{key} is not an array ({kind})"
                )

    def _index(self) -> None:
        """The parameters' leaves and key strings in flattening order, and the statistics
        node of each key string."""
        flat = _flat(self._params)
        self._leaves = [leaf for _, leaf in flat]
        self._keys = [jax.tree_util.keystr(kp) for kp, _ in flat]
        self._nodes: dict[str, Any] = {}
        if self._statistics is not None:
            nodes = jax.tree_util.tree_flatten_with_path(self._statistics, is_leaf=_is_stat_node)[0]
            self._nodes = {jax.tree_util.keystr(kp): node for kp, node in nodes}

    def _split(self, trees: dict[str, Any], what: str) -> tuple[Any, Any]:
        """(the parameters, the rest of the checkpoint) as trees of :class:`_Stored`."""
        if len(trees) > 1:
            if "params" not in trees:
                raise ValueError(
                    f"cannot merge {what} checkpoint {self.location}: it holds the items "
                    f"{', '.join(repr(i) for i in trees)} and none is 'params': give the folder "
                    "of the item that holds the parameters"
                )
            return trees["params"], {k: v for k, v in trees.items() if k != "params"}
        [tree] = trees.values()
        # The parameters' entry: in the saved tree, or in the one entry of it that holds
        # one ({"state": TrainState}); two such entries (a GAN, EMA weights beside the
        # live ones) are refused.
        if isinstance(tree, Mapping):
            found = _parameters_entry(tree)
            inner = {k: _parameters_entry(v) for k, v in tree.items() if isinstance(v, Mapping)}
            inner = {k: v for k, v in inner.items() if v is not None}
            if found is None and len(inner) > 1:
                raise ValueError(
                    f"cannot merge {what} checkpoint {self.location}: its entries "
                    f"{', '.join(map(repr, inner))} each hold parameters; give a checkpoint "
                    "holding one model"
                )
            params = found if found is not None else next(iter(inner.values()), None)
            if params is not None:
                return params, {"": _replaced(tree, params)}
        if _holds_optimizer(tree):
            keys = f" (its keys: {', '.join(map(str, tree))})" if isinstance(tree, Mapping) else ""
            raise ValueError(
                f"cannot merge {what} checkpoint {self.location}: its saved tree holds an "
                "optimizer state but no 'params' entry, so which part is the parameters is "
                f"unknown{keys}; save them as {{'params': ..., 'opt_state': ...}}"
            )
        return tree, None

    def _find_statistics(self, rest: Any) -> tuple[Any, bool | None]:
        """The statistics tree (leaves :class:`_Stored`) of the UMTAM state in ``rest``
        (or None), and whether it was saved as an nnx state (``{"value": array}``
        Variables; None without one)."""
        if rest is None:
            return None, None
        try:
            found = _statistics_in(rest)
        except ValueError as err:
            raise ValueError(f"the optimizer state of {self.location}: {err}") from None
        return (None, None) if found is None else found

    def align_keys(self, like: Any) -> None:
        """Renames the numeric string keys that ``like`` has as integers to those integers.

        Orbax saves integer keys (the layers of an ``nnx.List``) as strings; the
        parameters and statistics are renamed, and the leaves indexed again.

        Args:
          like: the parameters' pytree of an input that kept its integer keys (a umtam_jax
            checkpoint's :meth:`abstract`), matched key by key from the root.
        """
        self._params = _rekeyed(self._params, like)
        if self._statistics is not None:
            self._statistics = _rekeyed(self._statistics, like)
        self._index()

    def abstract(self) -> Any:
        return _struct(self._params)

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        stored = [self._leaves[j] for j in leaves]
        return self._read_stored(stored)

    def _read_stored(self, stored: list[_Stored]) -> list[np.ndarray]:
        """The arrays of ``stored``, one partial restore per item."""
        out: list[Any] = [None] * len(stored)
        for item in dict.fromkeys(s.item for s in stored):
            positions = [i for i, s in enumerate(stored) if s.item == item]
            arrays = self.reader.read(item, [stored[i].path for i in positions])
            for i, array in zip(positions, arrays, strict=True):
                out[i] = array
        return out

    def has_statistics(self) -> bool:
        return self._statistics is not None

    def abstract_statistics(self) -> Any:
        if self._statistics is None:
            raise ValueError(f"{self.location} holds no UMTAM optimizer state")
        return _struct(self._statistics)

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        nodes = []
        for j in leaves:
            node = self._nodes.get(self._keys[j])
            if node is None or not hasattr(node, "_fields"):
                raise ValueError(
                    f"the optimizer state of {self.location} holds no UMTAM statistics for "
                    f"parameter {self._keys[j]} ({shown(self._leaves[j].path)})"
                )
            nodes.append(node)
        fields = [(n, f) for n in nodes for f in n._fields if getattr(n, f) is not None]
        arrays = iter(self._read_stored([getattr(n, f) for n, f in fields]))
        read = {(id(n), f): next(arrays) for n, f in fields}
        return [
            type(n)(**{f: read.get((id(n), f)) for f in n._fields})  # None stays None
            for n in nodes
        ]


def align_keys(sources: Sequence[Any]) -> None:
    """Gives the plain Orbax inputs of a merge the integer keys another input kept.

    Orbax saves a dict's integer keys (the layers of an ``nnx.List`` or
    ``nnx.Sequential``) as strings; a umtam_jax checkpoint keeps them. Where a merge mixes
    both, each :class:`PlainOrbaxSource` renames its numeric string keys that the first
    umtam_jax checkpoint among ``sources`` has as integers.

    Args:
      sources: the merge's inputs (base, experts and per-expert inputs), any kinds.
    """
    from umtam_jax.engine._sources import OrbaxSource

    like = next((s.abstract() for s in sources if isinstance(s, OrbaxSource)), None)
    if like is None:
        return
    for source in dict.fromkeys(sources):
        if isinstance(source, PlainOrbaxSource):
            source.align_keys(like)


def _parameters_entry(node: Mapping[str, Any]) -> Any:
    """The parameters' entry of a saved mapping (see ``_PARAMETER_KEYS``: an entry beside
    it must hold an optimizer state, not hyper-parameters named alike), or None."""
    for key, beside in _PARAMETER_KEYS:
        if key not in node:
            continue
        if not beside or any(b in node and _holds_optimizer(node[b]) for b in beside):
            return node[key]
    return None
