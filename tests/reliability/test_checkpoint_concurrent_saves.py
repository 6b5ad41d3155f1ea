"""Checkpoint saves running concurrently: a lock refuses a second writer (and is never a
link followed), a restore during another save's swap is told to read again, and a save
of several processes checks the path again and publishes once, from process 0."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
from etils import epath

from tests.reliability.checkpoint_helpers import NEW, OLD, _hidden_leftovers
from umtam_jax import checkpoint, engine
from umtam_jax.checkpoint import _filesystem, _processes, _save

# ----------------------------------------------------------------------------- locking


def test_a_restore_during_another_saves_unfinished_swap_is_told_to_read_again(tmp_path):
    """The old output set aside by a save running right now (its lock held) is that
    save's, not a copy to rename back by hand."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    with _filesystem.locked(epath.Path(path)):  # the other save, between its renames
        os.rename(path, tmp_path / ".ckpt.umtam-old-0123456789ab")
        os.mkdir(tmp_path / ".ckpt.umtam-new-0123456789ab")
        with pytest.raises(checkpoint.CheckpointBusyError, match="being replaced by a save"):
            checkpoint.restore_params(path)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)  # put back


def test_a_lock_name_planted_as_a_link_is_never_followed(tmp_path):
    path, victim = tmp_path / "ckpt", tmp_path / "victim"
    os.symlink(victim, tmp_path / ".ckpt.umtam-lock")
    with pytest.raises(OSError, match="lock file .*ckpt.umtam-lock is a symbolic link"):
        checkpoint.save_checkpoint(path, OLD)
    assert not victim.exists() and not path.exists()


def test_a_writer_that_sees_another_saves_swap_half_done_is_told_it_is_busy(tmp_path):
    """The check before the lock compares the output's record with its files: another
    save's swap in between made them disagree, and the second writer was told to move
    the library's own files out of the way."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    (path / "stray.txt").write_text("seen mid-swap")
    busy = pytest.raises(checkpoint.CheckpointBusyError, match="being written")
    with _filesystem.locked(epath.Path(path)), busy:
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    with pytest.raises(ValueError, match="umtam_jax did not write"):  # no save running
        checkpoint.save_checkpoint(path, NEW, overwrite=True)


def test_second_writer_fails_at_once(tmp_path):
    path = tmp_path / "ckpt"
    with _filesystem.locked(epath.Path(path)):
        with pytest.raises(checkpoint.CheckpointBusyError, match="being written"):
            checkpoint.save_checkpoint(path, OLD)
        with pytest.raises(checkpoint.CheckpointBusyError):
            engine.merge_checkpoints(
                "task_arithmetic",
                checkpoint.save_checkpoint(tmp_path / "base", OLD),
                [checkpoint.save_checkpoint(tmp_path / "e", NEW)],
                path,
                progress=False,
            )
    assert not path.exists()
    checkpoint.save_checkpoint(path, OLD)  # the lock is gone with its holder
    assert _hidden_leftovers(path) == []


def test_concurrent_processes_never_mix(tmp_path):
    """A writer paused after staging holds the lock; a second process is refused."""
    path = tmp_path / "ckpt"
    ready = tmp_path / "ready"
    go = tmp_path / "go"
    slow = textwrap.dedent(
        """
        import os, sys, time
        import numpy as np
        from umtam_jax import checkpoint
        from umtam_jax.checkpoint import _safety
        def hook(name):
            if name == "staged":
                open(sys.argv[2], "w").close()
                while not os.path.exists(sys.argv[3]):
                    time.sleep(0.05)
        _safety._step_hook = hook
        checkpoint.save_checkpoint(sys.argv[1], {"w": np.full(8, 1.0, np.float32)})
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen(
        [sys.executable, "-c", slow, os.fspath(path), os.fspath(ready), os.fspath(go)], env=env
    )
    try:
        for _ in range(1200):
            if ready.exists() or first.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert ready.exists()
        with pytest.raises(checkpoint.CheckpointBusyError):
            checkpoint.save_checkpoint(path, {"w": np.full(8, 2.0, np.float32)})
    finally:
        go.touch()
        first.wait(timeout=120)
    assert first.returncode == 0
    np.testing.assert_array_equal(np.asarray(checkpoint.restore_params(path)["w"]), 1.0)


# ----------------------------------------------------------------------------- several processes


def test_multiprocess_save_publishes_from_process_zero(tmp_path, monkeypatch):
    """The collective path: a shared staging name, barriers, process 0 publishes."""
    barriers = []
    monkeypatch.setattr(_processes, "count", lambda: 2)
    monkeypatch.setattr(_processes, "shared_token", lambda: "sharedtoken0")
    monkeypatch.setattr(_processes, "barrier", barriers.append)
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert [b.rsplit("_", 1)[0] for b in barriers[:3]] == [
        "umtam_checkpoint_start",
        "umtam_checkpoint_staged",
        "umtam_checkpoint_published",
    ]
    assert len(barriers) == 6
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW)
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_multiprocess_save_checks_the_path_again_before_publishing(
    tmp_path, monkeypatch, overwrite
):
    """A folder made at a free path, or a file put into the checkpoint being replaced,
    while the processes write: every process refuses, nothing is swapped away."""
    path = tmp_path / "ckpt"
    if overwrite:
        checkpoint.save_checkpoint(path, OLD)
    monkeypatch.setattr(_processes, "count", lambda: 2)
    monkeypatch.setattr(_processes, "shared_token", lambda: "sharedtoken0")
    barriers = []
    monkeypatch.setattr(_processes, "barrier", barriers.append)
    write = _save._write

    def write_then_the_user_writes(*args, **kwargs):
        write(*args, **kwargs)
        path.mkdir(exist_ok=True)
        (path / "thesis.tex").write_text("mine")

    monkeypatch.setattr(_save, "_write", write_then_the_user_writes)
    with pytest.raises((ValueError, FileExistsError), match="thesis.tex|not a umtam_jax"):
        checkpoint.save_checkpoint(path, NEW, overwrite=overwrite)
    assert (path / "thesis.tex").read_text() == "mine"
    assert [n for n in _hidden_leftovers(path) if "umtam-new" in n] == []
    # Every process stops before the barrier after which process 0 publishes.
    assert not any(b.startswith("umtam_checkpoint_staged") for b in barriers)
