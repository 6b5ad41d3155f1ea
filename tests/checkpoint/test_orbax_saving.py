"""Saving an Orbax checkpoint: overwrite and atomicity (a failed save leaves nothing or
the old checkpoint), and arrays no restore could read refused before writing."""

from __future__ import annotations

import os
import types

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import umtam_jax
from tests.checkpoint.orbax_helpers import hand_opt_state, tiny_params
from umtam_jax.checkpoint import restore_params, save_checkpoint

# ------------------------------------------------------------------------------------------
# overwrite and atomicity
# ------------------------------------------------------------------------------------------


def test_overwrite_refused_then_allowed(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, {"w": jnp.zeros(3)})
    with pytest.raises(FileExistsError, match=str(target)):
        save_checkpoint(target, {"w": jnp.ones(3)})
    np.testing.assert_array_equal(restore_params(target)["w"], np.zeros(3))

    save_checkpoint(target, {"w": jnp.ones(3)}, overwrite=True)
    np.testing.assert_array_equal(restore_params(target)["w"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging leftovers


def _fail_metadata_write(monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated failure mid-save")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", boom)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", boom)


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    _fail_metadata_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}  # hand_opt_state's shapes
        save_checkpoint(tmp_path / "ckpt", params, opt_state=hand_opt_state())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_checkpoint(target, {"w": jnp.zeros(3)})
    _fail_metadata_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_checkpoint(target, {"w": jnp.ones(3)}, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    np.testing.assert_array_equal(restore_params(target)["w"], np.zeros(3))


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"f": object()}, r"metadata\['f'\] is a object"),
        ({"run": {"steps": [1, np.int64(2)]}}, r"metadata\['run'\]\['steps'\]\[1\] is a int64"),
        ({"lr": {1: "x"}}, r"metadata\['lr'\] has the key 1 \(int\).* come back as \"1\""),
        ({"cfg": types.MappingProxyType({"a": 1})}, r"metadata\['cfg'\] is a mappingproxy"),
        (5, "metadata must be a mapping, not a int"),
    ],
)
def test_bad_metadata_is_named_and_writes_nothing(tmp_path, metadata, named):
    """Metadata JSON would not give back as it is: the part named (an int key came back
    as a string, with no word)."""
    with pytest.raises(TypeError, match=named):
        save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)}, metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_empty_array_is_refused_with_its_path_and_writes_nothing(tmp_path):
    params = {"w": jnp.ones((3, 3)), "extra_tokens": jnp.zeros((0, 3))}
    with pytest.raises(ValueError, match=r"params: the array at \['extra_tokens'\] is empty"):
        save_checkpoint(tmp_path / "ckpt", params)
    opt = umtam_jax.umtam(0.1, rank=1, min_dim_size_to_factor=1)
    with pytest.raises(ValueError, match=r"\['extra_tokens'\].*is empty"):
        save_checkpoint(tmp_path / "ckpt", {"w": params["w"]}, opt_state=opt.init(params))
    assert os.listdir(tmp_path) == []


def test_an_array_of_objects_or_strings_is_refused_with_its_path_and_writes_nothing(tmp_path):
    """It reached TensorStore, whose threads printed tracebacks before its own error."""
    for bad in (np.array([object()]), np.array(["a", "b"])):
        with pytest.raises(TypeError, match=r"params: the array at \['tokens'\] has dtype"):
            save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones(3), "tokens": bad})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("dtype", "why"),
    [(">f4", "byte order is not the machine's"), (">i8", "byte order"),
     (np.longdouble, "no such dtype"), (np.clongdouble, "no such dtype")],
)  # fmt: skip
def test_an_array_no_restore_could_read_is_refused_before_writing(tmp_path, dtype, why):
    """A big-endian array (np.fromfile, FITS, HDF5) was saved and then every restore called
    the checkpoint corrupt; float128 reached TensorStore, which printed tracebacks."""
    wide = np.dtype(dtype).itemsize > (16 if np.dtype(dtype).kind == "c" else 8)
    if why == "no such dtype" and not wide:
        pytest.skip("this platform's long double is a float64")
    with pytest.raises(TypeError, match=rf"params: the array at \['a'\]\['w'\] .*{why}"):
        save_checkpoint(tmp_path / "ckpt", {"a": {"w": np.ones(3, dtype)}})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("writer", ["orbax", "safetensors"])
def test_every_file_is_on_the_disk_before_an_older_output_is_replaced(
    tmp_path, monkeypatch, writer
):
    """Orbax flushes its data files, not its metadata (``_METADATA``, ``metadata``,
    ``commit_success.txt``): published over an older checkpoint, whose copy is deleted
    right after, a crash of the machine could leave neither readable. Every file of the
    new output is flushed before the swap."""
    from umtam_jax.checkpoint import _safety, save_safetensors

    def save(overwrite):
        if writer == "orbax":
            save_checkpoint(str(tmp_path / "c"), tiny_params(), overwrite=overwrite)
        else:
            save_safetensors(tmp_path / "c", {"w": np.ones(3, np.float32)}, overwrite=overwrite)

    save(False)
    synced, published = set(), []
    real_fsync, real_publish = os.fsync, _safety._publish

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def publish(staging, directory, *args, **kwargs):
        published.append(
            {
                os.path.realpath(os.path.join(root, f))
                for root, _, fs in os.walk(staging)
                for f in fs
            }
        )
        return real_publish(staging, directory, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_safety, "_publish", publish)
    save(True)
    assert len(published) == 1 and published[0], published
    assert not published[0] - synced, sorted(published[0] - synced)
