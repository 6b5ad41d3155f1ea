"""Checkpoint saves killed (SIGKILL) at any step: the path holds the complete old or new
checkpoint (also when a folder is made at it again, or a foreign one holds it), a merge
never replaces a training checkpoint a killed swap put aside, a killed streaming write
leaves nothing at the path, and the next save removes the leftovers (only its own)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest

import umtam_jax
from tests.reliability.checkpoint_helpers import NEW, OLD, _hidden_leftovers
from umtam_jax import checkpoint, engine
from umtam_jax.checkpoint import _save

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
