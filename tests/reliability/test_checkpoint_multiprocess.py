"""A checkpoint saved by a multi-process run (arrays sharded across processes) is verified
like a single process's: each shard's CRC-32 is recorded, and a damaged data file is
reported when any process, or a single process later, reads it back."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from umtam_jax import checkpoint

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ROOT = pathlib.Path(__file__).parents[2]


def _run_pod(directory, mode):
    """Runs the worker as processes 0 and 1 of one run; returns their outputs."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(directory), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.fixture(scope="module")
def pod_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pod") / "ckpt"
    _run_pod(path, "save")
    return path


def test_shards_of_arrays_no_process_sees_whole_are_checksummed(pod_checkpoint):
    records = json.loads((pod_checkpoint / "umtam_checksums.json").read_text())["items"]
    w = records["params"]["w"]
    assert w["crc32"] is None
    # Four column blocks of 8, each once (the first replica), with its own CRC-32.
    assert [s["index"] for s in w["shards"]] == [[[0, 64], [8 * i, 8 * i + 8]] for i in range(4)]
    values = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    for shard in w["shards"]:
        (r0, r1), (c0, c1) = shard["index"]
        assert shard["crc32"] == checkpoint._integrity.crc32(values[r0:r1, c0:c1])
    # Replicated over both processes: one shard, the whole array.
    assert [s["index"] for s in records["params"]["b"]["shards"]] == [[[0, 32]]]


def test_a_pod_checkpoint_restores_on_one_process_and_on_the_pod(pod_checkpoint, tmp_path):
    got = checkpoint.restore_params(pod_checkpoint)
    np.testing.assert_array_equal(got["w"], np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    assert all("RESTORED" in out for out in _run_pod(pod_checkpoint, "restore"))


@pytest.mark.parametrize("seed", range(6))
def test_a_flipped_byte_in_a_pod_checkpoint_is_never_silently_wrong(pod_checkpoint, tmp_path, seed):
    """Before shard checksums, 12 of 15 such flips restored silently as other values. A
    flip may also land in bytes no value is read from (the store's own index), which then
    restores exactly."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(pod_checkpoint, path)
    rng = np.random.default_rng(seed)
    files = sorted(glob.glob(f"{path}/params/**/d/*", recursive=True))
    data = files[int(rng.integers(len(files)))]
    blob = bytearray(pathlib.Path(data).read_bytes())
    blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
    pathlib.Path(data).write_bytes(blob)
    if seed < 2:  # each process checks the shards it reads (the worker checks values)
        outputs = _run_pod(path, "restore")
        assert all("CORRUPT" in out or "RESTORED" in out for out in outputs), outputs
        # Damage one process found is every process's error (the other went on alone).
        assert len({"CORRUPT" in out for out in outputs}) == 1, outputs
        # Onto column blocks twice as wide, each holds two saved shards: checked too.
        coarse = _run_pod(path, "restore_coarse")
        assert [("CORRUPT" in out) for out in coarse] == [("CORRUPT" in out) for out in outputs]
    try:
        got = checkpoint.restore_params(path)
    except checkpoint.CheckpointCorruptError:
        return
    np.testing.assert_array_equal(got["w"], np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    np.testing.assert_array_equal(got["b"], np.ones(32, np.float32))
