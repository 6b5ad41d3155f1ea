"""Writing Hugging Face safetensors folders, one tensor at a time, and Orbax conversions.

:func:`save_safetensors` writes each shard's header first, then streams the tensors, so at
most one tensor is held; the folder is written atomically, checksummed and marked as ours
(see :mod:`umtam_jax.checkpoint._safetensors` for the format, the name mapping and the
marker). :func:`safetensors_to_orbax` and :func:`orbax_to_safetensors` convert a model's
parameters between the two formats a few arrays at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _filesystem, _integrity, _processes, _safety, _targets
from umtam_jax.checkpoint import _format as F
from umtam_jax.checkpoint._model_files import adjust_config, files_to_copy
from umtam_jax.checkpoint._names import names_from_tree, tree_from_names
from umtam_jax.checkpoint._partial_restore import CheckpointReader
from umtam_jax.checkpoint._safetensors import (
    CRC_KEY,
    INDEX_FILE,
    MARKER,
    MARKER_FILE,
    MODEL_FILE,
    SAFETENSORS,
    SafetensorsReader,
)
from umtam_jax.checkpoint._safetensors_header import DTYPE_NAMES
from umtam_jax.checkpoint._streaming import save_params_streaming

_RESTORE_GROUP_BYTES = 256 * 2**20  # bytes restored per Orbax call when converting


# ----------------------------------------------------------------------------- writing


def _parse_size(size: int | str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if isinstance(size, bool) or not match or match[2].upper() not in units:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5000000000 or '5GB'")
    if (value := int(float(match[1]) * units[match[2].upper()])) <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _header(tensors: list, crcs: Mapping[str, int], metadata: Mapping[str, str]) -> bytes:
    """One shard's padded header; its length does not depend on the CRC values. Each
    tensor's record is its CRC-32, dtype and shape (``"0123abcd F32 2,3"``): an edit of
    the header's dtype or shape is detected like one of the bytes."""
    record = json.dumps(
        {
            name: f"{crcs.get(name, 0):08x} {DTYPE_NAMES[dtype]} {','.join(map(str, shape))}"
            for name, shape, dtype, _, _ in tensors
        },
        separators=(",", ":"),
    )
    header: dict[str, Any] = {"__metadata__": {**metadata, CRC_KEY: record}}
    for name, shape, dtype, begin, end in tensors:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _sync(path: epath.Path, data: bytes | None = None) -> None:
    """Writes ``data`` to ``path`` (None: keeps the content) and flushes it to disk."""
    with open(path, "wb" if data is not None else "rb+") as f:
        if data is not None:
            f.write(data)
            f.flush()
        os.fsync(f.fileno())


def save_safetensors(
    folder: str | os.PathLike,
    tree_or_abstract: Any,
    produce: Callable[[int], Any] | None = None,
    *,
    max_shard_size: int | str = 5 * 10**9,
    overwrite: bool = False,
    copy_files_from: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_tied_embeddings: bool = False,
) -> epath.Path:
    """Writes a pytree as a Hugging Face safetensors folder, one tensor at a time.

    Tensors are laid out in ``jax.tree.leaves`` order: one ``model.safetensors`` if all fit
    in ``max_shard_size`` bytes, else shards ``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json``. A tensor larger than the limit gets a shard of its own.

    Args:
      folder: the folder to create.
      tree_or_abstract: arrays (NumPy or JAX), or with ``produce`` a pytree of
        ``jax.ShapeDtypeStruct``; tensor names as :func:`names_from_tree` gives them.
      produce: ``produce(i)`` returns leaf ``i``; called once per leaf, in order, and only
        one produced array is held at a time.
      max_shard_size: bytes per shard: an int, or a string like ``"5GB"`` or ``"500MiB"``.
      overwrite: replace a folder written earlier by this function.
      copy_files_from: a model folder whose config and tokenizer files are copied; the
        copied ``config.json`` gets the written floating dtype, and ``tie_word_embeddings:
        false`` where it ties the output embedding to the input one and both are written.
      metadata: extra ``__metadata__`` entries (non-string values are JSON-encoded;
        ``format`` is ``"pt"``, which transformers requires).
      keep_tied_embeddings: leave a tying config tied even where both embeddings are
        written (the written output embedding is then a copy that transformers does not
        read, as in a model saved tied with both).

    Returns:
      The absolute folder path.

    Raises:
      ValueError: an existing folder or file not written here (whatever ``overwrite``
        says), a bad name, dtype or size, or a produced array of the wrong shape or dtype.
      FileExistsError: the folder exists and ``overwrite`` is False.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import save_safetensors
      >>> path = save_safetensors(tempfile.mkdtemp() + "/model", {"w": np.zeros(2)})
      >>> sorted(p.name for p in path.iterdir())
      ['.umtam-contents.json', 'model.safetensors', 'umtam_jax_safetensors.json']

    References:
      the safetensors format, https://huggingface.co/docs/safetensors
    """
    return write_safetensors(
        folder,
        tree_or_abstract,
        produce,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        copy_files_from=copy_files_from,
        metadata=metadata,
        keep_tied_embeddings=keep_tied_embeddings,
        kind=SAFETENSORS,
    )


def write_safetensors(
    folder: str | os.PathLike,
    tree_or_abstract: Any,
    produce: Callable[[int], Any] | None,
    *,
    max_shard_size: int | str,
    overwrite: bool,
    copy_files_from: str | os.PathLike | None,
    metadata: Mapping[str, Any] | None,
    keep_tied_embeddings: bool,
    kind: _targets.OutputKind,
) -> epath.Path:
    """:func:`save_safetensors`, replacing only the outputs ``kind`` accepts (see
    :func:`._targets.check_target`)."""
    folder = F._absolute(folder)
    _safety.check_output(folder, overwrite=overwrite, kind=kind)
    if _processes.count() > 1:
        raise ValueError("save_safetensors writes from a single process only")
    leaves = names_from_tree(tree_or_abstract)
    if not leaves:
        raise ValueError("the tree has no leaves to write")
    user = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if CRC_KEY in user:
        raise ValueError(f"metadata key {CRC_KEY!r} is reserved")
    if user.get("format", "pt") != "pt":  # transformers loads only "pt" files into PyTorch
        raise ValueError(f"metadata key 'format' is 'pt' here, got {user['format']!r}")
    limit, sizes = _parse_size(max_shard_size), [0]
    shards: list[list[Any]] = [[]]
    for name, leaf in leaves.items():
        if (dtype := E.dtype_of(leaf)) not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        shape = [int(d) for d in np.shape(leaf)]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((name, shape, dtype, sizes[-1], sizes[-1] + nbytes))
        sizes[-1] += nbytes
    n = len(shards)
    files = (
        [MODEL_FILE]
        if n == 1
        else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    )
    source = None if copy_files_from is None else F._absolute(copy_files_from)
    if source is not None and not source.is_dir():
        raise FileNotFoundError(f"copy_files_from {source} is not a folder")
    copied = [] if source is None else files_to_copy(source)
    get = produce if produce is not None else list(leaves.values()).__getitem__
    index = iter(range(len(leaves)))

    with _safety.publishing(folder, overwrite=overwrite, kind=kind) as staging:
        os.makedirs(staging)
        meta = {"format": "pt", **user}
        for file, tensors in zip(files, shards, strict=True):
            crcs: dict[str, int] = {}
            with open(staging / file, "wb") as f:
                f.write(_header(tensors, crcs, meta))  # CRC placeholders until written
                for name, shape, dtype, _, _ in tensors:
                    array = np.asarray(get(next(index)))
                    if list(array.shape) != shape or array.dtype != dtype:
                        raise ValueError(
                            f"tensor {name!r} was produced with shape {array.shape} and dtype "
                            f"{array.dtype}; expected {tuple(shape)} and {dtype}"
                        )
                    flat = np.ascontiguousarray(array).reshape(
                        -1
                    )  # copies only if not C-contiguous
                    crcs[name] = _integrity.crc32(flat)
                    f.write(flat.view(np.uint8).data)
                    del array, flat
                f.seek(0)
                f.write(_header(tensors, crcs, meta))
                f.flush()
                os.fsync(f.fileno())
        if n > 1:
            weight_map = {t[0]: f for f, ts in zip(files, shards, strict=True) for t in ts}
            record = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _sync(staging / INDEX_FILE, json.dumps(record, indent=2).encode())
        dtypes = {dtype for shard in shards for _, _, dtype, _, _ in shard}
        floating = {d for d in dtypes if jnp.issubdtype(d, jnp.floating)}
        for name in copied:
            assert source is not None  # nothing is copied without one
            with (source / name).open("rb") as src, open(staging / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if name == "config.json":
                dtype = floating.pop() if len(floating) == 1 else None
                adjust_config(staging / name, dtype, set(leaves), keep_tied_embeddings)
            _sync(staging / name)
        _sync(staging / MARKER_FILE, json.dumps(MARKER).encode())
        _filesystem.fsync_dir(staging)
    return folder


# ----------------------------------------------------------------------------- converters


def safetensors_to_orbax(
    folder: str | os.PathLike, checkpoint_dir: str | os.PathLike, *, overwrite: bool = False
) -> epath.Path:
    """Converts a safetensors folder to a umtam_jax parameter checkpoint, tensor by tensor.

    Args:
      folder: a safetensors folder or file (see :class:`SafetensorsReader`).
      checkpoint_dir: the checkpoint to create; its ``params`` are :func:`tree_from_names`
        of the tensors.
      overwrite: replace a umtam_jax checkpoint at ``checkpoint_dir``.

    Returns:
      The checkpoint directory, for :func:`~umtam_jax.checkpoint.restore_params`.

    Raises:
      ValueError: ``checkpoint_dir`` is, contains or lies inside ``folder``.
      As :class:`SafetensorsReader` and :func:`~umtam_jax.checkpoint.save_params_streaming`.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import restore_params, safetensors_to_orbax, save_safetensors
      >>> root = tempfile.mkdtemp()
      >>> src = save_safetensors(f"{root}/model", {"w": np.ones(2)})
      >>> ckpt = safetensors_to_orbax(src, f"{root}/ckpt")
      >>> restore_params(ckpt)["w"].tolist()
      [1.0, 1.0]

    References:
      the safetensors format, https://huggingface.co/docs/safetensors
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    _targets.check_output_not_input(checkpoint_dir, [("the safetensors input", folder)])
    reader = SafetensorsReader(folder)
    abstract = reader.abstract()
    order = list(names_from_tree(abstract))
    return save_params_streaming(
        checkpoint_dir, abstract, lambda i: reader.read([order[i]])[0], overwrite=overwrite
    )


#: The node types of a structure record that are mappings of names to subtrees.
_MAPPINGS = ("State", "FrozenDict")


def _spec_names(spec: dict[str, Any], stored: tuple = (), names: tuple = ()):
    """Yields (tensor name, stored path, leaf spec) of a structure record of nested
    mappings."""
    where = ".".join(names) or "the root"
    if spec["t"] == "array":
        yield ".".join(names), stored, spec
        return
    # Dicts, and mappings saved as nodes (an nnx.State, a FrozenDict), with string keys
    # or integer ones (nnx.Sequential's layers), which name tensors as their digits.
    mapping = spec["t"] == "dict" or (spec["t"] == "node" and spec.get("type") in _MAPPINGS)
    if not mapping or any(kind not in ("s", "i") for _, kind, *_ in spec["children"]):
        what = spec.get("type") or spec["t"]
        raise ValueError(f"params must be nested mappings with string or integer keys; "
                         f"{where} is a {what!r}")  # fmt: skip
    for safe, _, child, *original in spec["children"]:
        if (key := original[0] if original else safe) == "" or "." in key:
            raise ValueError(f"params key {key!r} in {where} cannot be part of a tensor name")
        yield from _spec_names(child, stored + (safe,), names + (key,))


def orbax_to_safetensors(
    checkpoint_dir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = 5 * 10**9,
    copy_files_from: str | os.PathLike | None = None,
) -> epath.Path:
    """Converts a checkpoint's ``params`` to a safetensors folder, a few arrays at a time.

    Args:
      checkpoint_dir: a umtam_jax checkpoint whose ``params`` are nested mappings (dicts,
        an ``nnx.State``) with string or integer keys (each array is verified against its
        checksum as it is restored).
      folder: the safetensors folder to create.
      overwrite: as for :func:`save_safetensors`.
      max_shard_size: as for :func:`save_safetensors`.
      copy_files_from: as for :func:`save_safetensors`.

    Returns:
      The folder.

    Raises:
      ValueError: params that are not nested mappings, or a key that is empty or has
        ``"."``; ``folder`` is, contains or lies inside ``checkpoint_dir`` or
        ``copy_files_from``.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import SafetensorsReader, orbax_to_safetensors, save_checkpoint
      >>> root = tempfile.mkdtemp()
      >>> ckpt = save_checkpoint(f"{root}/ckpt", {"w": np.ones(2)})
      >>> path = orbax_to_safetensors(ckpt, f"{root}/model")
      >>> SafetensorsReader(path).names
      ['w']

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
      the safetensors format, https://huggingface.co/docs/safetensors
    """
    inputs = [("the checkpoint", checkpoint_dir)]
    if copy_files_from is not None:
        inputs.append(("copy_files_from", copy_files_from))
    _targets.check_output_not_input(folder, inputs)
    reader = CheckpointReader(checkpoint_dir)
    found = list(_spec_names(reader.structure(F.PARAMS)))
    stored = {name: path for name, path, _ in found}
    abstract = tree_from_names(
        {n: jax.ShapeDtypeStruct(tuple(s["shape"]), np.dtype(s["dtype"])) for n, _, s in found}
    )
    order = list(names_from_tree(abstract))
    nbytes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)]
    cache: dict[int, np.ndarray] = {}

    def produce(i: int) -> np.ndarray:
        if i not in cache:  # restores leaf i and the next ones up to the byte budget
            group, total = [i], nbytes[i]
            while (j := group[-1] + 1) < len(order) and total + nbytes[j] <= _RESTORE_GROUP_BYTES:
                group, total = group + [j], total + nbytes[j]
            arrays = reader.restore_arrays(F.PARAMS, [stored[order[j]] for j in group])
            cache.update(zip(group, arrays, strict=True))
        return cache.pop(i)

    return save_safetensors(
        folder,
        abstract,
        produce,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        copy_files_from=copy_files_from,
    )
