"""Hugging Face safetensors model folders, read and written lazily, without torch.

A folder holds one ``model.safetensors``, or shards ``model-00001-of-00003.safetensors``, ...
listed in ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
"weight_map": {name: shard}}``). A file is an 8-byte little-endian header length, a JSON
header (each tensor's ``dtype``, ``shape`` and ``data_offsets``, plus ``__metadata__``
strings) padded with spaces to a multiple of 8, then the tensors' little-endian bytes.
:class:`SafetensorsReader` reads headers when opened and then one tensor at a time;
:func:`save_safetensors` writes each header first and then streams the tensors, so neither
holds a whole model. Nothing is ever unpickled: folders of PyTorch pickles are refused.

Names and pytrees: a tensor name split on ``"."`` gives nested dicts with string keys,
``"bert.encoder.layer.0.attention.self.query.weight"`` ↔ ``{"bert": {"encoder": {"layer":
{"0": {"attention": {"self": {"query": {"weight": array}}}}}}}}``. From a pytree, dict keys,
sequence indices and attribute names are the components; an empty component, one holding
``"."`` or a name that is also another's prefix (``"a.b"``, ``"a.b.c"``) is refused, so the
mapping is exact both ways.

Integrity and safety: files written here record each tensor's CRC-32 in ``__metadata__``
under ``"umtam_jax.crc32"`` (a JSON string ``{name: "CRC DTYPE SHAPE"}``, the CRC in 8 hex
digits; files of earlier versions record the CRC alone), checked on read with
``verify=True``; foreign files have no checksum, only their structure is checked. A written
folder holds the marker file ``umtam_jax_safetensors.json`` (``{"format":
"umtam_jax-safetensors", "version": 1}``). Writes are atomic and locked (``_safety``) and
only a folder with that marker is ever replaced, with ``overwrite=True``. Local disks only.

Example:
  >>> import tempfile, numpy as np, jax.numpy as jnp
  >>> from umtam_jax.checkpoint import SafetensorsReader, save_safetensors
  >>> tree = {"dense": {"kernel": np.ones((2, 3), jnp.bfloat16)}}
  >>> path = save_safetensors(tempfile.mkdtemp() + "/model", tree)
  >>> SafetensorsReader(path).abstract()["dense"]["kernel"].dtype
  dtype(bfloat16)

References:
  The safetensors format: https://github.com/huggingface/safetensors#format
  Sharded checkpoints: https://huggingface.co/docs/transformers/main/en/big_models
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from umtam_jax import _json
from umtam_jax.checkpoint import _contents, _integrity, _leftovers, _targets
from umtam_jax.checkpoint import _format as F
from umtam_jax.checkpoint._integrity import CheckpointCorruptError
from umtam_jax.checkpoint._names import split_name, tree_from_names
from umtam_jax.checkpoint._safetensors_header import DTYPE_NAMES, parse_header
from umtam_jax.checkpoint._write_errors import CheckpointBusyError

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MARKER_FILE = "umtam_jax_safetensors.json"
MARKER = {"format": "umtam_jax-safetensors", "version": 1}
CRC_KEY = "umtam_jax.crc32"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_INDEX = 64 * 2**20  # an index lists each tensor once: ~100 kB for a 70B model
_MAX_SMALL_FILE = 2**16  # the marker file


# ----------------------------------------------------------------------------- reading


def _is_own(path: epath.Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_safetensors` (its marker file)."""
    try:
        return _json.loads(_targets.read_record(path / MARKER_FILE, _MAX_SMALL_FILE)) == MARKER
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False


#: A folder written by :func:`save_safetensors`.
SAFETENSORS = _targets.OutputKind(_is_own, MARKER_FILE)


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """Which file a path leads to, as it was: a save writes new files and swaps folders,
    and the file it replaced is deleted, so its inode number may be the next new file's
    (ext4 reuses them at once); the modification time and size tell the two apart, and an
    edit in place changes them too. (Not the change time: a hard link or a chmod of an
    input changes it, not the file.)"""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


#: The alignment of the arrays a reader returns: JAX on CPU takes a NumPy array aligned
#: so without copying it (an unaligned one, it copies twice over: a 600 MB embedding held
#: three times while it is read).
_ALIGNMENT = 64


def _aligned_bytes(n: int) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``n`` bytes starting at a multiple of
    ``_ALIGNMENT``."""
    raw = np.empty(n + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + n]


def _pickle_note(files: Iterable[str]) -> str:
    if not (pickles := [f for f in files if f.endswith(PICKLES)]):
        return ""
    return (
        f"; it holds pickled weights ({', '.join(pickles)}), which are never loaded "
        "(unpickling can run arbitrary code): convert them to safetensors first"
    )


class SafetensorsReader:
    """Reads tensors one at a time from a Hugging Face safetensors folder (or file).

    Opening reads only the headers.

    Args:
      folder: a folder with ``model.safetensors``, or ``model.safetensors.index.json`` and
        its shards; or one ``.safetensors`` file.
      verify: check the tensors of files written by :func:`save_safetensors` against their
        recorded CRC-32 as they are read.

    Attributes:
      names: every tensor's name, by shard file name, then by position in the file.
      metadata: the first shard's ``__metadata__`` (a dict of strings; empty without).
      is_folder: whether ``folder`` is a folder rather than one file.
      folder: the model's folder, absolute (an ``epath.Path``): ``folder`` itself, or
        the folder holding the file.
      files: the weight files read (``epath.Path``): ``model.safetensors``, the shards in
        name order, or the one file.

    Raises:
      FileNotFoundError: no such path, no safetensors weights, or a missing shard.
      ValueError: pickled weights only, an invalid index or header, a truncated file, a
        tensor absent from its shard or in two shards.
      CheckpointCorruptError: with ``verify``, an unreadable checksum record.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax.checkpoint import SafetensorsReader, save_safetensors
      >>> path = save_safetensors(tempfile.mkdtemp() + "/model", {"w": np.ones(3)})
      >>> reader = SafetensorsReader(path)
      >>> reader.names, reader.shape("w"), reader.read(["w"])[0].sum()
      (['w'], (3,), np.float64(3.0))

    References:
      the safetensors format, https://huggingface.co/docs/safetensors
    """

    def __init__(self, folder: str | os.PathLike, *, verify: bool = True):
        path = F._absolute(folder)
        _leftovers.recover(path, SAFETENSORS)  # a save killed in the middle of its swap
        if not path.exists():
            raise FileNotFoundError(f"no safetensors model at {path}: it does not exist")
        self.is_folder = path.is_dir()
        if self.is_folder:
            self.folder, shard_of = path, self._shard_map(path)
            files = [MODEL_FILE] if shard_of is None else sorted(set(shard_of.values()))
        elif path.name.endswith(".safetensors"):
            self.folder, shard_of, files = path.parent, None, [path.name]
        else:
            raise ValueError(f"{path} is not a .safetensors file{_pickle_note([path.name])}")
        self.files = [self.folder / f for f in files]
        if missing := [f for f in self.files if not f.exists()]:
            raise FileNotFoundError(f"{INDEX_FILE} in {path} names missing shard {missing[0]}")
        self._entries: dict[str, tuple] = {}
        self._crcs: dict[str, int] = {}
        # Which file each name was when opened: a save that replaces the folder meanwhile
        # makes a later read fail as such, not as damage (or read a mix of both).
        self._opened = {os.fspath(f): _file_identity(os.stat(f)) for f in self.files}
        headers = [(os.fspath(f), *parse_header(os.fspath(f))) for f in self.files]
        self.metadata: dict[str, str] = headers[0][2]
        own = verify and _is_own(self.folder)  # its files all carry CRCs
        if own and self.is_folder:
            self._check_recorded_files(files)
        for file, tensors, meta in headers:
            for name, entry in tensors.items():
                if name in self._entries:
                    first = self._entries[name][0]
                    raise ValueError(f"tensor {name!r} is in two shards: {first} and {file}")
                self._entries[name] = (file, *entry)
            if verify and CRC_KEY in meta:
                self._crcs.update(self._checksums(file, meta[CRC_KEY], tensors))
            elif own:
                raise CheckpointCorruptError(
                    f"{file} is corrupt: its header has no {CRC_KEY!r} record, which every "
                    f"file of a folder written by save_safetensors ({MARKER_FILE}) holds"
                )
        for name, shard in (shard_of or {}).items():
            if name not in self._entries:
                raise ValueError(
                    f"tensor {name!r} is listed in {INDEX_FILE} in {path} but absent from {shard}"
                )
            if os.path.basename(found := self._entries[name][0]) != shard:
                raise ValueError(
                    f"{INDEX_FILE} in {path} maps {name!r} to {shard}, but it is in {found}"
                )
        if shard_of is not None and (unlisted := self._entries.keys() - shard_of.keys()):
            raise ValueError(f"{INDEX_FILE} in {path} does not list tensor {min(unlisted)!r}")
        if not self._entries:
            raise ValueError(f"the safetensors model at {path} holds no tensors")
        self.names = list(self._entries)

    @staticmethod
    def _shard_map(folder: epath.Path) -> dict[str, str] | None:
        """``{name: shard file}`` from the index, or None for a single ``model.safetensors``."""
        index = folder / INDEX_FILE
        if (folder / MODEL_FILE).exists():
            if index.exists():
                warnings.warn(
                    f"{folder} holds both {MODEL_FILE} and {INDEX_FILE}: reading {MODEL_FILE} "
                    "alone, as transformers does (the index and its shards are not read)",
                    stacklevel=2,
                )
            return None
        if not index.exists():
            note = _pickle_note(sorted(p.name for p in folder.iterdir()))
            error = ValueError if note else FileNotFoundError
            raise error(f"no {MODEL_FILE} or {INDEX_FILE} in {folder}{note}")
        try:
            record = _targets.read_record(index, _MAX_INDEX)
            shard_of = _json.loads(record, unique_keys=True)["weight_map"]
            if not isinstance(shard_of, dict) or not all(
                isinstance(v, str) for v in shard_of.values()
            ):
                raise ValueError("its weight_map is not a mapping of tensor names to files")
            if not shard_of or any(os.path.basename(v) != v for v in shard_of.values()):
                raise ValueError("its weight_map is empty or names a shard outside the folder")
        except _targets.UnsafeFileError as err:  # "is a FIFO, not a regular file"
            raise ValueError(f"the index {index} {err}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err}") from None
        return shard_of

    def _check_recorded_files(self, files: list[str]) -> None:
        """Raises where a weights file the folder's save recorded (its contents record) is
        not among ``files``, those the index names: a shard deleted with its index entries
        would otherwise read as a smaller model."""
        recorded = _contents.recorded_contents(self.folder) or ()
        written = [n for n in recorded if n.endswith(".safetensors") and "/" not in n]
        if lost := sorted(set(written) - set(files)):
            how = "is now missing" if not (self.folder / lost[0]).exists() else "its index omits"
            raise CheckpointCorruptError(
                f"{self.folder} is corrupt: it was written with the weights file {lost[0]}, "
                f"which {how}"
            )

    @staticmethod
    def _checksums(file: str, record: str, tensors: Mapping[str, Any]) -> dict[str, int]:
        """Each tensor's recorded CRC-32, after checking its recorded dtype and shape (files
        of earlier versions record the CRC alone) against the header's."""
        try:
            fields = {n: v.split(" ") for n, v in _json.loads(record).items()}
            crcs = {n: int(f[0], 16) for n, f in fields.items()}
        except (ValueError, TypeError, AttributeError):
            fields, crcs = {}, {}
        if crcs.keys() != tensors.keys():
            raise CheckpointCorruptError(f"{file} is corrupt: its {CRC_KEY} record is damaged")
        for name, f in fields.items():
            dtype, shape = tensors[name][0], tensors[name][1]
            actual = [DTYPE_NAMES[dtype], ",".join(map(str, shape))]
            if len(f) > 1 and f[1:] != actual:
                raise CheckpointCorruptError(
                    f"{file} is corrupt: tensor {name!r} was written as {f[1]} of shape "
                    f"({f[2] if len(f) > 2 else '?'}), its header now says {actual[0]} of "
                    f"shape {shape}"
                )
        return crcs

    def _entry(self, name: str) -> tuple:
        if name not in self._entries:
            raise ValueError(f"{self.folder} has no tensor {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, from its header.

        Args:
          name: the tensor's name.

        Returns:
          Its shape.

        Raises:
          ValueError: no tensor of that name.
        """
        return self._entry(name)[2]

    def dtype(self, name: str) -> np.dtype:
        """The NumPy dtype of a tensor, from its header.

        Args:
          name: the tensor's name.

        Returns:
          Its dtype (BF16 is ``ml_dtypes.bfloat16``).

        Raises:
          ValueError: no tensor of that name.
        """
        return self._entry(name)[1]

    def paths(self) -> dict[str, tuple[str, ...]]:
        """Each tensor's key path in :meth:`abstract`.

        Returns:
          ``{tensor name: its name split on "."}``, in :attr:`names` order.

        Raises:
          ValueError: a name with an empty component.
        """
        return {name: split_name(name) for name in self.names}

    def abstract(self) -> dict[str, Any]:
        """The tensors' structure, from the headers alone.

        Returns:
          Nested dicts keyed by the names' ``.``-separated components, with a
          ``jax.ShapeDtypeStruct`` per tensor.

        Raises:
          ValueError: names that do not nest (an empty component, or a name that is
            another's prefix).
        """
        return tree_from_names(
            {n: jax.ShapeDtypeStruct(e[2], e[1]) for n, e in self._entries.items()}
        )

    def read(self, names: Iterable[str]) -> list[np.ndarray]:
        """Reads tensors, one at a time, into fresh writable NumPy arrays.

        Args:
          names: tensor names.

        Returns:
          One array per name, dtype and bytes as stored.

        Raises:
          ValueError: an unknown name, or a file that cannot be read (changed since opened).
          CheckpointBusyError: a save replaced the file (or it was changed) since the
            reader was opened.
          CheckpointCorruptError: with ``verify``, a tensor that differs from its CRC-32.
        """
        out = []
        for name in names:
            file, dtype, shape, begin, end = self._entry(name)
            buf = _aligned_bytes(end - begin)
            try:
                with open(file, "rb") as f:
                    if _file_identity(os.fstat(f.fileno())) != self._opened[file]:
                        raise CheckpointBusyError(
                            f"{file} was replaced while it was read (a save overwrote "
                            f"{self.folder}, or the file was changed): open it again"
                        )
                    f.seek(begin)
                    if f.readinto(buf) != buf.size:  # type: ignore[arg-type]  # a buffer
                        raise OSError("the file is shorter than when it was opened")
            except CheckpointBusyError:
                raise
            except OSError as err:
                raise ValueError(f"cannot read tensor {name!r} from {file}: {err}") from None
            array = buf.view(dtype).reshape(shape)
            if name in self._crcs and _integrity.crc32(array) != self._crcs[name]:
                raise CheckpointCorruptError(
                    f"{file} is corrupt: tensor {name!r} fails its checksum"
                )
            out.append(array)
        return out
