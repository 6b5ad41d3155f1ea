"""Merging model folders: the engine's entry points on paths.

:func:`merge_checkpoints` merges umtam_jax (Orbax) checkpoints and Hugging Face
safetensors folders into a new folder; :func:`validate_merge_checkpoints` checks the same
call from the inputs' metadata alone. The steps they are made of are public too, for
callers that run them one at a time (the CLI prints a plan and can merge in memory):
:func:`job_from_paths` checks the arguments, opens the inputs and builds the :class:`Job`;
the output's steps are in ``_output.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from etils import epath

from umtam_jax.engine._job import Job
from umtam_jax.engine._merge import DEFAULT_GROUP_BYTES, merge
from umtam_jax.engine._open import is_huggingface, open_source
from umtam_jax.engine._option_groups import TensorKwargs
from umtam_jax.engine._output import check_output, resolve_output_format, writer
from umtam_jax.engine._plain_orbax import align_keys
from umtam_jax.engine._sources import SafetensorsSource, Source
from umtam_jax.engine._tied_embeddings import untie_embeddings
from umtam_jax.merging import _registry as R


def require_layout(
    method: R.Method, givens: Sequence[Mapping[str, Any]], paths: Sequence[Any], how: str
) -> None:
    """Refuses a merge that reads the weights' layout without being told it, where an
    input is a Hugging Face folder: its matrices may be PyTorch's ``(d_out, d_in)`` (what
    transformers saves) or Flax's ``(d_in, d_out)`` (a Flax tree saved as safetensors),
    which the files do not tell apart, and the default, Flax's, silently merges the first
    along the wrong axis.

    Args:
      method: the merging method.
      givens: the parameters given, once per group of tensors given the same (a value
        that varies by tensor counts as given).
      paths: the inputs' paths (None entries skipped).
      how: how the caller names the parameter in the message (``"pass layout="``).

    Raises:
      ValueError: the method reads ``layout``, one of ``givens`` lacks it, and an input
        is a Hugging Face folder.
    """
    layout = method.param("layout")
    if layout is None or all(
        "layout" in given or not layout.is_read({**method.defaults(), **given}) for given in givens
    ):
        return
    if folders := [p for p in paths if p is not None and is_huggingface(p)]:
        raise ValueError(
            f"method {method.name!r} reads the weights' layout and {os.fspath(folders[0])} is "
            f"a Hugging Face folder: {how}'out_in' for PyTorch (d_out, d_in) weights (what "
            f"transformers saves; a mergekit file gets it) or {how}'in_out' for Flax/JAX "
            "(d_in, d_out) kernels"
        )


def job_from_paths(
    method: str,
    base_dir: Any,
    expert_dirs: Any,
    *,
    statistics: bool | None,
    fisher_dirs: Sequence[Any] | None = None,
    curvature_dirs: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any],
    dtype: Any = None,
    out_dtype: Any = None,
    tensor_kwargs: TensorKwargs | None = None,
) -> Job:
    """A validated :class:`Job` over model files, ready for :func:`merge`.

    Each path is a umtam_jax checkpoint or a Hugging Face safetensors model. Only the
    inputs' metadata is read: the whole merge is validated with ``jax.eval_shape`` of the
    in-memory method, so it fails here, naming the leaf path, where the merge would.

    Args:
      method: a name in :data:`umtam_jax.merging.METHODS`.
      base_dir: the base model, or None for methods that take none.
      expert_dirs: the experts' models.
      statistics: read the experts' UMTAM statistics; None decides as
        :func:`merge_checkpoints` does.
      fisher_dirs: for ``fisher``, one model per expert holding its diagonal Fisher.
      curvature_dirs: for ``ota``, one model per expert holding its curvature.
      kwargs: the merging function's keyword arguments.
      dtype: read the parameters in this dtype (floating leaves; default: as stored).
      out_dtype: the output's dtype (default: ``dtype``, else the merge's).
      tensor_kwargs: keyword arguments that differ by tensor (see :class:`Job`).

    Returns:
      The job: ``job.output`` is the merged parameters' abstract pytree.

    Raises:
      FileNotFoundError, ValueError, TypeError: as :func:`merge_checkpoints`.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> base = checkpoint.save_safetensors(f"{root}/base", {"w": np.zeros(2, "f4")})
      >>> a = checkpoint.save_checkpoint(f"{root}/a", {"w": np.ones(2, "f4")})
      >>> job = engine.job_from_paths("ties", base, [a], statistics=None,
      ...                             kwargs={"density": 0.5})
      >>> job.output["w"].shape, job.output["w"].dtype
      ((2,), dtype('float32'))
      >>> b = checkpoint.save_safetensors(f"{root}/b", {"w": np.ones(3, "f4")})
      >>> try:
      ...     engine.job_from_paths("ties", base, [a, b], statistics=None,
      ...                           kwargs={"density": 0.5})
      ... except ValueError as err:
      ...     print(err)
      shape mismatch at ['w']: base has (2,), experts[1] has (3,)
    """
    m = R.get(method)
    if isinstance(expert_dirs, str | bytes | os.PathLike) or not isinstance(expert_dirs, Sequence):
        raise TypeError("expert_dirs must be a sequence of checkpoint directories")
    expert_dirs = list(expert_dirs)
    if not expert_dirs:
        raise ValueError("expert_dirs is empty: at least one expert is required")
    m.check_expert_count(len(expert_dirs))
    if not m.out_of_core:
        raise ValueError(
            f"method {method!r} needs each expert's {m.extra}, which the checkpoint engine "
            f"does not read: merge in memory with umtam_jax.merging.{method}"
        )
    if "scores" in kwargs:
        raise TypeError(
            "pass statistics=True (saliency scores) or statistics=False (magnitude) "
            "instead of scores"
        )
    extra_dirs, extra_name = None, None
    for name, dirs, kind in (
        ("fisher_dirs", fisher_dirs, "fishers"),
        ("curvature_dirs", curvature_dirs, "curvatures"),
    ):
        if dirs is None:
            continue
        if m.extra != kind:
            raise ValueError(f"method {method!r} takes no {name}")
        extra_dirs, extra_name = list(dirs), name
        if len(extra_dirs) != len(expert_dirs):
            raise ValueError(f"got {len(extra_dirs)} {name} for {len(expert_dirs)} experts")
    if m.extra == "fishers" and extra_dirs is None:
        raise ValueError(f"method {method!r} needs fisher_dirs, one per expert")
    takes_statistics = m.extra in ("statistics", "curvatures", "scores")
    if statistics is None:
        statistics = takes_statistics and extra_dirs is None
    if statistics and not takes_statistics:
        raise ValueError(f"method {method!r} takes no statistics")
    if statistics and extra_dirs is not None:
        raise ValueError(f"give either statistics=True or {extra_name}, not both")
    if m.extra == "statistics" and not statistics:
        raise ValueError(f"method {method!r} needs the experts' UMTAM statistics")
    if m.extra == "curvatures" and not statistics and extra_dirs is None:
        raise ValueError(f"method {method!r} needs the experts' UMTAM statistics or curvature_dirs")
    if base_dir is None and not m.base_optional:
        raise ValueError(f"method {method!r} needs a base model")
    experts = [open_source(d, f"expert {i}'s") for i, d in enumerate(expert_dirs)]
    base = experts[0] if base_dir is None else open_source(base_dir, "the base")
    extras: Literal["statistics"] | list[Source] | None = "statistics" if statistics else None
    if extra_dirs is not None:
        what = "Fisher" if extra_name == "fisher_dirs" else "curvature"
        extras = [open_source(d, f"expert {i}'s {what}") for i, d in enumerate(extra_dirs)]
    untie_embeddings([base, *experts])
    align_keys([base, *experts, *(extras if isinstance(extras, list) else [])])
    for expert, extra in zip(experts, extras if isinstance(extras, list) else [], strict=False):
        if isinstance(extra, SafetensorsSource):  # a tied expert's Fishers or curvatures
            extra.tie_like(expert)
    job = Job(
        m, base, experts, extras, kwargs, dtype=dtype, out_dtype=out_dtype,
        base_input=base_dir is not None, tensor_kwargs=tensor_kwargs,
    )  # fmt: skip
    # What tensor_kwargs gives a group of tensors counts too.
    givens = [{**kwargs, **given} for given, _ in job.option_groups]
    require_layout(m, givens, [base_dir, *expert_dirs], "pass layout=")
    return job


def validate_merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike | None,
    expert_dirs: Sequence[str | os.PathLike],
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    curvature_dirs: Sequence[str | os.PathLike] | None = None,
    dtype: Any = None,
    out_dtype: Any = None,
    **method_kwargs: Any,
) -> Any:
    """Checks a :func:`merge_checkpoints` call from the inputs' metadata alone.

    Reads no arrays: the merge is validated with ``jax.eval_shape`` of the in-memory
    method on the inputs' abstract trees. Its arguments are those of
    :func:`merge_checkpoints` that say what to merge, with the same meaning.

    Args:
      method: a name in :data:`umtam_jax.merging.METHODS`.
      base_dir: the base model; None for methods that take none.
      expert_dirs: the experts' models.
      statistics: use the experts' UMTAM statistics; None: the method's default (yes
        for ``umtam``, ``ota`` without ``curvature_dirs`` and ``prune``).
      fisher_dirs: for ``fisher``, one model per expert holding its diagonal Fisher.
      curvature_dirs: for ``ota``, one model per expert holding its curvature.
      dtype: the dtype the parameters would be read in (default: as stored).
      out_dtype: the output's dtype (default: ``dtype``, else the merge's).
      **method_kwargs: keyword arguments of the merging function.

    Returns:
      The merged parameters' abstract pytree (``jax.ShapeDtypeStruct`` leaves).

    Raises:
      FileNotFoundError, ValueError, TypeError: as :func:`merge_checkpoints`.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> for name in ("base", "a", "b"):
      ...     _ = checkpoint.save_safetensors(f"{root}/{name}", {"w": np.ones(4, "f4")})
      >>> engine.validate_merge_checkpoints("ties", f"{root}/base", [f"{root}/a", f"{root}/b"],
      ...                                   density=0.5)["w"].shape
      (4,)
      >>> try:
      ...     engine.validate_merge_checkpoints("ties", f"{root}/base", [f"{root}/a"],
      ...                                       density=1.5)
      ... except ValueError as err:
      ...     print(err)
      density must lie in (0, 1], got 1.5
    """
    job = job_from_paths(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        curvature_dirs=curvature_dirs,
        kwargs=method_kwargs,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    return job.output


def merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike | None,
    expert_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    curvature_dirs: Sequence[str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    dtype: Any = None,
    out_dtype: Any = None,
    output_format: str = "auto",
    max_shard_size: int | str = 5 * 10**9,
    **method_kwargs: Any,
) -> epath.Path:
    """Merges models leaf by leaf, out of core, into a new model folder.

    Inputs are umtam_jax (Orbax) checkpoints, checkpoints Orbax wrote itself (a
    ``CheckpointManager`` step: see :class:`~umtam_jax.engine.PlainOrbaxSource`) or Hugging
    Face safetensors models (a folder with ``model.safetensors`` or an index and shards),
    in any mix with the same parameter names and shapes. The result equals restoring
    everything, calling the in-memory merging function ``method`` and saving the merge —
    the same values, bit for bit — with peak host memory of about one group of leaves per
    input plus one output leaf instead of K + 1 models. ``scope="global"`` costs extra
    passes over the inputs (three reads for float32 scores).

    Args:
      method: a name in :data:`umtam_jax.merging.METHODS` (``"umtam"``, ``"ties"``, ...).
      base_dir: the base model; None for methods that take none (``linear``, ``karcher``,
        ...), the first expert then giving the structure and config files.
      expert_dirs: the experts' models (exactly one for ``prune``).
      output_dir: the folder to create, written atomically: a umtam_jax checkpoint
        (params only) or a safetensors folder with the base's config and tokenizer files.
      statistics: use the experts' UMTAM statistics (a checkpoint's ``statistics`` item; a
        Hugging Face model's ``umtam_statistics`` folder). Default: yes for ``umtam``,
        ``ota`` (unless ``curvature_dirs``) and ``prune`` (``False`` prunes by magnitude).
      fisher_dirs: for ``fisher``, one model per expert holding its diagonal Fisher.
      curvature_dirs: for ``ota``, one model per expert holding its curvature (e.g. Adam's
        second moments ``exp_avg_sq`` saved under the parameters' names).
      overwrite: replace an earlier merge's output (nothing else is ever replaced: not a
        model saved by ``save_checkpoint`` or ``save_safetensors``).
      progress: show progress bars over the leaves (one per pass).
      metadata: JSON-serialisable metadata stored with the output; default: a record of
        the merge (method, inputs, JSON-serialisable options).
      group_bytes: leaves are read in consecutive groups of about this many bytes (of the
        base; at least one leaf per group). Larger groups mean fewer reads.
      dtype: read the parameters in this dtype (floating leaves; default: as stored).
      out_dtype: write the output in this dtype (default: ``dtype``, else the merge's).
      output_format: ``"auto"`` (the base's format), ``"orbax"`` or ``"safetensors"``.
      max_shard_size: for safetensors output, bytes per shard (an int or ``"5GB"``).
      **method_kwargs: keyword arguments of the merging function (``density``,
        ``scaling``, ``weights``, ``scope``, ``key``, ...).

    Returns:
      The output directory.

    Raises:
      FileNotFoundError: a missing input (the message names which).
      FileExistsError: ``output_dir`` exists and ``overwrite`` is False.
      CheckpointBusyError: another save to ``output_dir`` is in progress.
      ValueError / TypeError: invalid options, mismatched inputs, missing statistics, an
        input that fails its checksum or is truncated, PyTorch pickles (never loaded); an
        ``output_dir`` that is, contains or lies inside an input, or is a file or a folder
        not written by umtam_jax; messages name the leaf path or file. Nothing is written.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> base = checkpoint.save_checkpoint(f"{root}/base", {"w": np.zeros(2, "f4")})
      >>> a = checkpoint.save_checkpoint(f"{root}/a", {"w": np.array([1., -1.], "f4")})
      >>> b = checkpoint.save_safetensors(f"{root}/b", {"w": np.array([2., 3.], "f4")})
      >>> out = engine.merge_checkpoints("task_arithmetic", base, [a, b], f"{root}/merged",
      ...                                scaling=0.5, progress=False)
      >>> checkpoint.restore_params(out)["w"].tolist()  # 0.5 · (Δa + Δb), in Orbax format
      [1.5, 1.0]

    References:
      Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models",
      arXiv:2403.13257 (its out-of-core, tensor-at-a-time merging).
    """
    from umtam_jax.checkpoint import _format

    output = _format._absolute(output_dir)
    if not isinstance(group_bytes, int) or group_bytes < 1:
        raise ValueError(f"group_bytes must be a positive integer, got {group_bytes!r}")
    job = job_from_paths(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        curvature_dirs=curvature_dirs,
        kwargs=method_kwargs,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    fmt = resolve_output_format(job.base, output_format)
    check_output(output, job, fmt, overwrite=overwrite)
    if metadata is None:
        metadata = {
            "merge": {
                "method": method,
                "base": None if base_dir is None else os.fspath(base_dir),
                "experts": [os.fspath(e) for e in expert_dirs],
                "parameters": _jsonable(method_kwargs),
                "statistics": job.extras == "statistics",
                "streaming": True,
            }
        }

    write = writer(
        job, output, fmt, overwrite=overwrite, metadata=metadata, max_shard_size=max_shard_size
    )
    return merge(job, write, group_bytes=group_bytes, progress=progress)


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, list | tuple):
            value = [float(v) if isinstance(v, np.generic) else v for v in value]
        if isinstance(value, bool | int | float | str | list | type(None)):
            out[name] = value
        else:
            out[name] = repr(value) if name != "key" else "<PRNG key>"
    return out
