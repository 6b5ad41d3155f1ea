"""Checkpoint saves survive being killed and running concurrently: a save killed at any
step leaves the complete old or new checkpoint, the next save removes the leftovers (only
its own), a lock refuses a second writer, and a save of several processes checks the path
again and publishes once, from process 0."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings

import chex
import numpy as np
import pytest
from etils import epath

import umtam_jax
from tests.reliability.checkpoint_helpers import NEW, OLD, _hidden_leftovers
from umtam_jax import checkpoint, engine
from umtam_jax.checkpoint import _filesystem, _processes, _safety, _save

# ----------------------------------------------------------------------------- crashes

_KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from umtam_jax import checkpoint
    from umtam_jax.checkpoint import _safety

    path, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    _safety._use_exchange = exchange
    def hook(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    _safety._step_hook = hook
    new = {"w": -np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32)}
    checkpoint.save_checkpoint(path, new, overwrite=True)
    """
)


def _run_killed(path, step, exchange) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT, os.fspath(path), step, "1" if exchange else "0"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


@pytest.mark.parametrize(
    "exchange,step",
    [
        (True, "locked"),
        (True, "staged"),
        (True, "swapped"),
        (True, "trashed"),
        (False, "staged"),
        (False, "retired"),
        (False, "swapped"),
        (False, "trashed"),
    ],
)
def test_overwrite_killed_at_each_step_keeps_old_or_new(tmp_path, exchange, step):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, step, exchange) == -9
    # Right after the kill, or after the automatic recovery of the next call, the final
    # path holds the complete old or the complete new checkpoint.
    got = checkpoint.restore_params(path)
    is_new = np.array_equal(np.asarray(got["w"]), NEW["w"])
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW if is_new else OLD)
    if step in ("locked", "staged", "retired"):
        assert not is_new
    if step in ("swapped", "trashed"):
        assert is_new
    # The next save cleans up everything the killed one left and still works.
    checkpoint.save_checkpoint(path, OLD, overwrite=True)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    assert _hidden_leftovers(path) == []


@pytest.mark.parametrize("then", ["restore", "save", "save_fails"])
def test_an_empty_folder_made_after_a_killed_swap_gets_the_old_checkpoint_back(
    tmp_path, then, monkeypatch
):
    """Killed between retiring the old checkpoint and publishing the new one (no atomic
    exchange), then a script makes the output folder again before its next call."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, "retired", False) == -9
    assert not path.exists()
    path.mkdir()
    if then == "restore":
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    elif then == "save":  # without overwrite: the old checkpoint is back and kept
        with pytest.raises(FileExistsError):
            checkpoint.save_checkpoint(path, NEW)
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    else:  # a save that fails after its repair never leaves less than the old one
        monkeypatch.setattr(_save, "_write", _raise_oserror)
        with pytest.raises(OSError, match="disk on fire"):
            checkpoint.save_checkpoint(path, NEW, overwrite=True)
        chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)


def _raise_oserror(*args, **kwargs):
    raise OSError(errno.EIO, "disk on fire")


def test_a_killed_swaps_old_copy_is_kept_while_a_foreign_folder_holds_the_path(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    assert _run_killed(path, "retired", False) == -9
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    olds = [n for n in _hidden_leftovers(path) if ".umtam-old-" in n]
    with pytest.raises(ValueError, match="not a umtam_jax"):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    assert [n for n in _hidden_leftovers(path) if ".umtam-old-" in n] == olds != []
    assert (path / "notes.txt").read_text() == "mine"


def test_a_merge_never_replaces_a_training_checkpoint_a_killed_swap_put_aside(tmp_path):
    """The old folder of a killed fallback swap is put back under the merge's lock, and
    checked again there: it is a training checkpoint, so the merge refuses it."""
    path, expert = tmp_path / "train", tmp_path / "expert"
    state = umtam_jax.umtam(1e-2).init(OLD)
    checkpoint.save_checkpoint(path, OLD, opt_state=state)
    checkpoint.save_checkpoint(expert, NEW)
    assert _run_killed(path, "retired", False) == -9
    assert not path.exists()
    with pytest.raises(ValueError, match="it is a training checkpoint"):
        engine.merge_checkpoints("linear", None, [expert], path, overwrite=True, progress=False)
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    chex.assert_trees_all_equal(checkpoint.restore_opt_state(path, state), state)


@pytest.mark.parametrize("exchange", [True, False])
def test_a_save_that_published_succeeds_even_if_the_old_copy_stays(tmp_path, monkeypatch, exchange):
    """Once the new checkpoint is at the path the save has succeeded: an old copy that
    cannot be moved aside for deletion is left to the next save, not reported as a
    failure (the caller would believe the old checkpoint still stood)."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    rename = os.rename

    def no_trash(src, dst, *args, **kwargs):
        if ".umtam-trash-" in os.fspath(dst):
            raise OSError(errno.EIO, "simulated failure")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(_safety, "_use_exchange", exchange)
    monkeypatch.setattr(os, "rename", no_trash)
    if exchange:  # the old copy sits at the staging name, which the save deletes
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    else:
        with pytest.warns(UserWarning, match="could not be moved aside.*left at .*umtam-old-"):
            checkpoint.save_checkpoint(path, NEW, overwrite=True)
    monkeypatch.undo()
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW)
    if not exchange:  # the copy left behind is never taken for a killed swap's, but named
        shutil.rmtree(path)
        left = "a copy of an earlier .*umtam-old-.*: rename it to ckpt to use it"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the error names the copy; no warning besides
            with pytest.raises(FileNotFoundError, match=left):
                checkpoint.restore_params(path)
        with pytest.warns(UserWarning, match="holds no output, and a copy of an earlier one"):
            checkpoint.save_checkpoint(path, NEW)
    checkpoint.save_checkpoint(path, OLD, overwrite=True)  # deletes the copy left
    assert _hidden_leftovers(path) == []


def test_an_interrupt_right_after_the_old_output_is_set_aside_puts_it_back(tmp_path, monkeypatch):
    """Ctrl-C arrives as the rename that sets the old output aside returns (no atomic
    exchange): the old output is back at the path when the exception leaves the save."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    rename = os.rename

    def interrupted_rename(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if ".umtam-old-" in os.fspath(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(_safety, "_use_exchange", False)
    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)


def test_an_old_output_that_cannot_go_back_at_once_goes_back_once_the_path_is_free(
    tmp_path, monkeypatch
):
    """Another program takes the path while the old output is set aside, and the save is
    interrupted: the old output and the save's staging folder stay (named in a warning)
    until the path is free, then a restore puts the old output back."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)

    def take_the_path(step):
        if step == "retired":
            (path / "logs").mkdir(parents=True)
            raise KeyboardInterrupt

    monkeypatch.setattr(_safety, "_use_exchange", False)
    monkeypatch.setattr(_safety, "_step_hook", take_the_path)
    with (
        pytest.warns(UserWarning, match="putting it back failed too.*kept at .*umtam-old-"),
        pytest.raises(KeyboardInterrupt),
    ):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    monkeypatch.undo()
    shutil.rmtree(path)  # the other program's folder goes
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)
    assert os.listdir(tmp_path) == ["ckpt"]


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


def test_an_interrupted_save_into_an_empty_folder_leaves_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "out"
    path.mkdir(mode=0o750)
    os.chmod(path, 0o750)

    def interrupted(step):
        if step == "staged":  # the next steps remove the empty folder, then rename
            monkeypatch.setattr(_safety, "_renameat2", _interrupt)
            monkeypatch.setattr(_safety, "_use_exchange", True)

    monkeypatch.setattr(_safety, "_step_hook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, NEW)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(path) == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_lock_name_planted_as_a_link_is_never_followed(tmp_path):
    path, victim = tmp_path / "ckpt", tmp_path / "victim"
    os.symlink(victim, tmp_path / ".ckpt.umtam-lock")
    with pytest.raises(OSError, match="lock file .*ckpt.umtam-lock is a symbolic link"):
        checkpoint.save_checkpoint(path, OLD)
    assert not victim.exists() and not path.exists()


def test_killed_streaming_write_leaves_nothing_at_the_path(tmp_path):
    path = tmp_path / "merged"
    script = textwrap.dedent(
        """
        import os, signal, sys
        import jax, numpy as np
        from umtam_jax import checkpoint
        like = {f"w{i}": jax.ShapeDtypeStruct((64,), np.float32) for i in range(4)}
        def produce(i):
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return np.full((64,), i, np.float32)
        checkpoint.save_params_streaming(sys.argv[1], like, produce)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, os.fspath(path)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9
    assert not path.exists()
    assert _hidden_leftovers(path)  # the killed run's staging folder is still there ...
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_params(path)
    checkpoint.save_checkpoint(path, OLD)
    assert _hidden_leftovers(path) == []  # ... until the next save to that path
    chex.assert_trees_all_equal(checkpoint.restore_params(path), OLD)


def test_stale_leftovers_removed_and_neighbours_untouched(tmp_path):
    path = tmp_path / "ckpt"
    stale = (
        ".ckpt.umtam-new-0123456789ab",
        ".ckpt.umtam-trash-0123456789ab",
        ".ckpt.umtam-new-0123456789ab.orbax-checkpoint-tmp-1",
    )
    for name in stale:
        (tmp_path / name / "params").mkdir(parents=True)
        (tmp_path / name / "params" / "junk").write_bytes(b"0" * 1000)
    # Not derived from a save of ours to ckpt: never deleted (an Orbax save of another tool).
    # Nor a user's folder that only starts like a leftover (no 12-hex-digit token).
    neighbours = [
        ".ckpt2.umtam-new-0123456789ab",
        "ckpt.txt",
        ".ckpt",
        "ckpt.orbax-checkpoint-tmp-1",
    ]
    neighbours += [".ckpt.umtam-new-mybackup", ".ckpt.umtam-trash-notes"]
    for name in neighbours:
        (tmp_path / name).write_text("mine")
    checkpoint.save_checkpoint(path, OLD)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *neighbours])


# ----------------------------------------------------------------------------- locking


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
