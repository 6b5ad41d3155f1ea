"""The layout, item names and format constants shared by saving and restoring.

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

Writing lives in :mod:`umtam_jax.checkpoint._save`, reading in
:mod:`umtam_jax.checkpoint._restore`; this module holds what both need: the format name
and version, the item names, the :class:`Checkpoint` record and path normalisation.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from etils import epath

from umtam_jax.checkpoint import _targets

FORMAT_NAME = _targets._FORMAT_NAME
# 2: stored names escape '%', '.' and '/'; arrays have checksums (_integrity).
# 3: the checksum record lists every array (a missing entry is damage) and the metadata's.
# 4: typed PRNG keys are stored as their key data under a "key" structure node; an older
#    reader refuses it as "newer than this library's: upgrade" rather than as damage.
FORMAT_VERSION = 4
# A checkpoint without typed keys is written as version 3, which older readers restore.
FORMAT_VERSION_WITHOUT_KEYS = 3

PARAMS = "params"
STATISTICS = "statistics"
OPT_STATE = "opt_state"
METADATA = "umtam_metadata"
# The file Orbax's JSON handler writes the metadata into: ("umtam_metadata", "metadata").
METADATA_FILE = _targets._METADATA_FILE
_ARRAY_ITEMS = (PARAMS, STATISTICS, OPT_STATE)

# Orbax's suffix for the temporary directory of an in-progress save (AtomicRenameTemporaryPath).
_ORBAX_TMP_SUFFIX = _targets._ORBAX_TMP_SUFFIX


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


def _absolute(directory: str | os.PathLike[str]) -> epath.Path:
    """The absolute path; on a local disk a ``..`` is resolved as the file system does
    (``link/..`` is the parent of the link's target, where a shell's ``cd`` would take
    it), the last component is kept as given (a link there is refused by the writers)."""
    text = os.fspath(directory)
    if "://" not in text and ".." in text.split(os.sep):  # before epath normalises it
        parent, name = os.path.split(os.path.join(os.getcwd(), text).rstrip(os.sep))
        return epath.Path(os.path.join(os.path.realpath(parent), name))
    try:
        path = epath.Path(directory)
    except KeyError:  # etils names the unknown scheme only
        scheme = text.split("://")[0]
        raise ValueError(
            f"{text}: '{scheme}://' is not a file system scheme etils knows (gs://, s3://, "
            "...); a local path may not contain '://'"
        ) from None
    return path if path.is_absolute() else epath.Path(path.absolute())
