"""Mistakes a user makes with checkpoints, each refused with one message saying what is
wrong and where: a safetensors folder given to ``restore_params``, a Flax NNX module or
optimizer given whole, a dict mixing key types, and an optimizer state of other
parameters (refused before anything is written)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from umtam_jax import checkpoint

# ------------------------------------------------------------------------------------------
# a safetensors folder is not a umtam_jax checkpoint
# ------------------------------------------------------------------------------------------


def test_restore_params_of_a_safetensors_folder_names_the_safetensors_api(tmp_path):
    folder = checkpoint.save_safetensors(tmp_path / "st", {"w": np.ones((2, 2), np.float32)})
    with pytest.raises(FileNotFoundError, match="safetensors folder") as info:
        checkpoint.restore_params(folder)
    assert "SafetensorsReader" in str(info.value)
    assert "safetensors_to_orbax" in str(info.value)
    assert "plain Orbax" not in str(info.value)


def test_a_sharded_safetensors_index_alone_is_named_too(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(FileNotFoundError, match="safetensors folder"):
        checkpoint.restore_params(folder)


def test_a_plain_folder_still_gets_the_orbax_message(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="plain Orbax"):
        checkpoint.restore_params(tmp_path / "plain")


# ------------------------------------------------------------------------------------------
# Flax NNX objects given whole
# ------------------------------------------------------------------------------------------


def test_an_nnx_module_as_params_is_refused_naming_nnx_state(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="Flax NNX Linear") as info:
        checkpoint.save_checkpoint(tmp_path / "o", model)
    assert "nnx.state(model, nnx.Param)" in str(info.value)
    assert "PytreeState" not in str(info.value)
    with pytest.raises(TypeError, match=re.escape("params['model'] is a Flax NNX Linear")):
        checkpoint.save_checkpoint(tmp_path / "o", {"model": model})
    assert not (tmp_path / "o").exists()
    with pytest.raises(TypeError, match="abstract_params is a Flax NNX Linear"):
        checkpoint.save_params_streaming(tmp_path / "o", model, lambda i: None)
    assert not (tmp_path / "o").exists()
    path = checkpoint.save_checkpoint(tmp_path / "s", nnx.state(model, nnx.Param))
    with pytest.raises(TypeError, match="the params target is a Flax NNX Linear") as info:
        checkpoint.restore_params(path, target=model)
    assert "restore_params' target" in str(info.value)
    restored = checkpoint.restore_params(path, target=nnx.state(model, nnx.Param))
    nnx.update(model, restored)  # what the message says to do works


def test_an_nnx_optimizer_as_opt_state_is_refused_naming_its_opt_state(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, umtam_jax.umtam(1e-2), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    with pytest.raises(TypeError, match="opt_state is a Flax NNX Optimizer") as info:
        checkpoint.save_checkpoint(tmp_path / "o", params, opt_state=optimizer)
    assert "optimizer.opt_state" in str(info.value)
    assert not (tmp_path / "o").exists()
    # what the message says to do works
    checkpoint.save_checkpoint(tmp_path / "o", params, opt_state=optimizer.opt_state)
    assert checkpoint.restore_statistics(tmp_path / "o")["kernel"] is not None


# ------------------------------------------------------------------------------------------
# dict keys of mixed types
# ------------------------------------------------------------------------------------------


def test_mixed_key_types_at_the_top_level_are_named(tmp_path):
    with pytest.raises(TypeError, match="at the top level") as info:
        checkpoint.save_checkpoint(tmp_path / "k", {1: np.ones(2), "a": np.ones(2)})
    assert "int, str" in str(info.value)


def test_mixed_key_types_deeper_name_their_path(tmp_path):
    with pytest.raises(TypeError, match=re.escape("at ['layer'] has keys")) as info:
        checkpoint.save_checkpoint(tmp_path / "k", {"layer": {1: np.ones(2), "a": np.ones(2)}})
    assert "int, str" in str(info.value)


# ------------------------------------------------------------------------------------------
# the optimizer state of other parameters
# ------------------------------------------------------------------------------------------


def test_opt_state_of_another_tree_is_refused_before_writing(tmp_path):
    params = {"w": jnp.ones((4, 3))}
    other = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    state = umtam_jax.umtam(1e-2).init(other)
    with pytest.raises(ValueError, match=re.escape("statistics at ['b'], a leaf params lacks")):
        checkpoint.save_checkpoint(tmp_path / "m", params, opt_state=state)
    assert not (tmp_path / "m").exists()


def test_an_optimizer_of_part_of_the_parameters_still_saves(tmp_path):
    """Parameters without statistics are not an optimizer state of other parameters: an
    optimizer of a LoRA-like subset, or of Linen variables' ``params`` beside
    ``batch_stats`` (their statistics keyed like ``params``)."""
    lora = {"base": jnp.ones((4, 3)), "lora": jnp.ones((4, 2))}
    state = umtam_jax.umtam(1e-2).init({"lora": lora["lora"]})
    checkpoint.save_checkpoint(tmp_path / "lora", lora, opt_state=state)
    assert set(checkpoint.restore_statistics(tmp_path / "lora")) == {"lora"}
    variables = {"params": {"dense": jnp.ones((4, 3))}, "batch_stats": {"mean": jnp.ones(3)}}
    state = umtam_jax.umtam(1e-2).init(variables["params"])
    checkpoint.save_checkpoint(tmp_path / "linen", variables, opt_state=state)
    wrong = umtam_jax.umtam(1e-2).init({"dense": jnp.ones((5, 3))})
    with pytest.raises(ValueError, match="do not fit params"):
        checkpoint.save_checkpoint(tmp_path / "bad", variables, opt_state=wrong)


@pytest.mark.parametrize("shape, other", [((4, 3), (5, 3)), ((3,), (4,))])
def test_opt_state_of_other_shapes_is_refused_naming_the_leaf(tmp_path, shape, other):
    state = umtam_jax.umtam(1e-2).init({"w": jnp.ones(other)})
    with pytest.raises(ValueError, match=re.escape("['w']")) as info:
        checkpoint.save_checkpoint(tmp_path / "m", {"w": jnp.ones(shape)}, opt_state=state)
    assert "do not fit params" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_masked_out_parameters_still_save(tmp_path):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = optax.masked(umtam_jax.umtam(1e-2), {"w": True, "b": False})
    checkpoint.save_checkpoint(tmp_path / "m", params, opt_state=tx.init(params))
    stats = checkpoint.restore_statistics(tmp_path / "m")
    assert isinstance(stats["b"], optax.MaskedNode)
    assert stats["w"].mu.shape == (4, 3)
