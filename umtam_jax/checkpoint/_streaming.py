"""Incremental parameter writes: a checkpoint whose arrays are produced one at a time.

With :class:`~umtam_jax.checkpoint._partial_restore.CheckpointReader` (partial restore),
this lets a model larger than host memory be processed a few arrays at a time, with Orbax
doing all the I/O.

:func:`save_params_streaming` writes a parameter checkpoint whose arrays are produced one
at a time by a callback, during a single Orbax save: each array is computed, written by
TensorStore and dropped before the next one is requested, so the host never holds more
than one output array (plus Orbax's buffers for it). The result is an ordinary
:func:`umtam_jax.checkpoint.save_checkpoint` checkpoint with a ``params`` item (arrays
stored like NumPy arrays, restored as ``jax.Array`` by
:func:`~umtam_jax.checkpoint.restore_params`) and the same JSON metadata. The save is
atomic as Orbax's always is (temporary directory, renamed when complete); with
``overwrite=True`` the new checkpoint is written under a hidden sibling name and swapped
in, so a failed write keeps the old one.

How the incremental write works: the save runs in a background thread and is given a
tree of lazy placeholders; a TypeHandler registered for them (a subclass of Orbax's
``NumpyHandler`` with the same type string, so the checkpoint is indistinguishable from
one of NumPy arrays) writes them one by one in the tree's flattening order, each waiting
for its array from the calling thread, which produces them in that order through a
one-slot queue. All computation thus stays in the caller's thread (with its JAX
configuration contexts, e.g. ``jax.enable_x64``), overlapped with the writing of the
previous array.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from umtam_jax import _pytrees
from umtam_jax.checkpoint import _encoding as E
from umtam_jax.checkpoint import _format as F
from umtam_jax.checkpoint import _integrity, _keys, _safety, _save, _targets

__all__ = ["save_params_streaming"]


class _Aborted(Exception):
    """Raised in the writer when the producing thread gave up (its error is re-raised)."""


class _Channel:
    """Hands produced arrays from the caller's thread to Orbax's writer, in index order.

    At most one array waits in the channel, so the caller computes leaf ``i + 1`` while
    leaf ``i`` is written, and no more than that is ever in flight.
    """

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self.aborted = threading.Event()
        self.writer_done = threading.Event()

    def put(self, index: int, array: np.ndarray) -> bool:
        """False if the writer stopped (its error is reported by the save thread)."""
        while True:
            try:
                self._queue.put((index, array), timeout=0.05)
                return True
            except queue.Full:
                if self.writer_done.is_set():
                    return False

    def get(self, index: int) -> np.ndarray:
        while True:
            try:
                got, array = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self.aborted.is_set():
                    raise _Aborted("the producer of the streamed arrays failed") from None
                continue
            if got != index:  # pragma: no cover - the handler sorts by index
                raise RuntimeError(f"streamed leaf {got} arrived when {index} was expected")
            return array


class _HideAbortTraces(logging.Filter):
    """Drops the tracebacks Orbax's writer threads log for :class:`_Aborted`: the producer's
    own error is what the caller gets, and those traces would only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Aborted))


class _LazyArray:
    """A placeholder leaf whose array arrives through a :class:`_Channel` when written."""

    def __init__(self, index: int, shape: tuple[int, ...], dtype: np.dtype, channel: _Channel):
        self.index = index
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._channel = channel

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        return self._channel.get(self.index)


class _LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    """Writes :class:`_LazyArray` leaves one at a time, in their ``index`` order.

    Same type string as Orbax's ``NumpyHandler`` (``"np.ndarray"``): the stored arrays and
    metadata are those of NumPy leaves, restored by the standard handlers.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _write_sequentially(self, values, infos, args) -> None:
        for value, info, arg in sorted(
            zip(values, infos, args, strict=True), key=lambda x: x[0].index
        ):
            # Waits (in a worker thread) for the caller's thread to produce the array.
            array = await asyncio.to_thread(value.materialize)
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info,
                arg=arg,
                global_shape=array.shape,
                local_shape=array.shape,
                dtype=array.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(
                    use_ocdbt=info.is_ocdbt_checkpoint, override_ocdbt_process_id=None
                ),
                metadata_key=self._metadata_key,
            )
            await self._open_and_write(array, spec.json, info.ts_context)
            del array

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        ocp.type_handlers.check_input_arguments(values, infos, args)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(
                self._write_sequentially(values, infos, args), name="umtam_streaming_write"
            )
        ]


def _streaming_handler() -> ocp.CompositeCheckpointHandler:
    types = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (_LazyArray, _LazyArrayHandler()),
    )
    registry = ocp.DefaultCheckpointHandlerRegistry()
    registry.add(
        F.PARAMS, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    )
    registry.add(F.METADATA, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    options = ocp.CompositeOptions(
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)
    )
    return ocp.CompositeCheckpointHandler(handler_registry=registry, composite_options=options)


def _write_streaming(
    path: epath.Path,
    leaves: list[tuple[tuple[str, ...], tuple[int, ...], np.dtype]],
    produce: Callable[[int], Any],
    metadata: dict[str, Any],
) -> None:
    """Runs the Orbax save in a thread while this thread produces the arrays in order."""
    channel = _Channel()
    arrays: dict[str, Any] = {}
    for i, (path_i, shape, dtype) in enumerate(leaves):
        E.nested_set(arrays, path_i, _LazyArray(i, shape, dtype, channel))
    args = ocp.args.Composite(
        **{F.PARAMS: ocp.args.PyTreeSave(arrays), F.METADATA: ocp.args.JsonSave(metadata)}
    )
    errors: list[BaseException] = []
    records: dict[str, Any] = {}

    def save() -> None:
        try:
            with ocp.Checkpointer(_streaming_handler()) as checkpointer:
                checkpointer.save(path, args=args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)
        finally:
            channel.writer_done.set()

    writer = threading.Thread(target=save, name="umtam_streaming_save", daemon=True)
    hide = _HideAbortTraces()
    logging.getLogger("absl").addFilter(hide)  # Orbax logs through absl
    writer.start()
    try:
        for i, (_, shape, dtype) in enumerate(leaves):
            array = np.asarray(produce(i))
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(
                    f"leaf {i} was produced with shape {array.shape} and dtype "
                    f"{array.dtype}; expected {shape} and {dtype}"
                )
            records[_integrity.key(leaves[i][0])] = _integrity.record(array)
            if not channel.put(i, array):
                break
            del array
    except BaseException:
        channel.aborted.set()  # the writer stops; the producer's error is the one raised
        raise
    finally:
        writer.join()
        logging.getLogger("absl").removeFilter(hide)
    if errors:
        raise errors[0]
    _integrity.write(path, {F.PARAMS: records}, metadata)


def save_params_streaming(
    directory: str | os.PathLike[str],
    abstract_params: Any,
    produce: Callable[[int], Any],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> epath.Path:
    """Writes a parameter checkpoint whose arrays are computed one at a time.

    ``produce(i)`` is called exactly once for each leaf ``i`` of ``abstract_params``, in
    ``jax.tree_util`` flattening order, in the calling thread, and must return an array of
    that leaf's shape and dtype. While it computes leaf ``i + 1``, Orbax (in a background
    thread) writes leaf ``i``; at most one more produced array waits, so about two output
    leaves are held at a time. An exception raised by ``produce`` aborts the save (nothing
    is left at ``directory``) and is re-raised. The leaves are numeric arrays: a typed PRNG
    key (``jax.random.key``) is refused before anything is produced; a tree holding keys
    is saved with :func:`~umtam_jax.checkpoint.save_checkpoint`.

    Args:
      directory: the checkpoint directory to create.
      abstract_params: a pytree of ``jax.ShapeDtypeStruct`` (or arrays) giving the
        parameters' structure, shapes and dtypes.
      produce: ``produce(leaf_index) -> array``.
      overwrite: replace an existing ``directory`` (written under a hidden sibling name,
        then swapped in).
      metadata: JSON-serialisable user metadata (``metadata["user"]`` on restore).

    Returns:
      The checkpoint directory; restorable with :func:`~umtam_jax.checkpoint.restore_params`.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      TypeError: unserialisable metadata, non-array leaves, or a typed PRNG key leaf
        (named).
      ValueError: no array leaves, or ``produce`` returned a wrong shape or dtype.

    Example:
      >>> import tempfile, jax, numpy as np
      >>> from umtam_jax.checkpoint import restore_params, save_params_streaming
      >>> like = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
      >>> path = save_params_streaming(tempfile.mkdtemp() + "/ckpt", like,
      ...                              lambda i: np.ones((2, 3), np.float32))
      >>> float(restore_params(path)["w"].sum())
      6.0

    References:
      Orbax checkpointing, https://orbax.readthedocs.io
    """
    return stream_params(directory, abstract_params, produce, overwrite, metadata)


def stream_params(
    directory: str | os.PathLike[str],
    abstract_params: Any,
    produce: Callable[[int], Any],
    overwrite: bool,
    metadata: Mapping[str, Any] | None,
    kind: _targets.OutputKind = _targets.CHECKPOINT,
) -> epath.Path:
    """:func:`save_params_streaming`, replacing only the outputs ``kind`` accepts (see
    :func:`._targets.check_target`)."""
    directory = F._absolute(directory)
    _pytrees.check_no_flax_objects({"abstract_params": abstract_params})
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        if _keys.is_key(leaf):
            raise TypeError(
                f"leaf {jax.tree_util.keystr(keypath)} of abstract_params is a PRNG key "
                f"({leaf.dtype}): a streaming save stores numeric arrays; save a tree "
                "with keys with save_checkpoint (or stream the parameters without it)"
            )
    _targets.check_target(directory, overwrite=overwrite, kind=kind)
    enc = E.encode(abstract_params, F.PARAMS)
    if not enc.leaves:
        raise ValueError("abstract_params has no array leaves")
    leaves = [
        (path, tuple(np.shape(leaf)), E.dtype_of(leaf))
        for path, leaf in zip(enc.paths, enc.leaves, strict=True)
    ]
    meta = _save._metadata_record({F.PARAMS: enc}, None, _save._user_metadata(metadata))
    with _safety.publishing(directory, overwrite=overwrite, kind=kind) as staging:
        _write_streaming(staging, leaves, produce, meta)
    return directory
