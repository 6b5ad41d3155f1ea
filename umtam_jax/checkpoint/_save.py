"""Saving parameters, merging statistics and optimizer state as one Orbax checkpoint.

:func:`save_checkpoint` validates and encodes every tree first, records the metadata item
(format and library versions, item structures, the statistics' node kinds, the user's
metadata), then writes all items and their checksums in one synchronous Orbax composite
save under a staging name that :mod:`umtam_jax.checkpoint._safety` publishes atomically.
The directory layout is described in :mod:`umtam_jax.checkpoint._format`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from etils import epath

from umtam_jax import _pytrees
from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _processes, _safety
from umtam_jax.checkpoint._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSION_WITHOUT_KEYS,
    METADATA,
    OPT_STATE,
    PARAMS,
    STATISTICS,
    _absolute,
)
from umtam_jax.optimizer import _state

# --------------------------------------------------------------------------------------
# Statistics node kinds
# --------------------------------------------------------------------------------------


def _under_params(params: Any, stats: Any) -> Any:
    """The statistics of Linen variables saved whole (``{"params": x}``) by an optimizer of
    ``x``: keyed like ``x``, they are saved under ``"params"`` so that they line up with
    the saved parameters (as merges read them); any other statistics as they are."""
    if stats is None or not (isinstance(params, dict) and set(params) == {"params"}):
        return stats
    try:
        treedef = jax.tree.structure(params["params"])
        treedef.flatten_up_to(stats)  # type: ignore[attr-defined]  # a node per leaf of x
    except (ValueError, TypeError):
        return stats
    return {"params": stats}


def _check_statistics_fit(params: Any, stats: Any, what: str) -> None:
    """Raises ValueError naming the first statistics node that has no parameter in
    ``params`` or whose arrays do not fit its parameter's shape (an optimizer state of
    other parameters). Parameters without statistics (an optimizer of part of them: Linen
    ``batch_stats``, a LoRA subset) and placeholders (``MaskedNode``, ``None``) are fine;
    a node is looked up as it is, or under ``params["params"]`` (Linen variables).

    Args:
      params: the parameters to save (``flax.nnx`` Variables count as their arrays).
      stats: their statistics, as :func:`_under_params` gives them.
      what: how messages name the statistics.
    """
    from umtam_jax.merging import _statistics_validation as SV
    from umtam_jax.merging import _validation as V

    paths, leaves, _ = V.flatten(params)
    shapes = {p: tuple(getattr(x, "shape", ())) for p, x in zip(paths, leaves, strict=True)}
    hint = "(the optimizer state of other parameters? statistics= saves them as they are)"
    for path, node in zip(*V.flatten(stats, is_leaf=SV.is_stats_node)[:2], strict=True):
        if isinstance(node, optax.MaskedNode | None):
            continue
        at = path if path in shapes else f"['params']{path}"
        if at not in shapes:
            raise ValueError(f"{what} holds statistics at {path}, a leaf params lacks {hint}")
        try:
            SV.check_node(SV.as_node(node), shapes[at], path)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{what} do not fit params: {err} {hint}") from None


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
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, not a {type(metadata).__name__}")
    try:
        _check_json(dict(metadata), "metadata")
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError, RecursionError) as e:  # too deep: RecursionError
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None


def _check_json(x: Any, where: str) -> None:
    """Raises TypeError naming the first part of ``x`` that JSON would not give back as it
    is: a key that is not a string (``json`` writes ``1`` as ``"1"``), a value of another
    type than a string, number, bool, None, list, tuple or dict."""
    if isinstance(x, Mapping):
        if not isinstance(x, dict):  # a FrozenDict, a mappingproxy: JSON writes dicts only
            raise TypeError(f"{where} is a {type(x).__name__}: metadata must be JSON (a dict)")
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} has the key {k!r} ({type(k).__name__}): JSON keys are strings, "
                    f"so it would come back as {json.dumps(str(k))}"
                )
            _check_json(v, f"{where}[{k!r}]")
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _check_json(v, f"{where}[{i}]")
    elif not (x is None or isinstance(x, bool | int | float | str)):
        raise TypeError(
            f"{where} is a {type(x).__name__}: metadata must be JSON (strings, numbers, "
            "bools, None, lists and dicts with string keys)"
        )


def _metadata_record(
    encoded: Mapping[str, E.Encoded], stats_kinds: Any, user: Any
) -> dict[str, Any]:
    """The ``umtam_metadata`` item of a checkpoint holding the ``encoded`` items."""
    return {
        "format": FORMAT_NAME,
        "format_version": (
            FORMAT_VERSION
            if any(E.spec_keys(enc.spec) for enc in encoded.values())
            else FORMAT_VERSION_WITHOUT_KEYS
        ),
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
    paths = zip(enc.paths, enc.leaves, strict=True)
    return {_integrity.key(path): _integrity.record(leaf) for path, leaf in paths}


def _write(path: epath.Path, items: dict[str, E.Encoded], metadata: dict[str, Any]) -> None:
    """One synchronous Orbax composite save to ``path`` (which must not exist), checksums."""
    args = {name: ocp.args.StandardSave(enc.arrays) for name, enc in items.items()}
    args[METADATA] = ocp.args.JsonSave(metadata)
    with ocp.Checkpointer(_composite_handler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(**args))
    shards = _shard_checksums(items) if _processes.count() > 1 else {}
    if _processes.is_primary():
        records = {name: _checksums(enc) for name, enc in items.items()}
        for (name, k), recorded in shards.items():
            records[name][k]["shards"] = recorded
        _integrity.write(path, records, metadata)


def _shard_checksums(items: dict[str, E.Encoded]) -> dict[tuple[str, str], list[Any]]:
    """The shard checksums of the arrays no process sees whole, gathered from every
    process (each calls this): ``{(item, key): [shard record, ...]}`` in bounds order."""
    mine = [
        [name, _integrity.key(path), shard]
        for name, enc in items.items()
        for path, leaf in zip(enc.paths, enc.leaves, strict=True)
        for shard in _integrity.shard_records(leaf)
    ]
    gathered: dict[tuple[str, str], list[Any]] = {}
    for data in _processes.gather(json.dumps(mine).encode()):
        for name, k, shard in json.loads(data):
            gathered.setdefault((name, k), []).append(shard)
    return {where: sorted(found, key=lambda s: s["index"]) for where, found in gathered.items()}


def save_checkpoint(
    directory: str | os.PathLike[str],
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
        not an array or scalar, or a Flax NNX Module or Optimizer (not its state).
      ValueError: if ``statistics`` holds no UMTAM statistics, the statistics in
        ``opt_state`` hold a leaf ``params`` lacks or do not fit its shape (an optimizer
        state of other parameters), or ``directory`` is a symbolic link, a file or a
        folder that is not a umtam_jax checkpoint.
      NotADirectoryError: a parent of ``directory`` is a file.

    Example:
      >>> import tempfile, jax.numpy as jnp, umtam_jax
      >>> from umtam_jax.checkpoint import save_checkpoint, restore_statistics
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2)
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", params,
      ...                        opt_state=opt.init(params), metadata={"task": "demo"})
      >>> restore_statistics(path)["w"].nu.shape
      (4, 3)

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    from umtam_jax.optimizer import _statistics  # the optimizer package imports lazily

    directory = _absolute(directory)
    _safety.check_output(directory, overwrite=overwrite)

    # Everything is validated before anything is written.
    _pytrees.check_no_flax_objects({PARAMS: params, OPT_STATE: opt_state, STATISTICS: statistics})
    if statistics is None and opt_state is not None:
        try:
            stats = _statistics.statistics(opt_state)
        except ValueError:  # no UMTAM state inside: save without statistics
            stats = None
    elif statistics is not None:
        stats = _statistics.statistics(statistics)
    else:
        stats = None

    stats = _under_params(params, stats)
    trees = {PARAMS: params, STATISTICS: stats, OPT_STATE: opt_state}
    encoded = {name: E.encode(tree, name) for name, tree in trees.items() if tree is not None}
    if stats is not None and statistics is None:  # given statistics are saved as they are
        _check_statistics_fit(params, stats, "the UMTAM statistics of opt_state")
    kinds = _statistics_kinds(stats) if stats is not None else None
    meta = _metadata_record(encoded, kinds, _user_metadata(metadata))
    # Orbax does not store empty trees: items without arrays live in the metadata only.
    items = {name: enc for name, enc in encoded.items() if enc.leaves}
    with _safety.publishing(directory, overwrite=overwrite) as staging:
        _write(staging, items, meta)
    return directory
