"""A safetensors file's header, parsed and checked (:func:`parse_header`).

A file is an 8-byte little-endian header length, a JSON header (each tensor's ``dtype``,
``shape`` and ``data_offsets``, plus ``__metadata__`` strings), then the tensors' bytes;
:data:`DTYPES` maps the format's dtype names to NumPy's.
"""

from __future__ import annotations

import math
import os
import struct

import jax.numpy as jnp
import numpy as np

from umtam_jax import _json

_MAX_HEADER = 100 * 2**20  # the reference implementation's limit
_MAX_DIMS = 64  # NumPy's
_TYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": jnp.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2,
}  # fmt: skip
#: The format's dtype names → NumPy dtypes (BF16 and F8 from ``ml_dtypes``).
DTYPES = {name: np.dtype(t) for name, t in _TYPES.items()}
#: NumPy dtypes → the format's names.
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_header(path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    """Parses and checks the header of one safetensors file (reading no tensor).

    Args:
      path: the file.

    Returns:
      ``({name: (dtype, shape, begin, end)}, __metadata__)``, offsets in the file.

    Raises:
      ValueError: naming the file (and tensor): not a regular file, malformed,
        truncated, tensors that do not tile the data exactly, or an unsupported dtype.
      OSError: naming the file, which cannot be read (its permissions, a disk error).
    """
    try:
        if not os.path.isfile(path):  # a FIFO's read may never return, a device's never ends
            raise ValueError("it is not a regular file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (-1,)
            if not 0 < length <= min(size - 8, _MAX_HEADER):
                raise ValueError(f"its header length {length} does not fit its {size} bytes")
            header = _json.loads(f.read(length).decode("utf-8"), unique_keys=True)
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise ValueError("its __metadata__ is not a mapping of strings")
        entries = []
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
                if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
                    raise TypeError
                if not all(type(i) is int and i >= 0 for i in [*shape, begin, end]):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"tensor {name!r} has an invalid entry {e}") from None
            # NumPy's limit on an array's extent, zero-size arrays included.
            if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 2**63:
                raise ValueError(f"tensor {name!r}: its shape {shape} is too large for an array")
            # Python integers: a crafted shape's element count cannot wrap around.
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: its data_offsets do not fit shape and dtype")
            entries.append((begin, end, name, dtype, tuple(shape)))
        entries.sort()
        cursor, data = 0, 8 + length
        for begin, end, name, _, _ in entries:
            if begin != cursor:
                raise ValueError(f"tensor {name!r} does not start where the previous one ends")
            cursor = end
        if data + cursor > size:
            last = entries[-1][2]
            raise ValueError(f"it is truncated: {last!r} ends at {data + cursor}, file {size} B")
        if data + cursor < size:
            raise ValueError(f"it has {size - data - cursor} stray bytes after its tensors")
    except OSError as err:  # unreadable, not malformed: its permissions, a disk error
        raise OSError(err.errno, f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    return {n: (d, s, data + b, data + e) for b, e, n, d, s in entries}, meta
