"""Restoring missing or corrupt Orbax checkpoints: each error names the checkpoint, the
item or the paths that do not match."""

from __future__ import annotations

import glob
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.checkpoint.orbax_helpers import hand_opt_state
from umtam_jax.checkpoint import (
    read_metadata,
    restore_checkpoint,
    restore_opt_state,
    restore_params,
    restore_statistics,
    save_checkpoint,
)

# ------------------------------------------------------------------------------------------
# missing or corrupt checkpoints
# ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3, jnp.bfloat16)}
    return save_checkpoint(tmp_path / "ckpt", params, opt_state=hand_opt_state())


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    for fn in (restore_params, restore_statistics, restore_checkpoint, read_metadata):
        with pytest.raises(FileNotFoundError, match="nope"):
            fn(missing)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="umtam_metadata"):
        restore_params(tmp_path / "empty")


def test_missing_item(saved):
    shutil.rmtree(saved / "statistics")
    with pytest.raises(FileNotFoundError, match="'statistics'") as info:
        restore_statistics(saved)
    assert str(saved) in str(info.value)
    np.testing.assert_array_equal(restore_params(saved)["w"], np.arange(12.0).reshape(4, 3))


def test_opt_state_not_saved(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)})
    with pytest.raises(FileNotFoundError, match="'opt_state'"):
        restore_opt_state(path, hand_opt_state())


def test_truncated_array_file(saved):
    for f in glob.glob(str(saved / "params" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(5)
    with pytest.raises(ValueError, match="'params'.*corrupt") as info:
        restore_params(saved)
    assert str(saved) in str(info.value)
    assert len(str(info.value)) < 1000


def test_truncated_metadata(saved):
    with open(saved / "umtam_metadata" / "metadata", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match="umtam_metadata.*corrupt"):
        restore_params(saved)


def test_unfinished_save_directory(saved):
    tmp = saved.parent / (saved.name + ".orbax-checkpoint-tmp")
    saved.rename(tmp)
    with pytest.raises(ValueError, match="incomplete"):
        restore_params(tmp)


def test_target_mismatch_names_paths(saved):
    bad = hand_opt_state()
    bad[0].leaves["w"] = bad[0].leaves["w"]._replace(u=jnp.ones((4, 3)))
    bad = (bad[0], bad[1])  # also drop an element
    with pytest.raises(ValueError, match="does not match") as info:
        restore_opt_state(saved, bad)
    msg = str(info.value)
    assert "0/leaves/w/u: shape (4, 2) in the checkpoint, (4, 3) in the target" in msg
    assert "2/count: in the checkpoint but not in the target" in msg
    assert "build the target with the rank, row_axes, min_dim_size_to_factor" in msg
    with pytest.raises(ValueError, match="does not match") as info:  # params: no such hint
        restore_params(saved, target={"w": jnp.ones((2, 2))})
    assert "row_axes" not in str(info.value)
