"""A restore that a concurrent overwrite swaps the checkpoint under, a target sharded over
an abstract mesh, and escaped key names: each a clear error, none called damage."""

from __future__ import annotations

import glob
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from umtam_jax import checkpoint
from umtam_jax.checkpoint import _metadata


def _params(value: float) -> dict:
    return {"w": np.full((4, 3), value, np.float32), "b": np.full((3,), value, np.float32)}


def test_an_overwrite_during_a_restore_is_not_reported_as_damage(tmp_path, monkeypatch):
    """An evaluator reading "latest" while the trainer overwrites it: the old checksum
    record was checked against the new arrays and the healthy checkpoint was called
    corrupt ("damaged or edited after the save")."""
    path = checkpoint.save_checkpoint(tmp_path / "latest", _params(1.0))
    read = _metadata.restore_items

    def overwritten_first(directory, args):
        if "params" in args:  # the arrays' read, after the metadata's and the records'
            checkpoint.save_checkpoint(directory, _params(2.0), overwrite=True)
        return read(directory, args)

    monkeypatch.setattr(_metadata, "restore_items", overwritten_first)
    with pytest.raises(checkpoint.CheckpointBusyError, match="replaced by a save while it"):
        checkpoint.restore_params(path)
    monkeypatch.setattr(_metadata, "restore_items", read)
    np.testing.assert_array_equal(checkpoint.restore_params(path)["w"], _params(2.0)["w"])


def test_a_reader_opened_before_an_overwrite_says_so(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", _params(1.0))
    reader = checkpoint.CheckpointReader(path)
    checkpoint.save_checkpoint(path, _params(2.0), overwrite=True)
    with pytest.raises(checkpoint.CheckpointBusyError, match="open a new reader|read it again"):
        reader.restore_arrays("params", [("w",)])
    assert checkpoint.CheckpointReader(path).restore_arrays("params", [("w",)])[0][0, 0] == 2.0


def test_real_damage_is_still_damage(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", _params(1.0))
    for data in glob.glob(f"{path}/params/**/d/*", recursive=True):
        blob = bytearray(pathlib.Path(data).read_bytes())
        blob[-1] ^= 0xFF
        pathlib.Path(data).write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointCorruptError):
        checkpoint.restore_params(path)


def test_a_target_over_an_abstract_mesh_is_a_configuration_error(tmp_path):
    """nnx.eval_shape under jax.set_mesh gives such targets: Orbax failed with "not
    implemented for AbstractMesh", reported as a corrupt checkpoint."""
    path = checkpoint.save_checkpoint(tmp_path / "ck", _params(1.0))
    mesh = jax.make_mesh((1,), ("x",)).abstract_mesh
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
        for k, v in _params(1.0).items()
    }
    with pytest.raises(ValueError, match="leaf [wb] onto a sharding over an abstract mesh") as info:
        checkpoint.restore_params(path, target=target)
    assert not isinstance(info.value, checkpoint.CheckpointCorruptError)


def test_messages_name_keys_as_the_user_wrote_them(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "ck", {"a.b": jnp.ones(2), "c/d%": jnp.ones(2)})
    with pytest.raises(ValueError, match="does not match") as info:
        checkpoint.restore_params(path, target={"a.b": jnp.ones(2)})
    assert "c/d%: in the checkpoint but not in the target" in str(info.value)
    with pytest.raises(TypeError, match=r"params leaf a\.b is float32"):
        checkpoint.restore_params(path, target={"a.b": jnp.ones(2, jnp.int32), "c/d%": jnp.ones(2)})
