"""Restoring the items of a checkpoint written by :mod:`umtam_jax.checkpoint._save`.

Each public function opens the checkpoint with :mod:`~umtam_jax.checkpoint._metadata`
(its directory and metadata item), then restores the requested array items in one Orbax
read: arrays come back in their saved dtypes, are checked against the recorded checksums
and are then cast and placed as the optional target asks (its tree structure, dtypes and
shardings), or as the saved structure on the first local device. Typed PRNG keys are read
as their stored key data and rebuilt (:mod:`~umtam_jax.checkpoint._keys`). A target
sharding that does not fit a saved shape is refused before anything is read: it is the
caller's configuration, not damage (:class:`CheckpointCorruptError`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from umtam_jax import _pytrees
from umtam_jax._cast import cast_checked
from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _keys, _metadata
from umtam_jax.checkpoint import _restore_checks as C
from umtam_jax.checkpoint._format import (
    OPT_STATE,
    PARAMS,
    STATISTICS,
    Checkpoint,
)


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
    _pytrees.check_no_flax_objects(
        {f"the {k} target": t for k, t in targets.items() if t is not None}
    )
    structures = meta.get("structures", {})
    for item in items:
        if item not in structures:
            raise FileNotFoundError(
                f"checkpoint {directory} has no {item!r} item (saved items: "
                f"{', '.join(sorted(structures)) or 'none'})"
            )
    records = _integrity.read(directory, meta.get("format_version", 1)) if verify else None
    try:
        return _read_items(directory, meta, items, targets, records)
    except _integrity.CheckpointCorruptError:
        _integrity.raise_if_replaced(directory, meta, records)  # an overwrite, not damage
        raise


def _read_items(
    directory: epath.Path,
    meta: dict[str, Any],
    items: list[str],
    targets: Mapping[str, Any],
    records: _integrity.Records | None,
) -> dict[str, Any]:
    """:func:`_restore_array_items` once the checksum records are read."""
    structures = meta.get("structures", {})
    args, encodings, wanted = {}, {}, {}
    for item in items:
        saved = dict(E.spec_arrays(structures[item]))
        _integrity.check_spec(
            directory, item, {_integrity.key(p): leaf for p, leaf in saved.items()}, records
        )
        target = targets.get(item)
        if target is not None:
            encodings[item] = enc = C.match_target(directory, item, structures[item], target)
            wanted[item] = {
                p: (E.dtype_of(x), getattr(x, "sharding", None))
                for p, x in zip(enc.paths, enc.leaves, strict=True)
            }
            for p, (_, sharding) in wanted[item].items():
                if sharding is not None:
                    C.check_sharding(directory, item, p, saved[p], sharding, p in enc.keys)
        else:
            wanted[item] = {p: (np.dtype(leaf["dtype"]), None) for p, leaf in saved.items()}
            for p, impl in E.spec_keys(structures[item]).items():  # rebuilt by decode
                _keys.check_impl(impl, f"checkpoint {directory}'s {item} leaf {E.display_path(p)}")
        abstract: dict[str, Any] = {}
        for path, leaf in saved.items():
            E.nested_set(abstract, path, _restore_leaf(leaf, wanted[item][path][1]))
        if item in meta.get("items", []):
            args[item] = ocp.args.StandardRestore(abstract)
    # A failed Orbax read raises here at once: the other processes of a multi-process run
    # then wait in Orbax's own barrier, which this process never reaches.
    restored = _metadata.restore_items(directory, args) if args else {}
    if records is not None:  # every process has read its arrays: the checksums
        damage = None
        try:
            for item in items:
                for path in wanted[item]:
                    array = E.nested_get(restored.get(item, {}), path)
                    _integrity.verify(directory, item, _integrity.key(path), array, records)
        except _integrity.CheckpointCorruptError as err:
            damage = err
        C.raise_damage_found_anywhere(directory, damage)
    out = {}
    for item in items:
        arrays = restored.get(item, {})
        for path, (dtype, sharding) in wanted[item].items():
            array = E.nested_get(arrays, path)
            what = f"checkpoint {directory}'s {item} leaf {E.display_path(path)}"
            if isinstance(array, np.ndarray):  # 64-bit without x64: JAX's canonical dtype
                narrow = jax.dtypes.canonicalize_dtype(array.dtype)
                array = cast_checked(array, narrow, what, "restore it with jax_enable_x64 on")
                array = jax.device_put(array, sharding or _default_sharding())
            if array.dtype != jax.dtypes.canonicalize_dtype(dtype):
                if not np.can_cast(array.dtype, np.dtype(dtype), casting="same_kind"):
                    raise TypeError(
                        f"{what} is {array.dtype}; the target asks {np.dtype(dtype)}, a cast "
                        "that would lose its values: give the target that leaf's dtype"
                    )
                cast = cast_checked(array, np.dtype(dtype), what, "give the target a wider dtype")
                if jnp.issubdtype(array.dtype, jnp.integer) and bool(
                    jnp.any(cast.astype(array.dtype) != array)  # rounded to a float
                ):
                    raise TypeError(
                        f"{what} holds integers that {np.dtype(dtype)} (the target's dtype) "
                        "cannot represent exactly: give the target that leaf's dtype"
                    )
                array = cast
            E.nested_set(arrays, path, array)
        if item in encodings:  # rebuild with the target's own tree structure
            enc = encodings[item]
            leaves = [E.nested_get(arrays, p) for p in enc.paths]
            leaves = [  # typed keys from their key data, as the target's implementation
                jax.random.wrap_key_data(x, impl=enc.keys[p]) if p in enc.keys else x
                for p, x in zip(enc.paths, leaves, strict=True)
            ]
            out[item] = jax.tree.unflatten(jax.tree.structure(targets[item]), leaves)
        else:
            out[item] = E.decode(structures[item], arrays)
    return out


def restore_params(
    directory: str | os.PathLike[str], *, target: Any = None, verify: bool = True
) -> Any:
    """Restores the parameters of a checkpoint.

    Without ``target`` the parameters come back with the saved containers (dicts, lists,
    tuples and known NamedTuples; other pytree nodes such as ``FrozenDict`` as plain dicts)
    as ``jax.Array`` on the first local device, dtypes preserved (Python scalar leaves were
    saved as 0-d NumPy arrays; 64-bit ones come back 32-bit unless ``jax_enable_x64``,
    and a value out of the 32-bit range is then an error naming the leaf). Typed PRNG keys
    (``jax.random.key``, ``nnx.Rngs``) come back as keys of their saved implementation.

    Args:
      directory: the checkpoint directory.
      target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``) with the saved structure and shapes: the result takes its tree
        structure, dtypes and shardings (leaves without a sharding go to the first local
        device). A narrower dtype of the same kind rounds, as Orbax does (a float32 leaf
        into a bfloat16 target); another kind (float into int) is refused, and so is a
        value the target's dtype cannot hold (an int into float16 past its largest, or
        an int a float target would round, 2**24 + 1 into float32).
      verify: check every array against the checksums recorded at save time (the
        default); False skips that pass for trusted, fast paths.

    Returns:
      The parameter pytree.

    Raises:
      FileNotFoundError: if the checkpoint or its ``params`` item does not exist.
      CheckpointCorruptError: an array differs from what was saved (a ``ValueError``).
      CheckpointBusyError: a save replaced the checkpoint while it was read (an
        ``OSError``): read it again.
      ValueError: if the checkpoint is corrupt or ``target`` does not match it (or a leaf's
        sharding does not divide its shape), or a 64-bit value does not fit 32 bits
        without ``jax_enable_x64``, or a value overflows the target's dtype.
      TypeError: a target dtype of another kind (float into int), or one a saved
        integer would be rounded in.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import restore_params, save_checkpoint
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", {"w": np.ones((4, 3))})
      >>> restore_params(path)["w"].shape
      (4, 3)

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    directory = _metadata.check_directory(directory)
    meta = _metadata.read_full_metadata(directory)
    return _restore_array_items(directory, meta, [PARAMS], {PARAMS: target}, verify=verify)[PARAMS]


def restore_statistics(
    directory: str | os.PathLike[str], *, target: Any = None, verify: bool = True
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
      CheckpointBusyError: a save replaced the checkpoint while it was read (an
        ``OSError``): read it again.
      ValueError: if the checkpoint is corrupt or ``target`` does not match it.

    Example:
      >>> import tempfile, jax.numpy as jnp, umtam_jax
      >>> from umtam_jax.checkpoint import restore_statistics, save_checkpoint
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = umtam_jax.umtam(1e-2).init(params)
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", params, opt_state=state)
      >>> stats = restore_statistics(path)
      >>> stats["w"].saliency.shape
      (4, 3)

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    directory = _metadata.check_directory(directory)
    meta = _metadata.read_full_metadata(directory)
    items = _restore_array_items(directory, meta, [STATISTICS], {STATISTICS: target}, verify=verify)
    return items[STATISTICS]


def restore_opt_state(
    directory: str | os.PathLike[str], target: Any, *, verify: bool = True
) -> Any:
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
      CheckpointBusyError: a save replaced the checkpoint while it was read (an
        ``OSError``): read it again.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, umtam_jax
      >>> from umtam_jax.checkpoint import restore_opt_state, save_checkpoint
      >>> params, opt = {"w": jnp.ones((4, 3))}, umtam_jax.umtam(1e-2)
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/c", params, opt_state=opt.init(params))
      >>> abstract = jax.eval_shape(opt.init, params)
      >>> opt_state = restore_opt_state(path, abstract)
      >>> int(opt_state[0].count)
      0

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    if target is None:
        raise TypeError("restore_opt_state needs a target, e.g. jax.eval_shape(opt.init, params)")
    directory = _metadata.check_directory(directory)
    meta = _metadata.read_full_metadata(directory)
    items = _restore_array_items(directory, meta, [OPT_STATE], {OPT_STATE: target}, verify=verify)
    return items[OPT_STATE]


def restore_checkpoint(
    directory: str | os.PathLike[str],
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
      ValueError: if the checkpoint is corrupt or a target does not match it (or a leaf's
        sharding does not divide its shape).
      CheckpointBusyError: a save replaced the checkpoint while it was read (an
        ``OSError``): read it again.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import restore_checkpoint, save_checkpoint
      >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", {"w": np.ones((4, 3))},
      ...                        metadata={"task": "demo"})
      >>> ckpt = restore_checkpoint(path)
      >>> ckpt.metadata["user"], ckpt.params["w"].shape
      ({'task': 'demo'}, (4, 3))

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    directory = _metadata.check_directory(directory)
    meta = _metadata.read_full_metadata(directory)
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
