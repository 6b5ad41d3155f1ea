"""A failed Orbax read prints nothing after its clean error: the read coroutines it left
unfinished, closed when garbage collected, raised Orbax's read error from their
``GeneratorExit`` and Python printed each as "Exception ignored in: <coroutine object
_read_array_index_and_device_put>" with a TensorStore spec of some sixty lines. The hook
of :mod:`umtam_jax.checkpoint._closed_loop` drops exactly those and passes every other
unraisable exception on."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import textwrap
import types
from types import SimpleNamespace

import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from umtam_jax import checkpoint
from umtam_jax.checkpoint import _closed_loop, _integrity

_ORBAX_ERROR = "Encountered error while reading array index: (slice(0, 3, 1),). See full"


@types.coroutine
def _pause():
    yield


def _read_left_running(filename, error=_ORBAX_ERROR, name="_read_array_index_and_device_put"):
    """A coroutine shaped like Orbax's read of one array index (compiled as if from
    ``filename``), suspended at its ``await`` as a read a failed restore left running."""
    source = f"""
    async def {name}(pause):
        try:
            await pause()
        except BaseException as e:
            raise Exception({error!r}) from e
    """
    namespace: dict = {}
    exec(compile(textwrap.dedent(source), filename, "exec"), namespace)
    coroutine = namespace[name](_pause)
    coroutine.send(None)
    return coroutine


@pytest.fixture
def seen(monkeypatch):
    """The unraisable exceptions that reach the hook below the chained one."""
    reached: list = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)  # both restored after the test
    monkeypatch.setattr(_closed_loop, "_installed", False)
    monkeypatch.setattr(_closed_loop, "_wrapped", None)
    _closed_loop.drop_closed_loop_callbacks()
    yield reached
    gc.collect()  # leftovers of the test's reads meet its hooks


def test_an_abandoned_orbax_read_coroutine_is_dropped(seen):
    coroutine = _read_left_running(serialization.__file__)
    del coroutine  # closed: GeneratorExit, turned into Orbax's read error
    gc.collect()
    assert seen == []


@pytest.mark.parametrize(
    ("filename", "error", "name"),
    [
        ("/elsewhere/mine.py", _ORBAX_ERROR, "_read_array_index_and_device_put"),
        (serialization.__file__, "another error", "_read_array_index_and_device_put"),
        (serialization.__file__, _ORBAX_ERROR, "_another_coroutine"),
    ],
)
def test_other_coroutines_closed_with_an_error_are_passed_on(seen, filename, error, name):
    coroutine = _read_left_running(filename, error, name)
    del coroutine
    gc.collect()
    assert [str(u.exc_value) for u in seen] == [error]


def test_orbax_read_errors_not_from_a_closed_coroutine_are_passed_on(seen):
    coroutine = _read_left_running(serialization.__file__)
    failed = Exception(_ORBAX_ERROR)
    failed.__cause__ = ValueError("a real read failure")
    other = SimpleNamespace(exc_value=failed, exc_traceback=None, object=coroutine)
    sys.unraisablehook(other)
    assert seen == [other]
    seen.clear()
    del other, coroutine  # closed here, while the hook is in place: dropped
    gc.collect()
    assert seen == []


def test_a_failed_restore_leaves_no_read_coroutines_to_print(tmp_path, seen, capfd):
    """One leaf's recorded shape differs from the stored one, so
    Orbax's read fails at once while the other leaf's read is left unfinished (in about
    half of such reads)."""
    params = {"a": {"w": np.ones(3, np.float32)}, "b": np.ones(2, np.float32)}
    path = checkpoint.save_checkpoint(tmp_path / "ck", params)
    meta = json.loads((path / "umtam_metadata" / "metadata").read_text())
    meta["structures"]["params"]["children"][1][2]["shape"] = [1]
    sums = json.loads((path / _integrity.CHECKSUMS_FILE).read_text())
    sums["items"]["params"]["b"]["shape"] = [1]
    sums["metadata"] = _integrity.metadata_crc32(meta)
    (path / "umtam_metadata" / "metadata").write_text(json.dumps(meta))
    (path / _integrity.CHECKSUMS_FILE).write_text(json.dumps(sums))
    for _ in range(6):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="not compatible"):
            checkpoint.restore_params(path)
        gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
    assert seen == []


def test_asyncio_reports_of_a_failed_reads_other_errors_are_dropped(tmp_path, caplog):
    """The other arrays' reads of a damaged checkpoint fail too, and nothing retrieves
    their errors: asyncio logged each ("Future exception was never retrieved") with
    TensorStore's error. Those naming a failed read's folder are dropped, others pass."""
    folder = tmp_path / "ck" / "params"
    _closed_loop.note_failed_read(folder)
    loop = asyncio.new_event_loop()

    def abandon(message):  # a future whose error nobody retrieves, collected
        loop.create_future().set_exception(ValueError(message))
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandon(f'DATA_LOSS: Error reading "w/.zarray" in OCDBT database at local file "{folder}/"')
        assert caplog.records == []
        abandon(f'DATA_LOSS: Error reading "w/.zarray" at local file "{folder}2/"')
        abandon(f'DATA_LOSS: Error reading "w/.zarray" at local file "/elsewhere{folder}/"')
    loop.close()
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "Future exception was never retrieved"
    ] * 2  # another folder, and one that only ends like the failed one
