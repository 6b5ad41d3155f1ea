"""Orbax checkpoints of parameters, UMTAM merging statistics and optimizer state.

One checkpoint directory holds separate Orbax items (``params``, ``statistics``,
``opt_state`` and a JSON ``umtam_metadata``), each restorable alone; merging restores base,
experts and statistics without rebuilding the optimizer. Saves are synchronous, atomic and
locked; they never overwrite an existing checkpoint unless asked, and never replace
anything that is not a umtam_jax checkpoint. Every array carries a checksum that restores
verify. Restored arrays are ``jax.Array`` (dtypes preserved, bfloat16 included), placed on
the first local device or with the shardings of a given target.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, umtam_jax
  >>> from umtam_jax import checkpoint
  >>> params = {"w": jnp.ones((4, 3))}
  >>> opt = umtam_jax.umtam(1e-2)
  >>> path = checkpoint.save_checkpoint(tempfile.mkdtemp() + "/ckpt", params,
  ...                                   opt_state=opt.init(params))
  >>> stats = checkpoint.restore_statistics(path)
  >>> state = checkpoint.restore_opt_state(path, jax.eval_shape(opt.init, params))
"""

from umtam_jax.checkpoint._format import Checkpoint
from umtam_jax.checkpoint._integrity import CheckpointCorruptError
from umtam_jax.checkpoint._metadata import read_metadata
from umtam_jax.checkpoint._names import names_from_tree, tree_from_names
from umtam_jax.checkpoint._orbax_folders import OrbaxFolderReader, is_orbax_folder
from umtam_jax.checkpoint._partial_restore import CheckpointReader
from umtam_jax.checkpoint._restore import (
    restore_checkpoint,
    restore_opt_state,
    restore_params,
    restore_statistics,
)
from umtam_jax.checkpoint._safetensors import SafetensorsReader
from umtam_jax.checkpoint._safetensors_write import (
    orbax_to_safetensors,
    safetensors_to_orbax,
    save_safetensors,
)
from umtam_jax.checkpoint._save import save_checkpoint
from umtam_jax.checkpoint._streaming import save_params_streaming
from umtam_jax.checkpoint._write_errors import CheckpointBusyError

__all__ = [
    "Checkpoint",
    "CheckpointBusyError",
    "CheckpointCorruptError",
    "CheckpointReader",
    "OrbaxFolderReader",
    "SafetensorsReader",
    "is_orbax_folder",
    "names_from_tree",
    "orbax_to_safetensors",
    "read_metadata",
    "restore_checkpoint",
    "restore_opt_state",
    "restore_params",
    "restore_statistics",
    "safetensors_to_orbax",
    "save_checkpoint",
    "save_params_streaming",
    "save_safetensors",
    "tree_from_names",
]
