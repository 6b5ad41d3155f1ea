"""The checks of a restore: a target against the checkpoint's structure, shapes and key
kinds, a target sharding against a saved shape (before anything is read), and damage any
process of a multi-process run found."""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _integrity, _processes


def match_target(
    directory: epath.Path, item: str, saved_spec: dict[str, Any], target: Any
) -> E.Encoded:
    """Checks ``target`` against the saved structure and shapes; returns its encoding."""
    enc = E.encode(target, f"{item} target")
    saved = {path: leaf for path, leaf in E.spec_arrays(saved_spec)}
    saved_keys = E.spec_keys(saved_spec)
    wanted = {path: E.leaf_spec(x) for path, x in zip(enc.paths, enc.leaves, strict=True)}
    problems = []
    for path in wanted.keys() - saved.keys():
        problems.append(f"{E.display_path(path)}: in the target but not in the checkpoint")
    for path in saved.keys() - wanted.keys():
        problems.append(f"{E.display_path(path)}: in the checkpoint but not in the target")
    for path in wanted.keys() & saved.keys():
        if saved_keys.get(path) != enc.keys.get(path):  # a key of another kind, or none
            problems.append(
                f"{E.display_path(path)}: {_kind(saved_keys.get(path))} in the checkpoint, "
                f"{_kind(enc.keys.get(path))} in the target"
            )
        elif wanted[path]["shape"] != saved[path]["shape"]:
            of_key = " (of the PRNG key data)" if path in enc.keys else ""
            problems.append(
                f"{E.display_path(path)}: shape {tuple(saved[path]['shape'])} in the checkpoint, "
                f"{tuple(wanted[path]['shape'])} in the target{of_key}"
            )
    if problems:
        shown = "; ".join(sorted(problems)[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        hint = ""
        if item == "opt_state":
            hint = (
                " (an optimizer state's shapes follow the optimizer's options: build the "
                "target with the rank, row_axes, min_dim_size_to_factor, error_decay and "
                "saliency it was saved with)"
            )
        raise ValueError(
            f"the {item} target does not match checkpoint {directory / item}: {shown}{more}" + hint
        )
    return enc


def _kind(impl: str | None) -> str:
    """A leaf's kind in a message: a plain array, or a typed key of implementation ``impl``."""
    return "an array" if impl is None else f"a {impl} key"


def check_sharding(
    directory: epath.Path,
    item: str,
    path: tuple[str, ...],
    leaf: dict[str, Any],
    sharding: jax.sharding.Sharding,
    is_key: bool,
) -> None:
    """Raises ValueError, naming the leaf, when ``sharding`` cannot hold the saved array.

    Run before Orbax reads: Orbax would fail the whole read, reported as damage
    (:class:`CheckpointCorruptError`), but such a sharding is the caller's configuration.

    Args:
      directory: the checkpoint (for the message).
      item: the item name.
      path: the leaf's stored path.
      leaf: the leaf's array record (the key data's for a typed key).
      sharding: the target's sharding for the leaf.
      is_key: the leaf is a typed PRNG key, stored as its key data.
    """
    shape = tuple(leaf["shape"])
    if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
        raise ValueError(
            f"cannot restore checkpoint {directory}'s {item} leaf {E.display_path(path)} onto "
            f"a sharding over an abstract mesh ({getattr(sharding, 'spec', sharding)}), which "
            "names no devices: give the target concrete shardings (a NamedSharding over a "
            "jax.sharding.Mesh, e.g. nnx.get_named_sharding(state, mesh) for an abstract "
            "nnx state)"
        )
    try:  # (a target leaf's rank always fits: jax checks it when the leaf is made)
        sharding.shard_shape(shape)  # IndivisibleError (a ValueError): uneven partitions
    except ValueError as err:
        spec = getattr(sharding, "spec", sharding)
        mesh = getattr(sharding, "mesh", None)
        axes = f" over mesh axes {dict(mesh.shape)}" if mesh is not None else ""
        data = " (the data of a PRNG key array)" if is_key else ""
        raise ValueError(
            f"cannot restore checkpoint {directory}'s {item} leaf {E.display_path(path)}{data} "
            f"with shape {shape} onto the target's sharding {spec}{axes}: give that leaf "
            f"a sharding that fits its shape ({type(err).__name__}: {err})"
        ) from None


def raise_damage_found_anywhere(
    directory: epath.Path, damage: _integrity.CheckpointCorruptError | None
) -> None:
    """Raises ``damage``, or, in a multi-process run, the damage any process found (each
    process checks only the shards it reads; one that found none would go on alone and
    wait for the others at its next collective). Every process calls it, after the
    checksums of the arrays it read (all of them got past Orbax's read and its barrier)."""
    if _processes.count() > 1:
        found = _processes.gather(b"" if damage is None else str(damage).encode())
        where = [i for i, message in enumerate(found) if message]
        if damage is None and where:
            raise _integrity.CheckpointCorruptError(
                f"process {where[0]} of this run found damage: {found[where[0]].decode()}"
            )
    if damage is not None:
        raise damage
