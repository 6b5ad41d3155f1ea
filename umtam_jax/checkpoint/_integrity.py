"""Checksums of saved arrays, verified on restore.

Every array a save writes is recorded in ``umtam_checksums.json`` at the checkpoint's
root: its dtype, shape and the CRC-32 of its bytes (C order), keyed by item and stored
path. Restores read the arrays back, check them against the record and raise
:class:`CheckpointCorruptError` naming the checkpoint, item and leaf on any difference:
a flipped byte, a truncated file, an edited dtype or shape. It also holds a CRC-32 of the
metadata record (in sorted-key JSON), checked whenever the metadata is read. The record is
written into the staging folder after the arrays and before the checkpoint is published,
so a checkpoint at its final path always has one.

CRC-32 (``zlib.crc32``) detects every error burst of up to 32 bits and any other
corruption with probability 1 − 2⁻³²; it runs at about 3 GB/s on one core, about twice
SHA-256. It guards against damaged files, not against deliberate tampering.

Checkpoints of format version 1 (written before checksums existed) restore unverified.
An array that no process sees whole (sharded across the processes of a multi-host run) has
no CRC of its own (a null one); the CRC-32 of each of its shards is recorded instead, with
the shard's ``[start, stop)`` on every axis (``shards``), gathered from the processes that
wrote them. A restore checks every recorded shard that lies within a part of the array the
process holds: all of them on the same or a coarser sharding, or where it sees the whole
array (a recorded shard that the restore's sharding divides across processes is not
verified). Records written before shard checksums existed hold
neither, and such arrays restore unverified. From format version 3
on, the record lists every array and holds the metadata's CRC, so an entry or item
missing from it (a damaged key name, an emptied item) is itself reported as damage;
version 2 records left unaddressable arrays out and are read as before.

A local record must be a regular file of at most :data:`MAX_RECORD_BYTES` (a FIFO or a
device is refused unopened: see :func:`._targets.read_record`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from umtam_jax import _json
from umtam_jax.checkpoint import _encoding, _filesystem, _targets
from umtam_jax.checkpoint._write_errors import CheckpointBusyError

CHECKSUMS_FILE = "umtam_checksums.json"
ALGORITHM = "crc32"
# The most bytes the checksum record may hold: about 100 per array (more with shards),
# so millions of arrays fit.
MAX_RECORD_BYTES = 256 * 2**20


class CheckpointCorruptError(ValueError):
    """A checkpoint's files do not hold what was saved (damaged, truncated or edited)."""


def key(path: tuple[str, ...]) -> str:
    """The record key of a stored path (stored names never contain ``/``)."""
    return "/".join(path)


def _shown(item: str, k: str) -> str:
    """How messages name record key ``k`` of ``item``: the user's own key names."""
    return f"{item}/{_encoding.display_path(tuple(k.split('/')))}"


def host_array(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or None if this process cannot see all of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def crc32(array: np.ndarray) -> int:
    """CRC-32 of the array's bytes in C order."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(flat)  # type: ignore[arg-type]  # ndarrays are buffers


def record(array: Any) -> dict[str, Any]:
    """The checksum record of one array (its CRC None when this process cannot see all
    of it)."""
    host = host_array(array)
    crc = None if host is None else crc32(host)
    return {"dtype": str(np.dtype(array.dtype)), "shape": list(array.shape), ALGORITHM: crc}


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's ``[start, stop)`` on every axis."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


def shard_records(array: Any) -> list[dict[str, Any]]:
    """The CRC-32 of each shard of ``array`` this process holds the first replica of,
    with its bounds (``[]`` for an array this process sees whole: :func:`record` has its
    CRC)."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return []
    return [
        {"index": _bounds(shard.index, array.shape), ALGORITHM: crc32(np.asarray(shard.data))}
        for shard in array.addressable_shards
        if shard.replica_id == 0
    ]


def metadata_crc32(metadata: Mapping[str, Any]) -> int:
    """CRC-32 of the metadata record in a canonical JSON form (sorted keys)."""
    return zlib.crc32(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())


def write(
    directory: epath.Path,
    records: Mapping[str, Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``{item: {key: record}}``, and the CRC of the ``metadata`` record, into
    ``directory`` (the unpublished staging folder)."""
    data: dict[str, Any] = {"algorithm": ALGORITHM, "items": records}
    if metadata is not None:
        data["metadata"] = metadata_crc32(metadata)
    _filesystem.write_synced(directory / CHECKSUMS_FILE, json.dumps(data, separators=(",", ":")))


def check_metadata(directory: epath.Path, metadata: Mapping[str, Any]) -> None:
    """Raises :class:`CheckpointCorruptError` when the restored metadata does not match
    the CRC in the checksum record (a flipped byte in a key name or a user value, which
    the JSON still parses). A missing or unreadable record, or one without the CRC, is
    left to the verification of the arrays (:func:`read`)."""
    try:
        text = _targets.read_record(directory / CHECKSUMS_FILE, MAX_RECORD_BYTES)
        recorded = _json.loads(text).get("metadata")
    except (OSError, ValueError, AttributeError):
        return
    if recorded is not None and recorded != metadata_crc32(metadata):
        raise CheckpointCorruptError(
            f"checkpoint {directory} is corrupt: its metadata does not match its checksum "
            f"record ({CHECKSUMS_FILE}): a key name, key kind or user value was changed"
        )


class Records(dict):
    """``{item: {key: record}}`` as read by :func:`read`; ``complete`` when every saved
    array must have an entry (format version 3 on)."""

    complete: bool = False
    metadata: int | None = None  # the metadata's CRC-32 (format version 3 on)


def read(directory: epath.Path, format_version: int) -> Records | None:
    """The checkpoint's records, or None for a checkpoint older than checksums.

    Raises:
      CheckpointCorruptError: the record is missing or unreadable.
    """
    if format_version < 2:
        return None
    path = directory / CHECKSUMS_FILE
    try:
        data = _json.loads(_targets.read_record(path, MAX_RECORD_BYTES))
        if data.get("algorithm") != ALGORITHM:
            raise ValueError(f"unknown checksum algorithm {data.get('algorithm')!r}")
        items = data["items"]
        if format_version >= 3 and not _is_int(data.get("metadata")):
            raise ValueError("it holds no checksum of the metadata")
        for item, records in items.items():
            for k, rec in records.items():
                _check_entry(rec, _shown(item, k))
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"checkpoint {directory} is corrupt: its checksum record {path} is missing"
        ) from None
    except _targets.UnsafeFileError as err:
        raise CheckpointCorruptError(
            f"checkpoint {directory} is corrupt: its checksum record {path} {err}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointCorruptError(
            f"checkpoint {directory} is corrupt: cannot read its checksum record {path} "
            f"({type(err).__name__}: {err})"
        ) from None
    out = Records(items)
    out.complete = format_version >= 3
    out.metadata = data.get("metadata")
    return out


def raise_if_replaced(
    directory: epath.Path, metadata: Mapping[str, Any], records: Records | None
) -> None:
    """Raises :class:`CheckpointBusyError` where a read that found damage read a
    checkpoint that a save replaced meanwhile (an overwrite swaps the whole folder: the
    metadata, records and arrays read before and after the swap belong to different
    checkpoints), not damage: the checksum record at ``directory`` is no longer ``records``,
    or no longer names ``metadata``. Returns where neither changed (real damage)."""
    if records is None:
        return
    try:
        now = read(directory, metadata.get("format_version", 1))
    except CheckpointCorruptError:  # gone in the middle of a swap
        now = None
    stale = records.metadata is not None and records.metadata != metadata_crc32(metadata)
    if stale or now is None or now != records or now.metadata != records.metadata:
        raise CheckpointBusyError(
            f"checkpoint {directory} was replaced by a save while it was read (an overwrite "
            "swaps the whole folder): read it again"
        )


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON true/false are not CRCs or bounds


def _check_entry(rec: Any, where: str) -> None:
    """Raises ValueError, naming the array, unless ``rec`` is a well-formed entry: dtype,
    shape, an integer CRC or a null one, and well-formed shard records if any."""
    if not (
        isinstance(rec["dtype"], str)
        and isinstance(rec["shape"], list)
        and all(_is_int(d) for d in rec["shape"])
    ):
        raise ValueError(f"malformed record of {where}")
    shards = rec.get("shards", [])
    if not isinstance(shards, list):
        raise ValueError(f"malformed shard records of {where}")
    # A null CRC without shard records is an array that no process of a multi-process
    # save saw whole, written before shard checksums existed: restored unverified.
    if not (_is_int(rec[ALGORITHM]) or rec[ALGORITHM] is None):
        raise ValueError(f"the record of {where} has no valid CRC")
    for shard in shards:
        bounds = shard["index"]
        if not (
            _is_int(shard[ALGORITHM])
            and isinstance(bounds, list)
            and len(bounds) == len(rec["shape"])
            and all(
                isinstance(b, list) and len(b) == 2 and all(_is_int(i) for i in b) for b in bounds
            )
        ):
            raise ValueError(f"malformed shard record of {where}")


def check_spec(
    directory: epath.Path, item: str, leaves: Mapping[str, Mapping[str, Any]], records: Any
) -> None:
    """Checks the structure record's dtypes and shapes against the checksum record.

    Args:
      directory: the checkpoint (for messages).
      item: the item name.
      leaves: ``{key: {"dtype": ..., "shape": ...}}`` from the structure record.
      records: :func:`read`'s result (None: nothing to check).
    """
    if records is None:
        return
    saved = records.get(item, {})
    for k, leaf in leaves.items():
        rec = saved.get(k)
        if rec is None and records.complete:
            raise CheckpointCorruptError(
                f"checkpoint {directory} is corrupt: array {_shown(item, k)} has no entry in its "
                f"checksum record ({CHECKSUMS_FILE})"
            )
        if rec is None:
            continue  # format 2: not fully addressable when saved
        if rec["dtype"] != leaf["dtype"] or list(rec["shape"]) != list(leaf["shape"]):
            raise CheckpointCorruptError(
                f"checkpoint {directory} is corrupt: its metadata gives {_shown(item, k)} dtype "
                f"{leaf['dtype']} and shape {tuple(leaf['shape'])}, but {rec['dtype']} and "
                f"{tuple(rec['shape'])} were saved"
            )


def verify(directory: epath.Path, item: str, k: str, array: Any, records: Any) -> None:
    """Checks one restored array against its record.

    Raises:
      CheckpointCorruptError: dtype, shape or checksum differ from what was saved.
    """
    if records is None:
        return
    rec = records.get(item, {}).get(k)
    if rec is None:
        return
    where = f"checkpoint {directory} is corrupt: array {_shown(item, k)}"
    if str(np.dtype(array.dtype)) != rec["dtype"] or list(array.shape) != list(rec["shape"]):
        raise CheckpointCorruptError(
            f"{where} reads back as {np.dtype(array.dtype)}{tuple(array.shape)}, but "
            f"{rec['dtype']}{tuple(rec['shape'])} was saved"
        )
    host = host_array(array)
    if rec[ALGORITHM] is not None:
        checks = [] if host is None else [(host, rec[ALGORITHM])]
    else:  # saved in shards: each saved shard within a part this process holds
        held = (
            [(_bounds((slice(None),) * host.ndim, host.shape), host)]
            if host is not None
            else [(_bounds(s.index, array.shape), s.data) for s in array.addressable_shards]
        )
        checks = []
        for saved in rec.get("shards", []):
            part = next(((b, d) for b, d in held if _within(saved["index"], b)), None)
            if part is not None:  # the saved shard's place inside that part
                inner = [
                    slice(start - low, stop - low)
                    for (start, stop), (low, _) in zip(saved["index"], part[0], strict=True)
                ]
                checks.append((np.asarray(part[1])[tuple(inner)], saved[ALGORITHM]))
    for data, expected in checks:
        if crc32(data) != expected:
            raise CheckpointCorruptError(
                f"{where} does not match its checksum: its data file was damaged or edited "
                "after the save"
            )


def _within(inner: list[list[int]], outer: list[list[int]]) -> bool:
    """Whether the bounds ``inner`` lie within ``outer`` on every axis."""
    return all(o0 <= i0 and i1 <= o1 for (i0, i1), (o0, o1) in zip(inner, outer, strict=True))
