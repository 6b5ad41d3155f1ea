"""Partial restore: chosen arrays of one checkpoint item, read without the rest.

:class:`CheckpointReader` restores chosen arrays of one item (``params``,
``statistics``, ...) with Orbax's partial restore
(``ocp.args.PyTreeRestore(item=..., partial_restore=True)`` on the item directory): only
the requested arrays are read, as NumPy arrays on the host, so a model larger than host
memory is processed a few arrays at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _keys, _metadata
from umtam_jax.checkpoint._closed_loop import drop_closed_loop_callbacks, note_failed_read

__all__ = ["CheckpointReader"]

Path = tuple[str, ...]


class CheckpointReader:
    """Restores a few arrays at a time from a checkpoint written by this package.

    Args:
      directory: the checkpoint directory.
      verify: check every array read against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Attributes:
      directory: the checkpoint directory, absolute (an ``epath.Path``).
      metadata: the checkpoint's metadata, without the items' structure records.

    Raises:
      FileNotFoundError: no checkpoint (or no metadata) at ``directory``.
      ValueError: the directory is not a complete umtam_jax checkpoint.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from umtam_jax.checkpoint import CheckpointReader, save_checkpoint
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> reader = CheckpointReader(save_checkpoint(tempfile.mkdtemp() + "/ckpt", params))
      >>> reader.abstract("params")["dense"]["kernel"].shape
      (4, 3)
      >>> [kernel] = reader.restore_arrays("params", [("dense", "kernel")])
      >>> float(kernel.sum())
      12.0

    References:
      Orbax checkpointing, https://orbax.readthedocs.io (partial restore)
    """

    def __init__(self, directory: str | os.PathLike[str], *, verify: bool = True):
        self.directory = _metadata.check_directory(directory)
        self._meta = _metadata.read_full_metadata(self.directory)
        self._handler = ocp.PyTreeCheckpointHandler()
        self._records = (
            _integrity.read(self.directory, self._meta.get("format_version", 1)) if verify else None
        )
        for item, spec in self._meta.get("structures", {}).items():
            leaves = {_integrity.key(p): leaf for p, leaf in E.spec_arrays(spec)}
            _integrity.check_spec(self.directory, item, leaves, self._records)

    @property
    def metadata(self) -> dict[str, Any]:
        """The checkpoint's metadata, without the items' structure records (as
        :func:`~umtam_jax.checkpoint.read_metadata` gives it)."""
        return {k: v for k, v in self._meta.items() if k != "structures"}

    def has_item(self, item: str) -> bool:
        """Whether the checkpoint holds an item.

        Args:
          item: the item name (``"params"``, ``"statistics"``, ...).

        Returns:
          True when the checkpoint's metadata records that item.
        """
        return item in self._meta.get("structures", {})

    def structure(self, item: str) -> dict[str, Any]:
        """The JSON structure record of an item, as saved (see ``_encoding.encode``).

        Args:
          item: the item name.

        Returns:
          The record: ``{"t": kind, ...}`` with ``"children"`` entries ``[stored name,
          key kind, child record(, original name)]`` for containers, ``"shape"`` and
          ``"dtype"`` for an array, ``"impl"`` for a typed PRNG key.

        Raises:
          FileNotFoundError: the checkpoint has no such item.
        """
        structures = self._meta.get("structures", {})
        if item not in structures:
            raise FileNotFoundError(
                f"checkpoint {self.directory} has no {item!r} item (saved items: "
                f"{', '.join(sorted(structures)) or 'none'})"
            )
        return structures[item]

    def _check_keys(self, item: str, under: Sequence[Path] = ((),)) -> None:
        """Raises ValueError, naming the leaf, for a typed PRNG key (at or below one of the
        stored paths ``under``) of an implementation this JAX cannot rebuild: checked
        before a decode would fail inside JAX."""
        for path, impl in E.spec_keys(self.structure(item)).items():
            if any(path[: len(p)] == tuple(p) for p in under):
                what = f"checkpoint {self.directory}'s {item} leaf {E.display_path(path)}"
                _keys.check_impl(impl, what)

    def abstract(self, item: str) -> Any:
        """An item's structure, read from the metadata alone.

        Args:
          item: the item name.

        Returns:
          The item's pytree (as restored without target) with ``jax.ShapeDtypeStruct``
          leaves (of a key dtype for typed PRNG keys).

        Raises:
          FileNotFoundError: the checkpoint has no such item.
          ValueError: a typed PRNG key of an implementation this JAX cannot rebuild.
        """
        self._check_keys(item)
        spec = self.structure(item)
        arrays: dict[str, Any] = {}
        for path, leaf in E.spec_arrays(spec):
            E.nested_set(
                arrays, path, jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
            )
        return E.decode(spec, arrays)

    def leaf_paths(self, item: str) -> list[Path]:
        """The stored paths of an item's arrays, in the restored tree's flattening order.

        Args:
          item: the item name.

        Returns:
          One stored path per array, in the order of
          ``jax.tree.leaves(reader.abstract(item))``: what :meth:`restore_arrays` takes.

        Raises:
          FileNotFoundError: the checkpoint has no such item.
        """
        spec = self.structure(item)
        stored = [path for path, _ in E.spec_arrays(spec)]
        index_tree: dict[str, Any] = {}
        for i, path in enumerate(stored):
            E.nested_set(index_tree, path, i)
        return [stored[i] for i in jax.tree.leaves(E.decode(spec, index_tree))]

    def restore_subtrees(self, item: str, paths: Sequence[Path]) -> list[Any]:
        """Restores the subtrees of an item at some stored paths, reading only their arrays.

        Args:
          item: the item name.
          paths: stored paths of subtrees (or arrays) inside ``item``, e.g. those of
            :meth:`leaf_paths` for the statistics nodes of the parameters' leaves.

        Returns:
          The decoded subtree at each path (an array, or e.g. a statistics NamedTuple),
          arrays as NumPy arrays; typed PRNG keys rebuilt from their key data (as
          ``jax.Array`` key arrays).

        Raises:
          FileNotFoundError: the checkpoint has no such item.
          ValueError: a path not in the checkpoint, a typed PRNG key of an implementation
            this JAX cannot rebuild; as :meth:`restore_arrays`.
        """
        self._check_keys(item, paths)
        spec = self.structure(item)
        subspecs = []
        for path in paths:
            sub = spec
            for name in path:
                children = {c[0]: c[2] for c in sub.get("children", [])}
                if name not in children:
                    raise ValueError(
                        f"checkpoint {self.directory} has no entry {E.display_path(path)} in its "
                        f"{item!r} item"
                    )
                sub = children[name]
            subspecs.append(sub)
        leaf_nodes = ("array", "key")  # one stored array: a typed key's is its key data
        full = [
            [tuple(p)] if sub["t"] in leaf_nodes else [tuple(p) + q for q, _ in E.spec_arrays(sub)]
            for p, sub in zip(paths, subspecs, strict=True)
        ]
        flat = self.restore_arrays(item, [q for f in full for q in f])
        out, start = [], 0
        for p, sub, f in zip(paths, subspecs, full, strict=True):
            if sub["t"] in leaf_nodes:
                out.append(E.decode(sub, flat[start]))  # the array; a key rebuilt from it
            else:
                arrays: dict[str, Any] = {}
                for q, a in zip(f, flat[start : start + len(f)], strict=True):
                    E.nested_set(arrays, q[len(p) :], a)
                out.append(E.decode(sub, arrays))
            start += len(f)
        return out

    def restore_arrays(self, item: str, paths: Sequence[Path]) -> list[np.ndarray]:
        """Reads only the arrays at ``paths`` (stored paths inside ``item``) from disk.

        Args:
          item: the item name.
          paths: stored paths, e.g. ``("dense", "kernel")`` (as yielded by
            ``_encoding.spec_arrays``).

        Returns:
          One NumPy array per path, dtypes as saved. A typed PRNG key leaf is stored as its
          key data, and comes back as that ``uint32`` data (``jax.random.key_data``):
          ``jax.random.wrap_key_data(data, impl=...)`` with the implementation named in
          :meth:`structure` (``{"t": "key", "impl": ...}``) rebuilds the key, as
          :meth:`restore_subtrees` does.

        Raises:
          FileNotFoundError: missing item.
          CheckpointCorruptError: an array differs from what was saved (a ``ValueError``).
          CheckpointBusyError: a save replaced the checkpoint since this reader opened it
            (an ``OSError``): open a new reader.
          ValueError: a path not in the checkpoint, or a corrupt checkpoint.
        """
        spec = self.structure(item)
        if not paths:
            return []
        saved = {path for path, _ in E.spec_arrays(spec)}
        for path in paths:
            if tuple(path) not in saved:
                raise ValueError(
                    f"checkpoint {self.directory} has no array {E.display_path(path)} in its "
                    f"{item!r} item"
                )
        target: dict[str, Any] = {}
        restore_args: dict[str, Any] = {}
        for path in paths:
            E.nested_set(target, tuple(path), 0)
            E.nested_set(restore_args, tuple(path), ocp.RestoreArgs(restore_type=np.ndarray))
        try:
            drop_closed_loop_callbacks()
            restored = self._handler.restore(
                self.directory / item,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for corrupt files
            note_failed_read(self.directory / item)
            _integrity.raise_if_replaced(self.directory, self._meta, self._records)
            shown = ", ".join(E.display_path(tuple(map(str, p))) for p in paths[:3])
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            raise _integrity.CheckpointCorruptError(
                f"cannot restore {shown}{more} of item {item!r} of checkpoint "
                f"{self.directory}: the checkpoint is corrupt or incompatible "
                f"({_metadata.short_error(e)})"
            ) from None
        arrays = [np.asarray(E.nested_get(restored, tuple(path))) for path in paths]
        try:
            for path, array in zip(paths, arrays, strict=True):
                k = _integrity.key(path)
                _integrity.verify(self.directory, item, k, array, self._records)
        except _integrity.CheckpointCorruptError:
            _integrity.raise_if_replaced(self.directory, self._meta, self._records)
            raise
        return arrays


# --------------------------------------------------------------------------------------
# Incremental write
