"""The processes of a multi-host JAX run, as a save sees them: how many, which one
publishes, a barrier, a token every process shares, and data gathered from all."""

from __future__ import annotations

import uuid

import jax
import numpy as np


def count() -> int:
    """The number of JAX processes of this run."""
    return jax.process_count()


def is_primary() -> bool:
    """Whether this is process 0, the one that publishes."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name``."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def shared_token() -> str:
    """A random token, the same on every process (process 0's)."""
    from jax.experimental import multihost_utils

    mine = np.frombuffer(uuid.uuid4().hex[:12].encode(), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).decode()


def gather(data: bytes) -> list[bytes]:
    """Every process's ``data``, in process order (each process calls it)."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
    return [bytes(row[:size]) for row, size in zip(everyone, sizes, strict=True)]
