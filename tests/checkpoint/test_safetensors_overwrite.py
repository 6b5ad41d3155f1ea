"""Replacing a safetensors output: only umtam_jax's own folders are ever replaced, and a
replacement interrupted or killed half way is put back by the next reader or writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests import trees
from tests.checkpoint.safetensors_helpers import read_all
from umtam_jax import engine
from umtam_jax.checkpoint import _safety, restore_params, save_checkpoint, save_safetensors


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- overwrite


def test_only_our_own_output_is_ever_replaced(tmp_path):
    foreign = tmp_path / "hf_model"
    foreign.mkdir()
    save_file({"w": np.ones(3, np.float32)}, foreign / "model.safetensors")
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    before = snapshot(foreign)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a umtam_jax output.*no valid umtam_jax_safet"):
            save_safetensors(foreign, {"w": np.zeros(3, np.float32)}, overwrite=overwrite)
    assert snapshot(foreign) == before
    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)})
    with pytest.raises(
        ValueError, match="not a umtam_jax output.*ever replaced, even with overwrite"
    ):
        save_safetensors(ckpt, {"w": np.zeros(3, np.float32)}, overwrite=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ValueError, match="is not a umtam_jax checkpoint"):
        save_safetensors(a_file, {"w": np.zeros(3)}, overwrite=True)
    assert a_file.read_text() == "keep me"

    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_safetensors(ours, {"w": np.zeros(3)})
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3))
    save_safetensors(ours, {"v": np.zeros(2)}, overwrite=True)
    trees.assert_trees_bitwise_equal(read_all(ours), {"v": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf_model", "notes.txt", "ours"]


_KILLED_AFTER_RETIRING = """
import os, signal, sys
import numpy as np
from umtam_jax.checkpoint import _safety, save_safetensors
_safety._use_exchange = False
_safety._step_hook = lambda s: s == "retired" and os.kill(os.getpid(), signal.SIGKILL)
save_safetensors(sys.argv[1], {"w": np.zeros(3, np.float32)}, overwrite=True)
"""


def _interrupted_replacement(tmp_path):
    """A folder whose replacement (without the atomic exchange) was killed after the old
    folder was moved aside and before the new one was put in place."""
    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3, np.float32)})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RETIRING, str(ours)], env=env)
    assert run.returncode == -signal.SIGKILL
    assert not ours.exists() and any(".umtam-old-" in p for p in os.listdir(tmp_path))
    return ours


def test_an_interrupted_not_killed_replacement_puts_the_old_folder_back_at_once(
    tmp_path, monkeypatch
):
    ours = save_safetensors(tmp_path / "ours", {"w": np.ones(3, np.float32)})

    def interrupt(step):
        if step == "retired":
            raise KeyboardInterrupt

    monkeypatch.setattr(_safety, "_use_exchange", False)
    monkeypatch.setattr(_safety, "_step_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(ours, {"w": np.zeros(3)}, overwrite=True)
    assert os.listdir(tmp_path) == ["ours"]
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))


def test_an_interrupted_replacement_is_put_back(tmp_path):
    ours = _interrupted_replacement(tmp_path)
    # The next save repairs first: the old folder is ours, so it is put back, not deleted.
    with pytest.raises(FileExistsError):
        save_safetensors(ours, {"w": np.zeros(3)})
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["ours"]


def test_a_merge_reads_an_input_whose_replacement_was_interrupted(tmp_path):
    (tmp_path / "in").mkdir()
    ours = _interrupted_replacement(tmp_path / "in")
    out = engine.merge_checkpoints("linear", None, [ours], tmp_path / "out", progress=False)
    trees.assert_trees_bitwise_equal(read_all(out)["w"], np.ones(3, np.float32))


@pytest.mark.parametrize("opener", ["restore_params", "save_checkpoint"])
def test_the_other_formats_reader_or_writer_puts_an_interrupted_output_back(tmp_path, opener):
    """A safetensors replacement killed between its two renames leaves the old folder at a
    hidden name; an Orbax reader or writer opening the path deleted it (the only copy),
    as it was not an Orbax checkpoint. It is put back, and the opener refuses it."""
    ours = _interrupted_replacement(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match="not a umtam_jax"):
        if opener == "restore_params":
            restore_params(ours)
        else:
            save_checkpoint(ours, {"w": np.zeros(3)}, overwrite=True)
    trees.assert_trees_bitwise_equal(read_all(ours)["w"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["ours"]
