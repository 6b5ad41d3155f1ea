"""The out-of-core merge engine: any merging method, model files in, model files out.

:func:`merge_checkpoints` merges umtam_jax (Orbax) checkpoints, checkpoints Orbax wrote
itself (a ``CheckpointManager`` step, a ``StandardCheckpointer`` folder) and Hugging Face
safetensors models (folders with ``model.safetensors`` or shards and an index; never
PyTorch pickles) into either format without ever holding K + 1 models: it reads a small
group of leaves at a time from the base, the experts (and their statistics, Fishers or
curvatures), runs the method's steps (:data:`umtam_jax.merging.METHODS`) on each leaf
alone and streams the merged leaf to the output. Peak host memory is set by the largest
tensor, not the model: each input's copy of it, the merged one and a selection's scores,
about (K + 3) times it for K experts, plus the process's fixed cost (an LLM whose
embedding is a third of it: about 2 models; ``benchmarks/merge_memory.py``).

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
:mod:`umtam_jax.checkpoint` (files); it reads models through a small :class:`Source`
interface with three implementations, :class:`OrbaxSource`, :class:`PlainOrbaxSource`
(folders a training loop wrote with Orbax itself) and :class:`SafetensorsSource`,
and writes with ``save_params_streaming`` or ``save_safetensors``. A Hugging Face model's
tensor ``"a.b.weight"`` is the pytree leaf ``["a"]["b"]["weight"]``; its UMTAM statistics
live in a ``umtam_statistics`` safetensors folder inside it, named ``"a.b.weight.row"``,
``"a.b.weight.col"``, ... (see :data:`STATISTICS_FOLDER`).
"""

from umtam_jax.engine._checkpoints import (
    job_from_paths,
    merge_checkpoints,
    validate_merge_checkpoints,
)
from umtam_jax.engine._job import Job
from umtam_jax.engine._merge import DEFAULT_GROUP_BYTES, merge
from umtam_jax.engine._open import is_huggingface, open_source
from umtam_jax.engine._output import OUTPUT_FORMATS, check_output, resolve_output_format, writer
from umtam_jax.engine._plain_orbax import PlainOrbaxSource
from umtam_jax.engine._sources import STATISTICS_FOLDER, OrbaxSource, SafetensorsSource, Source
from umtam_jax.engine._tied_embeddings import untie_embeddings

__all__ = [
    "DEFAULT_GROUP_BYTES",
    "OUTPUT_FORMATS",
    "STATISTICS_FOLDER",
    "Job",
    "OrbaxSource",
    "PlainOrbaxSource",
    "SafetensorsSource",
    "Source",
    "check_output",
    "is_huggingface",
    "job_from_paths",
    "open_source",
    "resolve_output_format",
    "merge",
    "merge_checkpoints",
    "untie_embeddings",
    "validate_merge_checkpoints",
    "writer",
]
