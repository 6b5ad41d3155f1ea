"""The out-of-core merge engine: any merging method, model files in, model files out.

:func:`merge_checkpoints` merges umtam_jax (Orbax) checkpoints without ever holding K + 1
models: it reads a small group of leaves at a time from the base, the experts (and their
statistics or Fisher checkpoints), runs the method's steps (:data:`umtam_jax.merging.METHODS`)
on each leaf alone and streams the merged leaf to the output. Peak host memory is a few
leaves of each input plus one output leaf, whatever the model size.

Semantics are those of the in-memory functions, exactly:

- Before anything is read, the whole merge is validated on the inputs' metadata with
  ``jax.eval_shape`` of the in-memory call on abstract trees: the same checks and the
  same error messages, naming the leaf path.
- Each leaf is merged with its full key path, so path-dependent behaviour (DARE's
  per-leaf PRNG keys) is unchanged.
- ``scope="global"`` keeps exactly ``max(1, int(density · N))`` entries per expert over
  the whole model with the in-memory tie rule, found by an exact out-of-core radix select
  (two extra passes over the inputs for float32 scores).

The engine sits above :mod:`umtam_jax.merging` (pure functions on pytrees) and
:mod:`umtam_jax.checkpoint` (files); it reads models through a small source interface.
"""

from umtam_jax.engine._merge import (
    DEFAULT_GROUP_BYTES,
    Job,
    merge,
    merge_checkpoints,
    validate_merge_checkpoints,
)
from umtam_jax.engine._sources import OrbaxSource, Source

__all__ = [
    "DEFAULT_GROUP_BYTES",
    "Job",
    "OrbaxSource",
    "Source",
    "merge",
    "merge_checkpoints",
    "validate_merge_checkpoints",
]
