"""The output side of a merge on paths: its format, its checks, its writer.

:func:`resolve_output_format` chooses the format (the base's, unless one is asked for),
:func:`check_output` refuses an output that may not be written before anything is, and
:func:`writer` saves the merged leaves, as :func:`umtam_jax.engine.merge` produces them,
into a umtam_jax checkpoint or a Hugging Face safetensors folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from umtam_jax.checkpoint._safetensors import SAFETENSORS
from umtam_jax.checkpoint._targets import CHECKPOINT
from umtam_jax.engine._job import Job
from umtam_jax.engine._sources import SafetensorsSource, Source
from umtam_jax.engine._tied_embeddings import keeps_tied

OUTPUT_FORMATS = ("auto", "orbax", "safetensors")


def resolve_output_format(base: Source, output_format: str) -> str:
    """The format to write: ``output_format``, or for ``"auto"`` the base's.

    Args:
      base: the base's source.
      output_format: one of :data:`OUTPUT_FORMATS`.

    Returns:
      ``"orbax"`` or ``"safetensors"``.

    Raises:
      ValueError: an unknown ``output_format``.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> path = checkpoint.save_safetensors(tempfile.mkdtemp() + "/m", {"w": np.ones(2)})
      >>> engine.resolve_output_format(engine.open_source(path, "the base"), "auto")
      'safetensors'
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown output_format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}"
        )
    if output_format != "auto":
        return output_format
    return "safetensors" if isinstance(base, SafetensorsSource) else "orbax"


def check_output(output: epath.Path, job: Job, fmt: str, *, overwrite: bool) -> None:
    """Refuses an output that may not be written, before anything is.

    Refused: an output that is, contains or lies inside one of the job's inputs; a
    symbolic link or a path under a file; an existing file or folder that no merge
    wrote in format ``fmt`` (a model saved by ``save_checkpoint`` or ``save_safetensors``
    included); for safetensors, a leaf without a tensor name (an empty
    key, or a '.' in one); a training checkpoint (one holding statistics or an
    optimizer state, which no merge writes), even with ``overwrite``; an existing output
    without ``overwrite``.

    Args:
      output: the absolute output path.
      job: the job whose inputs the output must stay clear of.
      fmt: ``"orbax"`` or ``"safetensors"``.
      overwrite: whether an earlier merge output at ``output`` may be replaced.

    Raises:
      ValueError: an output that is, holds or lies in an input, is not umtam_jax's, or
        is a training checkpoint.
      FileExistsError: ``output`` exists and ``overwrite`` is False.

    Example:
      >>> import tempfile, numpy as np
      >>> from etils import epath
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> for name in ("base", "a"):
      ...     _ = checkpoint.save_safetensors(f"{root}/{name}", {"w": np.ones(2, "f4")})
      >>> job = engine.job_from_paths("passthrough", f"{root}/base", [f"{root}/a"],
      ...                             statistics=None, kwargs={})
      >>> try:
      ...     engine.check_output(epath.Path(root), job, "safetensors", overwrite=True)
      ... except ValueError as err:
      ...     print("refused:", str(err).split(" (")[0].replace(root, "ROOT"))
      refused: the output ROOT contains the base
    """
    from umtam_jax.checkpoint import _model_files, _safetensors_write, _safety, _targets

    inputs = [("the base", job.base.directory)]
    inputs += [(f"expert {i}", s.directory) for i, s in enumerate(job.experts)]
    if isinstance(job.extras, list):
        inputs += [(f"the Fisher or curvature of expert {i}", s.directory)
                   for i, s in enumerate(job.extras)]  # fmt: skip
    _targets.check_output_not_input(output, inputs)
    if fmt == "safetensors":  # every leaf needs a tensor name ('.'-joined keys)
        try:
            _safetensors_write.names_from_tree(job.output)
        except ValueError as err:
            raise ValueError(f"cannot write the safetensors output {output}: {err}") from None
        if isinstance(job.base, SafetensorsSource) and job.base.folder is not None:
            _model_files.files_to_copy(job.base.folder)  # the base's config, tokenizer
    kind = _MERGED_SAFETENSORS if fmt == "safetensors" else _MERGED_CHECKPOINT
    _safety.check_output(output, overwrite=overwrite, kind=kind)


def _refuse_training_checkpoint(output: epath.Path) -> None:
    """Refuses to replace a checkpoint holding what training saves and a merge never
    writes (statistics, an optimizer state): it would be lost for good."""
    from umtam_jax.checkpoint import _format

    held = [item for item in (_format.STATISTICS, _format.OPT_STATE) if (output / item).exists()]
    if held:
        raise ValueError(
            f"refusing to replace {output}: it is a training checkpoint (it holds "
            f"{' and '.join(held)}, which a merge never writes), and a merge replaces only an "
            "earlier merge output; write elsewhere, or delete it yourself"
        )


#: The outputs a merge may replace: its own earlier ones (stamped "merge"), checked again
#: under the save's lock (a killed save's old folder may be put back there).
_MERGED_CHECKPOINT = CHECKPOINT._replace(refuse=_refuse_training_checkpoint, stamp="merge")
_MERGED_SAFETENSORS = SAFETENSORS._replace(stamp="merge")


def writer(
    job: Job,
    output: epath.Path,
    fmt: str,
    *,
    overwrite: bool,
    metadata: Mapping[str, Any] | None,
    max_shard_size: int | str = 5 * 10**9,
) -> Callable[[Any, Callable[[int], np.ndarray]], epath.Path]:
    """The ``write`` function of :func:`merge` that saves a job's output as a model folder.

    ``write(abstract, produce)`` streams the leaves ``produce(j)`` into a umtam_jax
    checkpoint (``save_params_streaming``) or a safetensors folder (``save_safetensors``,
    with the base's config and tokenizer files when the base is a Hugging Face model),
    written atomically; it returns the folder.

    Args:
      job: the job whose output is written.
      output: the absolute output path (check it first with :func:`check_output`).
      fmt: ``"orbax"`` or ``"safetensors"``.
      overwrite: replace an earlier merge output at ``output``.
      metadata: JSON-serialisable metadata stored with the output.
      max_shard_size: for safetensors, bytes per shard (an int or a string like ``"5GB"``).

    Returns:
      The ``write`` function.

    Example:
      >>> import tempfile, numpy as np
      >>> from etils import epath
      >>> from umtam_jax import checkpoint, engine
      >>> root = epath.Path(tempfile.mkdtemp())
      >>> model = checkpoint.save_safetensors(root / "model", {"w": np.ones(2, "f4")})
      >>> job = engine.job_from_paths("passthrough", None, [model], statistics=None,
      ...                             kwargs={"scale": 2.0})
      >>> write = engine.writer(job, root / "out", "safetensors", overwrite=False,
      ...                       metadata=None)
      >>> out = engine.merge(job, write, progress=False)
      >>> checkpoint.SafetensorsReader(out).read(["w"])[0].tolist()
      [2.0, 2.0]
    """

    def write(abstract: Any, produce: Callable[[int], np.ndarray]) -> epath.Path:
        if fmt == "orbax":
            from umtam_jax.checkpoint._streaming import stream_params

            return stream_params(
                output, abstract, produce, overwrite, metadata, kind=_MERGED_CHECKPOINT
            )
        from umtam_jax.checkpoint._safetensors_write import write_safetensors

        copy_from = job.base.folder if isinstance(job.base, SafetensorsSource) else None
        return write_safetensors(
            output,
            abstract,
            produce,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            copy_files_from=copy_from,
            metadata=metadata,
            keep_tied_embeddings=keeps_tied([job.base, *job.experts]),
            kind=_MERGED_SAFETENSORS,
        )

    return write
