"""Opening a checkpoint for reading: its directory, its metadata item, its Orbax items.

Every reader (:mod:`~umtam_jax.checkpoint._restore` and the partial
:class:`~umtam_jax.checkpoint._partial_restore.CheckpointReader`) starts here: the directory
is checked (a save killed mid-swap is recovered first), the metadata is read and checked
against the format, and Orbax failures become short :class:`CheckpointCorruptError`
messages naming the checkpoint and item.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _leftovers, _targets
from umtam_jax.checkpoint._closed_loop import drop_closed_loop_callbacks, note_failed_read
from umtam_jax.checkpoint._format import (
    _ORBAX_TMP_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA,
    METADATA_FILE,
    _absolute,
)


def check_directory(directory: str | os.PathLike[str]) -> epath.Path:
    path = _absolute(directory)
    _leftovers.recover(path)  # a save killed in the middle of its swap
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    if not path.is_dir():
        raise ValueError(f"not a checkpoint directory: {path} is a file")
    if _ORBAX_TMP_SUFFIX in path.name:
        raise ValueError(f"incomplete checkpoint (an unfinished Orbax save): {path}")
    return path


def short_error(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    text = text.split(" See full TensorStore details")[0]
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(err).__name__}: {text}"


def restore_items(directory: epath.Path, args: dict[str, Any]) -> dict[str, Any]:
    """Restores the given items; any Orbax failure becomes a short ValueError."""
    for name in args:
        if not (directory / name).exists():
            raise FileNotFoundError(
                f"checkpoint {directory} is missing its item {name!r} ({directory / name} "
                "does not exist): the checkpoint is incomplete or corrupt"
            )
    try:
        drop_closed_loop_callbacks()
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for corrupt files
        note_failed_read(directory)
        names = ", ".join(repr(n) for n in args)
        raise _integrity.CheckpointCorruptError(
            f"cannot restore item(s) {names} of checkpoint {directory}: the checkpoint is "
            f"corrupt or incompatible ({short_error(e)})"
        ) from None
    return {name: restored[name] for name in args}


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads the metadata of a checkpoint written by :func:`save_checkpoint`.

    Args:
      directory: the checkpoint directory.

    Returns:
      The metadata dictionary described in :class:`Checkpoint` (without the internal
      structure records).

    Raises:
      FileNotFoundError: if there is no checkpoint or no metadata item at ``directory``.
      ValueError: if the metadata is corrupt or from an unknown format.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import read_metadata, save_checkpoint
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", {"w": np.ones((4, 3))},
      ...                        metadata={"task": "demo"})
      >>> read_metadata(path)["user"]
      {'task': 'demo'}

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    meta = read_full_metadata(check_directory(directory))
    return {k: v for k, v in meta.items() if k != "structures"}


def _check_metadata_file(directory: epath.Path) -> None:
    """Raises :class:`CheckpointCorruptError` when the metadata file (read by Orbax's
    JSON handler, which reads whatever is there) is a FIFO, a device or larger than
    :data:`._targets.MAX_METADATA_BYTES`; a missing one is left to that read's error."""
    path = directory.joinpath(*METADATA_FILE)
    try:
        _targets.check_regular_file(path, _targets.MAX_METADATA_BYTES)
    except _targets.UnsafeFileError as err:
        raise _integrity.CheckpointCorruptError(
            f"checkpoint {directory} has damaged metadata: {path} {err}"
        ) from None
    except OSError:
        pass  # missing or unreadable: reported by the read


def _is_safetensors_folder(directory: epath.Path) -> bool:
    """Whether ``directory`` holds Hugging Face safetensors weights (``*.safetensors``
    files or a ``model.safetensors.index.json``); listed, not globbed, so that a ``[`` in
    its path does not hide them."""
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return False
    return any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)


def read_full_metadata(directory: epath.Path) -> dict[str, Any]:
    """The checked metadata item of the checkpoint ``directory``.

    Args:
      directory: an existing directory (as :func:`check_directory` returns it).

    Returns:
      The metadata record, its format, version and item structures checked.

    Raises:
      FileNotFoundError: ``directory`` has no metadata item: a safetensors folder (the
        message says how to read it), a plain Orbax checkpoint or an incomplete one.
      ValueError: the metadata is not umtam_jax's, or of a newer format version.
      CheckpointCorruptError: the metadata is damaged.
    """
    if not (directory / METADATA).exists():
        if _is_safetensors_folder(directory):
            raise FileNotFoundError(
                f"{directory} is a Hugging Face safetensors folder, not a umtam_jax "
                "checkpoint: read it with umtam_jax.checkpoint.SafetensorsReader(folder) "
                "(arrays = reader.read(reader.names); tree_from_names(dict(zip(reader.names, "
                "arrays)))), or convert it once with umtam_jax.checkpoint.safetensors_to_orbax("
                "folder, checkpoint_dir) and restore that; the merge engine and umtam-merge "
                "read it as it is"
            )
        raise FileNotFoundError(
            f"{directory} is not a umtam_jax checkpoint or is incomplete: its item "
            f"{METADATA!r} ({directory / METADATA}) does not exist (a plain Orbax "
            "checkpoint, e.g. a CheckpointManager step: restore it with Orbax and write "
            "it once with umtam_jax.checkpoint.save_checkpoint)"
        )
    _check_metadata_file(directory)
    meta = restore_items(directory, {METADATA: ocp.args.JsonRestore()})[METADATA]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{directory / METADATA} is not umtam_jax checkpoint metadata")
    version = meta.get("format_version")
    if not (type(version) is int and version >= 1):  # every version wrote one; not a bool
        raise _integrity.CheckpointCorruptError(
            f"checkpoint {directory} has damaged metadata ({directory / METADATA}): "
            f"format_version {version!r} (a whole number from 1 on)"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory} has format version {meta['format_version']}, newer than "
            f"this library's {FORMAT_VERSION}: upgrade umtam_jax"
        )
    items, structures = meta.get("items"), meta.get("structures")
    try:
        if not (isinstance(items, list) and isinstance(structures, dict)):
            raise ValueError("no list of items with their structures")
        for item in items:
            if item not in structures:
                raise ValueError(f"item {item!r} has no structure")
            try:
                E.check_spec(structures[item])
            except ValueError as err:
                raise ValueError(f"item {item!r}: {err}") from None
    except ValueError as err:
        raise _integrity.CheckpointCorruptError(
            f"checkpoint {directory} has damaged metadata ({directory / METADATA}): {err}"
        ) from None
    _integrity.check_metadata(directory, meta)
    return meta
