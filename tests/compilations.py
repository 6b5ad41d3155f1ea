"""What JAX compiles inside a block, for tests that a step, a sweep or a rebuilt transform
reuses its compilations."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax
import pytest


@contextlib.contextmanager
def compilations(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Yields a list that, once the block ends, holds the log message of every compilation
    run inside it (``"Compiling <name> ..."``)."""
    compiled: list[str] = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        start = len(caplog.records)
        yield compiled
        compiled.extend(
            r.getMessage() for r in caplog.records[start:] if "Compiling" in r.getMessage()
        )
