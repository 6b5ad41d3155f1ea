"""Reading folders that Orbax wrote itself, a few arrays at a time.

Training runs save with Orbax directly: ``ocp.StandardCheckpointer().save(path, tree)``,
or a ``CheckpointManager`` whose step folders (``runs/3``) hold one folder per item
(``runs/3/default``; ``params`` and ``opt_state`` with ``ocp.args.Composite``).
:class:`OrbaxFolderReader` reads such a folder's PyTree items as they are stored: their
structure from Orbax's metadata (containers as Orbax restores them without a target:
dicts and lists), and chosen arrays with Orbax's partial restore, as NumPy arrays in their
saved dtypes. Nothing is written. A plain Orbax folder carries no checksums: damage that
Orbax itself does not notice cannot be detected (a umtam_jax checkpoint can).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _targets
from umtam_jax.checkpoint._closed_loop import drop_closed_loop_callbacks, note_failed_read
from umtam_jax.checkpoint._format import _ORBAX_TMP_SUFFIX, METADATA, _absolute
from umtam_jax.checkpoint._integrity import CHECKSUMS_FILE, CheckpointCorruptError
from umtam_jax.checkpoint._metadata import short_error

__all__ = ["OrbaxFolderReader", "is_orbax_folder"]

Path = tuple[str | int, ...]

_TREE_METADATA = "_METADATA"  # the file of a PyTree item folder that describes its tree


# The file Orbax writes into every folder it saves (umtam_jax checkpoints included).
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Files only umtam_jax checkpoints hold (a checkpoint that lost its metadata item is
# still ours: its own reader names what is missing).
_OURS = (METADATA, CHECKSUMS_FILE, _targets._CONTENTS_FILE)


def _is_tree_item(path: epath.Path) -> bool:
    return (path / _TREE_METADATA).is_file()


def _is_ours(folder: epath.Path) -> bool:
    """Whether ``folder`` is a umtam_jax checkpoint (its own files, whole or not)."""
    return any((folder / name).exists() for name in _OURS)


def _resolved(path: epath.Path) -> epath.Path:
    """``path`` with its links resolved (a remote path as it is)."""
    return epath.Path(os.path.realpath(path)) if "://" not in str(path) else path


def is_orbax_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder Orbax wrote that is not a umtam_jax checkpoint.

    Args:
      path: a folder: a PyTree item (it holds Orbax's ``_METADATA``), a step of a
        ``CheckpointManager`` (a folder of such items) or the manager's folder (of steps;
        :class:`OrbaxFolderReader` refuses it, naming its steps).

    Returns:
      True for such a folder; False otherwise (a umtam_jax checkpoint, which has its own
      reader; a missing path; a file).

    Example:
      >>> import tempfile, numpy as np, orbax.checkpoint as ocp
      >>> from umtam_jax.checkpoint import is_orbax_folder
      >>> path = tempfile.mkdtemp() + "/run"
      >>> with ocp.StandardCheckpointer() as ckptr:
      ...     ckptr.save(path, {"w": np.ones(3, "f4")})
      >>> is_orbax_folder(path), is_orbax_folder(tempfile.mkdtemp())
      (True, False)
    """
    return _kind(epath.Path(path)) is not None


def _kind(folder: epath.Path, depth: int = 0) -> str | None:
    """``"item"`` (a PyTree item: Orbax's ``_METADATA``), ``"step"`` (a saved folder of
    items: ``_CHECKPOINT_METADATA`` and item subfolders) or ``"manager"`` (a folder of
    steps) for a folder Orbax wrote and umtam_jax did not, else None."""
    try:
        if not folder.is_dir():
            return None
        if _is_ours(folder) or _is_ours(folder.parent):  # a umtam_jax checkpoint or item
            return None
        if _is_tree_item(folder):
            return "item"
        if (folder / _STEP_METADATA).is_file():
            if any(c.is_dir() and _is_tree_item(c) for c in folder.iterdir()):
                return "step"
        elif depth == 0 and any(_kind(c, 1) == "step" for c in folder.iterdir()):
            return "manager"
    except OSError:
        pass
    return None


_STEP_NAME = re.compile(r"(?:(.*)_)?(\d+)")  # a CheckpointManager's step: [prefix_]number


def orbax_conflict(path: epath.Path) -> str | None:
    """Why writing a folder at ``path`` would hand it to Orbax, or None.

    Refused: a path inside a checkpoint Orbax saved (an item or a step, which Orbax
    replaces and deletes whole, a ``CheckpointManager``'s steps past ``max_to_keep``;
    not a umtam_jax checkpoint, whose overwrite keeps what it did not write), links
    resolved; and a step's name (``7``, ``checkpoint_7``) beside the steps of a
    ``CheckpointManager``, which would take the folder for one of its steps (a resumed
    run would restore it). Only the parents are looked at, and the siblings of a
    step-like name.

    Example:
      >>> import tempfile, numpy as np, orbax.checkpoint as ocp
      >>> from etils import epath
      >>> from umtam_jax.checkpoint._orbax_folders import orbax_conflict
      >>> run = epath.Path(tempfile.mkdtemp()) / "run"
      >>> with ocp.CheckpointManager(run) as manager:
      ...     _ = manager.save(0, args=ocp.args.StandardSave({"w": np.ones(2, "f4")}))
      >>> orbax_conflict(run / "merged") is None, orbax_conflict(run / "1") is not None
      (True, True)
      >>> "inside" in orbax_conflict(run / "0" / "merged")
      True
    """
    for parents in (path.parents, _resolved(path).parents):
        for parent in reversed(parents):  # the outermost first
            if _is_ours(parent):
                break  # a umtam_jax checkpoint: its overwrite keeps what it did not write
            if (parent / _STEP_METADATA).is_file() or _is_tree_item(parent):
                return (
                    f"it would lie inside the Orbax checkpoint {parent}, which Orbax "
                    "replaces and deletes whole"
                )
    step = _STEP_NAME.fullmatch(path.name)
    if step is None:
        return None
    try:
        siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:  # a folder one may write into but not list: no steps to see
        return None
    for sibling in siblings:
        other = _STEP_NAME.fullmatch(sibling.name)
        if other and other.group(1) == step.group(1) and _kind(sibling, 1) == "step":
            return (
                "its name is that of a step of the CheckpointManager whose steps lie beside "
                f"it ({sibling}), which would take it for one (a resumed run would restore "
                "it, max_to_keep would delete it)"
            )
    return None


def _unfinished(path: epath.Path) -> epath.Path | None:
    """The folder of ``path`` (itself or a parent, links resolved) that is an unfinished
    Orbax save (a temporary folder), or None."""
    resolved = _resolved(path)
    for folder in (path, *path.parents, resolved, *resolved.parents):
        if _ORBAX_TMP_SUFFIX in folder.name:
            return folder
    return None


def _leaf_struct(meta: Any) -> Any:
    """Orbax's metadata of one leaf as a ``jax.ShapeDtypeStruct``; other leaves (strings)
    are returned as they are."""
    if isinstance(meta, ocp.metadata.ArrayMetadata | ocp.metadata.ScalarMetadata):
        return jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
    return meta


def _template(node: Any, paths: list[Path]) -> Any:
    """The partial-restore target holding only ``paths`` below ``node``: mappings keep the
    keys asked for, lists keep their length with ``None`` where nothing is asked."""
    if paths == [()]:
        return 0
    heads: dict[Any, list[Path]] = {}
    for p in paths:
        heads.setdefault(p[0], []).append(p[1:])
    if isinstance(node, list):
        return [_template(node[i], heads[i]) if i in heads else None for i in range(len(node))]
    return {k: _template(node[k], rest) for k, rest in heads.items()}


def shown(path: Path) -> str:
    """A stored path as messages show it, ``a/0/kernel``."""
    return "/".join(map(str, path))


class OrbaxFolderReader:
    """Reads the PyTree items of a folder Orbax wrote, a few arrays at a time.

    Args:
      directory: a PyTree item folder (``StandardCheckpointer().save(path, tree)``, or a
        step's item such as ``runs/3/default``) or a ``CheckpointManager`` step folder.

    Attributes:
      directory: ``directory``, absolute (an ``epath.Path``).
      items: the names of its PyTree items, the ``item`` that :meth:`abstract` and
        :meth:`read` take: ``("",)`` for a PyTree item folder itself, else a step's item
        folders by name (``("opt_state", "params")``).

    Raises:
      FileNotFoundError: ``directory`` does not exist or holds no PyTree item.
      ValueError: an unfinished save (Orbax's temporary folder), a file, or metadata
        Orbax cannot read (:class:`CheckpointCorruptError`).

    Example:
      >>> import tempfile, numpy as np, orbax.checkpoint as ocp
      >>> from umtam_jax.checkpoint import OrbaxFolderReader
      >>> path = tempfile.mkdtemp() + "/run"
      >>> with ocp.StandardCheckpointer() as ckptr:
      ...     ckptr.save(path, {"dense": {"kernel": np.ones((4, 3), "f4")}})
      >>> reader = OrbaxFolderReader(path)
      >>> reader.items, reader.abstract("")["dense"]["kernel"].shape
      (('',), (4, 3))
      >>> [kernel] = reader.read("", [("dense", "kernel")])
      >>> float(kernel.sum())
      12.0

    References:
      Orbax checkpointing, https://orbax.readthedocs.io (partial restore)
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = _absolute(directory)
        unfinished = _unfinished(self.directory)
        if unfinished is not None:
            raise ValueError(
                f"{self.directory} is part of an unfinished Orbax save ({unfinished} is a "
                "temporary folder)"
            )
        if not self.directory.exists():
            raise FileNotFoundError(f"{self.directory} does not exist")
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory} is a file, not an Orbax checkpoint folder")
        kind = _kind(self.directory)
        if kind == "item":
            folders = {"": self.directory}
        elif kind == "step":
            folders = {
                c.name: c
                for c in sorted(self.directory.iterdir())
                if c.is_dir() and _ORBAX_TMP_SUFFIX not in c.name and _is_tree_item(c)
            }
        elif kind == "manager":
            steps = sorted(
                (
                    c.name
                    for c in self.directory.iterdir()
                    if _ORBAX_TMP_SUFFIX not in c.name and _kind(c, 1) == "step"
                ),
                key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name),
            )
            raise FileNotFoundError(
                f"{self.directory} is a CheckpointManager's folder, not one of its "
                f"checkpoints: give one of its steps ({', '.join(steps)})"
            )
        else:
            raise FileNotFoundError(
                f"{self.directory} is not an Orbax checkpoint (no {_TREE_METADATA} file in it, "
                f"nor {_STEP_METADATA} and folders holding one; a umtam_jax checkpoint has "
                "its own reader)"
            )
        self._folders = folders
        self.items = tuple(folders)
        self._trees: dict[str, Any] = {}
        self._handler = ocp.PyTreeCheckpointHandler()

    def _where(self, item: str) -> str:
        return f"Orbax checkpoint {self.directory}" + (f" (item {item!r})" if item else "")

    def _tree(self, item: str) -> Any:
        """Orbax's metadata tree of ``item`` (read once)."""
        if item not in self._trees:
            folder = self._folders[item]
            try:
                _targets.check_regular_file(folder / _TREE_METADATA, _targets.MAX_METADATA_BYTES)
                self._trees[item] = self._handler.metadata(folder).tree
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for bad files
                raise CheckpointCorruptError(
                    f"cannot read the metadata of {self._where(item)}: the checkpoint is damaged "
                    f"or incompatible ({short_error(e)})"
                ) from None
        return self._trees[item]

    def abstract(self, item: str) -> Any:
        """An item's structure, read from Orbax's metadata alone.

        Args:
          item: one of :attr:`items`.

        Returns:
          The item's tree, dicts and lists as Orbax restores them, with a
          ``jax.ShapeDtypeStruct`` for each array or scalar and Orbax's own metadata for
          other leaves (strings).

        Raises:
          KeyError: ``item`` is not one of :attr:`items`.
          CheckpointCorruptError: metadata Orbax cannot read (a ``ValueError``).
        """
        return jax.tree.map(_leaf_struct, self._tree(item))

    def read(self, item: str, paths: Sequence[Path]) -> list[np.ndarray]:
        """Reads only the arrays at ``paths`` (keys and list positions inside ``item``).

        Args:
          item: one of :attr:`items`.
          paths: the arrays' paths in :meth:`abstract`'s tree, e.g. ``("dense", "kernel")``
            or ``("layers", 0, "w")``.

        Returns:
          One NumPy array per path, in its saved dtype and shape.

        Raises:
          KeyError: ``item`` is not one of :attr:`items`.
          ValueError: a path that is no array of the item.
          CheckpointCorruptError: Orbax cannot read an array, or reads one of another
            shape or dtype than its metadata says.
        """
        if not paths:
            return []
        tree = self._tree(item)
        expected = []
        for path in paths:
            try:
                leaf = _leaf_struct(E.nested_get(tree, path))
            except (KeyError, IndexError, TypeError):
                leaf = None
            if not isinstance(leaf, jax.ShapeDtypeStruct):
                raise ValueError(f"{self._where(item)} has no array {shown(path)}")
            expected.append(leaf)
        target = _template(tree, list(dict.fromkeys(map(tuple, paths))))
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            drop_closed_loop_callbacks()
            restored = self._handler.restore(
                self._folders[item],
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
            arrays = [np.asarray(E.nested_get(restored, path)) for path in paths]
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for corrupt files
            note_failed_read(self._folders[item])
            names = ", ".join(shown(p) for p in paths[:3])
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            raise CheckpointCorruptError(
                f"cannot read {names}{more} of {self._where(item)}: the checkpoint is "
                f"damaged or incompatible ({short_error(e)})"
            ) from None
        for path, array, leaf in zip(paths, arrays, expected, strict=True):
            if array.shape != leaf.shape or array.dtype != leaf.dtype:
                raise CheckpointCorruptError(
                    f"{self._where(item)} holds {shown(path)} as {array.dtype}{list(array.shape)}"
                    f", its metadata says {leaf.dtype}{list(leaf.shape)}: the checkpoint is "
                    "damaged"
                )
        return arrays
