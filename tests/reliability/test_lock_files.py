"""The lock file shared by checkpoint saves and protocol work directories."""

import os

import pytest

from umtam_jax import _files
from umtam_jax.experiments import store


def _busy():
    return BlockingIOError("held")


def test_a_second_holder_is_refused_and_the_lock_file_goes_with_the_last_holder(tmp_path):
    lock = os.fspath(tmp_path / ".work.lock")
    with _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy):
        assert os.path.exists(lock)
        with (
            pytest.raises(BlockingIOError, match="held"),
            _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy),
        ):
            pass
        assert os.path.exists(lock)  # the refused second holder left it in place
    assert not os.path.exists(lock)
    with _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy):  # free again
        pass


def test_a_holder_whose_file_was_removed_leaves_the_next_holders_file(tmp_path):
    lock = os.fspath(tmp_path / ".work.lock")
    first = _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy)
    first.__enter__()
    os.unlink(lock)  # removed by hand while held
    with _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy):
        first.__exit__(None, None, None)  # must not remove the second holder's file
        assert os.path.exists(lock)
        with (
            pytest.raises(BlockingIOError, match="held"),
            _files.exclusive_lock(lock, cannot="cannot use work", busy=_busy),
        ):
            pass


def test_a_link_at_a_work_directory_lock_is_named_and_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    (tmp_path / "work").mkdir()
    os.symlink(victim, tmp_path / "work" / ".umtam-lock")
    with (
        pytest.raises(OSError, match=r"cannot lock .*work for a test: its lock file .* is a symb"),
        store.exclusive(tmp_path / "work", "a test"),
    ):
        pass
    assert not victim.exists()


@pytest.mark.parametrize("at_call", [1, 2])  # taking the lock, releasing it
def test_an_interrupt_while_the_lock_is_taken_or_released_never_keeps_it(
    tmp_path, monkeypatch, at_call
):
    """Ctrl-C between opening the lock file and the code that closes it kept the lock
    held until the process exited: every later save to the path was refused as busy."""
    lock = str(tmp_path / ".x.lock")
    names_file, calls = _files._names_file, []

    def interrupted(path, fd):
        calls.append(path)
        found = names_file(path, fd)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return found

    monkeypatch.setattr(_files, "_names_file", interrupted)
    with (
        pytest.raises(KeyboardInterrupt),
        _files.exclusive_lock(lock, cannot="cannot", busy=lambda: OSError("busy")),
    ):
        pass
    monkeypatch.undo()
    with _files.exclusive_lock(lock, cannot="cannot", busy=lambda: OSError("busy")):
        pass  # free again


@pytest.mark.parametrize("content", [b"", b"my notes\n"])
def test_a_users_file_at_the_lock_name_serves_as_the_lock_and_is_kept(tmp_path, content):
    """A file the library did not make at the lock's name was deleted on release."""
    lock = tmp_path / ".work.lock"
    lock.write_bytes(content)
    with (
        _files.exclusive_lock(os.fspath(lock), cannot="cannot use work", busy=_busy),
        pytest.raises(BlockingIOError, match="held"),
        _files.exclusive_lock(os.fspath(lock), cannot="cannot use work", busy=_busy),
    ):
        pass
    assert lock.read_bytes() == content  # kept, unchanged
    os.unlink(lock)
    with _files.exclusive_lock(os.fspath(lock), cannot="cannot use work", busy=_busy):
        assert lock.read_bytes() == _files.LOCK_MARK  # made here: marked, removed after
    assert not lock.exists()
