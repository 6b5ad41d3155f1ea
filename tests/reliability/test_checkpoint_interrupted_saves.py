"""Checkpoint saves interrupted or failing in process (KeyboardInterrupt, a failed rename):
a save that published succeeds even if the old copy stays, and an old output set aside
goes back to the path, at once or once the path is free; an interrupted save into an
empty folder leaves the folder as it was."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import warnings

import chex
import pytest

from tests.reliability.checkpoint_helpers import NEW, OLD, _hidden_leftovers
from umtam_jax import checkpoint
from umtam_jax.checkpoint import _safety


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


def test_an_old_copy_that_cannot_be_deleted_is_named_at_each_save(tmp_path, monkeypatch):
    """A copy set aside for deletion that cannot be deleted (its permissions) stayed
    beside the output with no word, save after save."""
    from umtam_jax.checkpoint import _filesystem

    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, OLD)
    monkeypatch.setattr(_filesystem, "rmtree", lambda p: None)  # as an undeletable folder
    with pytest.warns(UserWarning, match="output it replaced could not be deleted: .*trash"):
        checkpoint.save_checkpoint(path, NEW, overwrite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.save_checkpoint(path, OLD, overwrite=True)
    messages = [str(w.message) for w in caught]
    assert [w.filename for w in caught] == [__file__] * 2, caught  # the user's call
    assert "a leftover of an earlier save to" in messages[0], messages
    assert "output it replaced could not be deleted" in messages[1], messages
    monkeypatch.undo()
    checkpoint.save_checkpoint(path, NEW, overwrite=True)  # deletes both copies left
    assert _hidden_leftovers(path) == []
    chex.assert_trees_all_equal(checkpoint.restore_params(path), NEW)


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
