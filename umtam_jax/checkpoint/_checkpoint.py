"""Orbax checkpoints of parameters, UMTAM merging statistics and optimizer state.

Layout of one checkpoint directory (an Orbax composite checkpoint, published at its path
only once complete: see :mod:`umtam_jax.checkpoint._safety`)::

    <directory>/
      umtam_metadata/        JSON: format and library versions, the structure of every
                             item, the statistics' node kinds, the user's metadata
      params/                Orbax PyTree item: the parameters
      statistics/            Orbax PyTree item: the merging statistics, if any
      opt_state/             Orbax PyTree item: the full optimizer state, if saved
      umtam_checksums.json   dtype, shape and CRC-32 of every array (:mod:`_integrity`)

Each item is stored as nested dicts of its arrays plus a JSON record of its exact
structure (:mod:`umtam_jax.checkpoint._encoding`). A ``flax.nnx`` Variable is stored as
the array it wraps: ``nnx.state(model, nnx.Param)`` then saves under the same paths as the
statistics of the ``nnx.Optimizer`` that trained it, and restores into Variables when
passed as the ``target``.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _safety
from umtam_jax.optimizer import _state

FORMAT_NAME = _safety._FORMAT_NAME
# 2: stored names escape '%', '.' and '/'; arrays have checksums (_integrity).
FORMAT_VERSION = 2

PARAMS = "params"
STATISTICS = "statistics"
OPT_STATE = "opt_state"
METADATA = "umtam_metadata"
_ARRAY_ITEMS = (PARAMS, STATISTICS, OPT_STATE)

# Orbax's suffix for the temporary directory of an in-progress save (AtomicRenameTemporaryPath).
_ORBAX_TMP_SUFFIX = _safety._ORBAX_TMP_SUFFIX


class Checkpoint(NamedTuple):
    """Everything :func:`restore_checkpoint` read from one checkpoint directory.

    Attributes:
      params: the parameters.
      statistics: the merging statistics (leaves :class:`FactoredStatistics` /
        :class:`DenseStatistics` / ``optax.MaskedNode``), or ``None`` if none were saved.
      opt_state: the optimizer state, or ``None`` when no ``opt_state_target`` was given or
        no optimizer state was saved.
      metadata: the checkpoint's metadata dictionary: ``format``, ``format_version``,
        ``library_version``, ``orbax_version``, ``jax_version``, ``created`` (UTC ISO time),
        ``items`` (the array items present), ``statistics_kinds`` (counts and per-path kinds
        of the statistics nodes, or ``None``) and ``user`` (the ``metadata`` given to
        :func:`save_checkpoint`, or ``None``).
    """

    params: Any
    statistics: Any
    opt_state: Any
    metadata: dict[str, Any]


# --------------------------------------------------------------------------------------
# Statistics node kinds
# --------------------------------------------------------------------------------------


def _statistics_kinds(stats: Any) -> dict[str, Any]:
    def is_node(x):
        return _state.is_leaf_statistics(x) or x is None or isinstance(x, optax.MaskedNode)

    kinds: dict[str, str] = {}

    def record(path, node):
        if isinstance(node, _state.FactoredStatistics):
            kind = "factored"
        elif isinstance(node, _state.DenseStatistics):
            kind = "dense"
        elif isinstance(node, optax.MaskedNode):
            kind = "masked"
        elif node is None:
            kind = "none"
        else:
            kind = "array"
        kinds[jax.tree_util.keystr(path)] = kind

    jax.tree_util.tree_map_with_path(record, stats, is_leaf=is_node)
    counts: dict[str, int] = {}
    for kind in kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"counts": counts, "paths": kinds}


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


def _library_version() -> str:
    try:
        return importlib.metadata.version("umtam-jax")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _composite_handler() -> ocp.CompositeCheckpointHandler:
    # Item directories are created synchronously: with Orbax's default (a background
    # thread) a failed save could recreate the temporary directory after its cleanup.
    options = ocp.CompositeOptions(
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)
    )
    return ocp.CompositeCheckpointHandler(composite_options=options)


def _user_metadata(metadata: Mapping[str, Any] | None) -> Any:
    if metadata is None:
        return None
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None


def _metadata_record(
    encoded: Mapping[str, E.Encoded], stats_kinds: Any, user: Any
) -> dict[str, Any]:
    """The ``umtam_metadata`` item of a checkpoint holding the ``encoded`` items."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "orbax_version": importlib.metadata.version("orbax-checkpoint"),
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "items": [name for name, enc in encoded.items() if enc.leaves],
        "structures": {name: enc.spec for name, enc in encoded.items()},
        "statistics_kinds": stats_kinds,
        "user": user,
    }


def _checksums(enc: E.Encoded) -> dict[str, Any]:
    """Checksum records of an encoded item's arrays (see :mod:`_integrity`)."""
    records = {}
    for path, leaf in zip(enc.paths, enc.leaves, strict=True):
        host = _integrity.host_array(leaf)
        if host is not None:
            records[_integrity.key(path)] = _integrity.record(host)
    return records


def _write(path: epath.Path, items: dict[str, E.Encoded], metadata: dict[str, Any]) -> None:
    """One synchronous Orbax composite save to ``path`` (which must not exist), checksums."""
    args = {name: ocp.args.StandardSave(enc.arrays) for name, enc in items.items()}
    args[METADATA] = ocp.args.JsonSave(metadata)
    with ocp.Checkpointer(_composite_handler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(**args))
    if jax.process_index() == 0:
        _integrity.write(path, {name: _checksums(enc) for name, enc in items.items()})


def save_checkpoint(
    directory: str | epath.PathLike,
    params: Any,
    *,
    opt_state: Any = None,
    statistics: Any = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> epath.Path:
    """Saves parameters, UMTAM merging statistics and (optionally) the optimizer state.

    Everything goes into one Orbax composite checkpoint ``directory`` with separate items
    (``params``, ``statistics``, ``opt_state``, ``umtam_metadata``) that can each be restored
    alone. Every array's dtype, shape and CRC-32 are recorded; restores verify them.

    The save is synchronous and atomic: the checkpoint is written completely under a
    hidden sibling name and then renamed to ``directory`` (or, with ``overwrite=True``,
    swapped atomically with the old checkpoint), so a failed or killed save leaves the
    old state at ``directory``. Only an existing umtam_jax checkpoint is ever replaced —
    never a file or another folder — and a second save to the same path while one runs
    fails at once with :class:`CheckpointBusyError`. The inputs are never modified.

    Args:
      directory: the checkpoint directory to create (local path or any ``etils.epath``
        path Orbax supports).
      params: the parameter pytree (dicts, lists, tuples, NamedTuples or any registered
        pytree node, with array or scalar leaves; any dtype, including bfloat16).
      opt_state: the optimizer state. When given it is saved in full (for resuming) and,
        unless ``statistics`` is given, the merging statistics are extracted from it with
        :func:`umtam_jax.statistics`; an optimizer state without any UMTAM state (e.g. an
        AdamW baseline) is saved without statistics.
      statistics: the merging statistics to save (a statistics pytree, or an optimizer
        state to extract them from). Overrides the extraction from ``opt_state``.
      overwrite: replace an existing ``directory``. Off by default.
      metadata: a JSON-serialisable mapping stored with the checkpoint (e.g. the task name,
        step, hyper-parameters); returned as ``metadata["user"]`` on restore.

    Returns:
      The checkpoint directory as an ``epath.Path``.

    Raises:
      FileExistsError: if ``directory`` is a checkpoint and ``overwrite`` is False.
      CheckpointBusyError: another save to ``directory`` is in progress.
      TypeError: if ``metadata`` is not JSON-serialisable, or a tree holds a leaf that is
        not an array or scalar.
      ValueError: if ``statistics`` holds no UMTAM statistics, or ``directory`` is a
        symbolic link, a file or a folder that is not a umtam_jax checkpoint.
      NotADirectoryError: a parent of ``directory`` is a file.

    Example:
      >>> import jax.numpy as jnp, umtam_jax
      >>> from umtam_jax.checkpoint import save_checkpoint, restore_statistics
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2)
      >>> path = save_checkpoint("/tmp/ckpt_doc", params, opt_state=opt.init(params),
      ...                        metadata={"task": "demo"}, overwrite=True)
      >>> restore_statistics(path)["w"].nu.shape
      (4, 3)
    """
    from umtam_jax.optimizer import _statistics  # the optimizer package imports lazily

    directory = _absolute(directory)
    _safety.check_target(directory, overwrite=overwrite)

    # Everything is validated before anything is written.
    if statistics is None and opt_state is not None:
        try:
            stats = _statistics.statistics(opt_state)
        except ValueError:  # no UMTAM state inside: save without statistics
            stats = None
    elif statistics is not None:
        stats = _statistics.statistics(statistics)
    else:
        stats = None

    trees = {PARAMS: params, STATISTICS: stats, OPT_STATE: opt_state}
    encoded = {name: E.encode(tree, name) for name, tree in trees.items() if tree is not None}
    kinds = _statistics_kinds(stats) if stats is not None else None
    meta = _metadata_record(encoded, kinds, _user_metadata(metadata))
    # Orbax does not store empty trees: items without arrays live in the metadata only.
    items = {name: enc for name, enc in encoded.items() if enc.leaves}
    with _safety.publishing(directory, overwrite=overwrite) as staging:
        _write(staging, items, meta)
    return directory


# --------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------


def _absolute(directory: str | epath.PathLike) -> epath.Path:
    directory = epath.Path(directory)
    return directory if directory.is_absolute() else epath.Path(directory.absolute())


def _check_directory(directory: str | epath.PathLike) -> epath.Path:
    directory = _absolute(directory)
    if not directory.exists():
        _safety.recover(directory)  # a save killed in the middle of its swap
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise ValueError(f"not a checkpoint directory: {directory} is a file")
    if _ORBAX_TMP_SUFFIX in directory.name:
        raise ValueError(f"incomplete checkpoint (an unfinished Orbax save): {directory}")
    return directory


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    text = text.split(" See full TensorStore details")[0]
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(err).__name__}: {text}"


def _restore_items(directory: epath.Path, args: dict[str, Any]) -> dict[str, Any]:
    """Restores the given items; any Orbax failure becomes a short ValueError."""
    for name in args:
        if not (directory / name).exists():
            raise FileNotFoundError(
                f"checkpoint {directory} is missing its item {name!r} ({directory / name} "
                "does not exist): the checkpoint is incomplete or corrupt"
            )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for corrupt files
        names = ", ".join(repr(n) for n in args)
        raise _integrity.CheckpointCorruptError(
            f"cannot restore item(s) {names} of checkpoint {directory}: the checkpoint is "
            f"corrupt or incompatible ({_short(e)})"
        ) from None
    return {name: restored[name] for name in args}


def read_metadata(directory: str | epath.PathLike) -> dict[str, Any]:
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
      >>> read_metadata("/tmp/ckpt_doc")["user"]  # doctest: +SKIP
      {'task': 'demo'}
    """
    meta = _read_full_metadata(_check_directory(directory))
    return {k: v for k, v in meta.items() if k != "structures"}


def _read_full_metadata(directory: epath.Path) -> dict[str, Any]:
    if not (directory / METADATA).exists():
        raise FileNotFoundError(
            f"{directory} is not a umtam_jax checkpoint or is incomplete: its item "
            f"{METADATA!r} ({directory / METADATA}) does not exist"
        )
    meta = _restore_items(directory, {METADATA: ocp.args.JsonRestore()})[METADATA]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{directory / METADATA} is not umtam_jax checkpoint metadata")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory} has format version {meta['format_version']}, newer than "
            f"this library's {FORMAT_VERSION}: upgrade umtam_jax"
        )
    return meta


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_leaf(leaf: dict[str, Any], sharding: jax.sharding.Sharding | None) -> Any:
    """What Orbax restores one saved array as: its saved dtype, so it can be verified.

    A 64-bit array JAX cannot hold (``jax_enable_x64`` off) is read as NumPy first.
    """
    dtype = np.dtype(leaf["dtype"])
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        return np.zeros((), dtype)  # a NumPy placeholder: restored as np.ndarray
    return jax.ShapeDtypeStruct(
        tuple(leaf["shape"]), dtype, sharding=sharding or _default_sharding()
    )


def _match_target(
    directory: epath.Path, item: str, saved_spec: dict[str, Any], target: Any
) -> E.Encoded:
    """Checks ``target`` against the saved structure and shapes; returns its encoding."""
    enc = E.encode(target, f"{item} target")
    saved = {path: leaf for path, leaf in E.spec_arrays(saved_spec)}
    wanted = {path: E.leaf_spec(x) for path, x in zip(enc.paths, enc.leaves, strict=True)}
    problems = []
    for path in wanted.keys() - saved.keys():
        problems.append(f"{'/'.join(path)}: in the target but not in the checkpoint")
    for path in saved.keys() - wanted.keys():
        problems.append(f"{'/'.join(path)}: in the checkpoint but not in the target")
    for path in wanted.keys() & saved.keys():
        if wanted[path]["shape"] != saved[path]["shape"]:
            problems.append(
                f"{'/'.join(path)}: shape {tuple(saved[path]['shape'])} in the checkpoint, "
                f"{tuple(wanted[path]['shape'])} in the target"
            )
    if problems:
        shown = "; ".join(sorted(problems)[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(
            f"the {item} target does not match checkpoint {directory / item}: {shown}{more}"
        )
    return enc


def _restore_array_items(
    directory: epath.Path,
    meta: dict[str, Any],
    items: list[str],
    targets: Mapping[str, Any],
    *,
    verify: bool = True,
) -> dict[str, Any]:
    """Restores ``items``; those in ``targets`` take the target's structure and shardings.

    Arrays are read in their saved dtypes, checked against the checksum record (unless
    ``verify`` is False), then cast to the target's dtypes.
    """
    structures = meta.get("structures", {})
    for item in items:
        if item not in structures:
            raise FileNotFoundError(
                f"checkpoint {directory} has no {item!r} item (saved items: "
                f"{', '.join(sorted(structures)) or 'none'})"
            )
    records = _integrity.read(directory, meta.get("format_version", 1)) if verify else None
    args, encodings, wanted = {}, {}, {}
    for item in items:
        saved = dict(E.spec_arrays(structures[item]))
        _integrity.check_spec(
            directory, item, {_integrity.key(p): leaf for p, leaf in saved.items()}, records
        )
        target = targets.get(item)
        if target is not None:
            encodings[item] = enc = _match_target(directory, item, structures[item], target)
            wanted[item] = {
                p: (E.dtype_of(x), getattr(x, "sharding", None))
                for p, x in zip(enc.paths, enc.leaves, strict=True)
            }
        else:
            wanted[item] = {p: (np.dtype(leaf["dtype"]), None) for p, leaf in saved.items()}
        abstract: dict[str, Any] = {}
        for path, leaf in saved.items():
            E.nested_set(abstract, path, _restore_leaf(leaf, wanted[item][path][1]))
        if item in meta.get("items", []):
            args[item] = ocp.args.StandardRestore(abstract)
    restored = _restore_items(directory, args) if args else {}
    out = {}
    for item in items:
        arrays = restored.get(item, {})
        for path, (dtype, sharding) in wanted[item].items():
            array = E.nested_get(arrays, path)
            _integrity.verify(directory, item, _integrity.key(path), array, records)
            if isinstance(array, np.ndarray):  # 64-bit without x64: JAX's canonical dtype
                array = jax.device_put(array, sharding or _default_sharding())
            if array.dtype != jax.dtypes.canonicalize_dtype(dtype):
                array = array.astype(dtype)
            E.nested_set(arrays, path, array)
        if item in encodings:  # rebuild with the target's own tree structure
            enc = encodings[item]
            leaves = [E.nested_get(arrays, p) for p in enc.paths]
            out[item] = jax.tree.unflatten(jax.tree.structure(targets[item]), leaves)
        else:
            out[item] = E.decode(structures[item], arrays)
    return out


def restore_params(
    directory: str | epath.PathLike, *, target: Any = None, verify: bool = True
) -> Any:
    """Restores the parameters of a checkpoint.

    Without ``target`` the parameters come back with the saved containers (dicts, lists,
    tuples and known NamedTuples; other pytree nodes such as ``FrozenDict`` as plain dicts)
    as ``jax.Array`` on the first local device, dtypes preserved (Python scalar leaves were
    saved as 0-d NumPy arrays; 64-bit ones come back 32-bit unless ``jax_enable_x64``).

    Args:
      directory: the checkpoint directory.
      target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``) with the saved structure and shapes: the result takes its tree
        structure, dtypes and shardings (leaves without a sharding go to the first local
        device).
      verify: check every array against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Returns:
      The parameter pytree.

    Raises:
      FileNotFoundError: if the checkpoint or its ``params`` item does not exist.
      CheckpointCorruptError: an array differs from what was saved (a ``ValueError``).
      ValueError: if the checkpoint is corrupt or ``target`` does not match it.

    Example:
      >>> params = restore_params("/tmp/ckpt_doc")  # doctest: +SKIP
    """
    directory = _check_directory(directory)
    meta = _read_full_metadata(directory)
    return _restore_array_items(directory, meta, [PARAMS], {PARAMS: target}, verify=verify)[PARAMS]


def restore_statistics(
    directory: str | epath.PathLike, *, target: Any = None, verify: bool = True
) -> Any:
    """Restores the UMTAM merging statistics of a checkpoint, without any optimizer.

    Args:
      directory: the checkpoint directory.
      target: optional statistics pytree (arrays or ``jax.ShapeDtypeStruct``) giving the
        structure, dtypes and shardings, e.g.
        ``jax.eval_shape(lambda: umtam_jax.statistics(opt.init(params)))``.
      verify: check every array against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Returns:
      A pytree shaped like the parameters whose leaves are :class:`FactoredStatistics` /
      :class:`DenseStatistics` (fields that were ``None`` are ``None`` again) or
      ``optax.MaskedNode()``, with ``jax.Array`` leaves (first local device without target).

    Raises:
      FileNotFoundError: if the checkpoint does not exist or was saved without statistics.
      CheckpointCorruptError: an array differs from what was saved (a ``ValueError``).
      ValueError: if the checkpoint is corrupt or ``target`` does not match it.

    Example:
      >>> stats = restore_statistics("/tmp/ckpt_doc")  # doctest: +SKIP
      >>> stats["w"].saliency.shape  # doctest: +SKIP
      (4, 3)
    """
    directory = _check_directory(directory)
    meta = _read_full_metadata(directory)
    items = _restore_array_items(directory, meta, [STATISTICS], {STATISTICS: target}, verify=verify)
    return items[STATISTICS]


def restore_opt_state(directory: str | epath.PathLike, target: Any, *, verify: bool = True) -> Any:
    """Restores the full optimizer state of a checkpoint into the structure of ``target``.

    The restored state has ``target``'s tree structure (so its NamedTuples, ``None`` fields
    and ``optax.MaskedNode`` placeholders), dtypes and shardings, and the saved values bit
    for bit: training resumed from it continues exactly as uninterrupted training.

    Args:
      directory: the checkpoint directory.
      target: an optimizer state of the same optimizer, concrete or abstract, e.g.
        ``jax.eval_shape(opt.init, params)``; leaves without a sharding are placed on the
        first local device.
      verify: check every array against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Returns:
      The optimizer state.

    Raises:
      FileNotFoundError: if the checkpoint does not exist or was saved without ``opt_state``.
      ValueError: if the checkpoint is corrupt or ``target``'s structure or shapes differ
        from the saved state (the message lists the differing paths).

    Example:
      >>> abstract = jax.eval_shape(opt.init, params)  # doctest: +SKIP
      >>> opt_state = restore_opt_state("/tmp/ckpt_doc", abstract)  # doctest: +SKIP
    """
    if target is None:
        raise TypeError("restore_opt_state needs a target, e.g. jax.eval_shape(opt.init, params)")
    directory = _check_directory(directory)
    meta = _read_full_metadata(directory)
    items = _restore_array_items(directory, meta, [OPT_STATE], {OPT_STATE: target}, verify=verify)
    return items[OPT_STATE]


def restore_checkpoint(
    directory: str | epath.PathLike,
    *,
    opt_state_target: Any = None,
    params_target: Any = None,
    statistics_target: Any = None,
    verify: bool = True,
) -> Checkpoint:
    """Restores everything a checkpoint holds in one Orbax read.

    Args:
      directory: the checkpoint directory.
      opt_state_target: the optimizer state's target (see :func:`restore_opt_state`); the
        optimizer state is restored only when it is given.
      params_target: optional target for the parameters (see :func:`restore_params`).
      statistics_target: optional target for the statistics (see
        :func:`restore_statistics`).
      verify: check every array against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Returns:
      A :class:`Checkpoint` ``(params, statistics, opt_state, metadata)``; ``statistics`` is
      ``None`` when none were saved, ``opt_state`` when no ``opt_state_target`` was given.

    Raises:
      FileNotFoundError: if the checkpoint does not exist, or ``opt_state_target`` is given
        but no optimizer state was saved.
      ValueError: if the checkpoint is corrupt or a target does not match it.

    Example:
      >>> ckpt = restore_checkpoint("/tmp/ckpt_doc")  # doctest: +SKIP
      >>> ckpt.metadata["user"]  # doctest: +SKIP
      {'task': 'demo'}
    """
    directory = _check_directory(directory)
    meta = _read_full_metadata(directory)
    structures = meta.get("structures", {})
    items = [PARAMS]
    if STATISTICS in structures:
        items.append(STATISTICS)
    if opt_state_target is not None:
        items.append(OPT_STATE)
    targets = {PARAMS: params_target, STATISTICS: statistics_target, OPT_STATE: opt_state_target}
    out = _restore_array_items(directory, meta, items, targets, verify=verify)
    return Checkpoint(
        params=out[PARAMS],
        statistics=out.get(STATISTICS),
        opt_state=out.get(OPT_STATE),
        metadata={k: v for k, v in meta.items() if k != "structures"},
    )
