"""Running a :class:`Job`: its leaves read group by group, merged and handed to a writer.

:func:`merge` walks the leaves in flattening order, reading each group of leaves once
(about ``group_bytes`` of the base at a time) and dropping it after its last leaf, so
peak host memory stays at a few leaves of each input plus one output leaf. A merge with
``scope="global"`` first finds each expert's global threshold in extra passes over the
inputs (:class:`umtam_jax.engine._global_topk.GlobalTopK`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from umtam_jax.engine._global_topk import GlobalTopK
from umtam_jax.engine._job import Job
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _validation as V

# Default size of the groups of leaves read together (bytes of the base's leaves).
DEFAULT_GROUP_BYTES = 16 * 2**20

_LIBC: Any = None


def _release_free_memory() -> None:
    """Returns freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Leaves of a few MB are below glibc's dynamic mmap threshold, so their buffers come from
    the heap arenas of the threads that touch them (XLA, TensorStore, Orbax's writer), and
    freed chunks stay in the resident set: without trimming, RSS creeps up by a leaf or
    two per leaf merged.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _merged(job: Job, j: int, data: dict[str, Any], topk: GlobalTopK | None) -> Any:
    """Leaf ``j`` merged; where its arguments vary by tensor, an error names the tensor."""
    if j not in job.leaf_options:
        return job.merge(job.plan(j, data), topk)
    try:
        return job.merge(job.plan(j, data), topk)
    except (ValueError, TypeError) as err:
        raise job.tensor_error(j, err) from None


def _global_topk(job: Job, group_bytes: int, progress: bool) -> GlobalTopK:
    """Finds the global thresholds of a ``scope="global"`` merge (extra passes)."""
    from tqdm.auto import tqdm

    densities = V.check_densities(
        pipeline.options_of(job.method, job.kwargs)["density"], len(job.experts)
    )
    merged = [leaf for j, leaf in enumerate(job.leaves) if j not in job.passthrough]
    topk = GlobalTopK(
        [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in merged],
        [leaf.dtype for leaf in merged],
        densities,
    )
    active = topk.active()

    def scan(p: int):
        bar = tqdm(
            total=len(job.leaves),
            desc=f"{job.method.name} global threshold, pass {p + 1}/{topk.passes}",
            unit="leaf",
            disable=not progress,
        )
        with bar:
            for group in job.groups(group_bytes):
                data = None
                _release_free_memory()
                data = job.read(group)
                for j in group:
                    if j not in job.passthrough:
                        # One expert's scores at a time, each computed when it is read.
                        call = job.plan(j, data)
                        yield (pipeline.expert_importance(call, 0, t) for t in active)
                        del call  # its inputs, before the next group is read
                    bar.update(1)

    topk.find_thresholds(scan, lambda p: None)
    return topk


def merge(
    job: Job,
    write: Any,
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = True,
) -> Any:
    """Runs ``job`` leaf by leaf and hands the merged leaves to ``write``.

    ``write(abstract_output, produce)`` writes the output, calling ``produce(j)`` for each
    leaf ``j`` in flattening order; ``produce`` reads the group of leaves holding ``j``
    from every input (once per group), merges leaf ``j`` and returns it as a NumPy array.
    A group's inputs are dropped after its last leaf. With ``scope="global"``, the exact
    global thresholds are found first, in extra passes over the inputs.

    Args:
      job: a validated job (:func:`job_from_paths` builds one from paths).
      write: the output's writer, e.g. :func:`writer`'s, or any function of
        ``(abstract_output, produce)``.
      group_bytes: leaves are read in consecutive groups of about this many bytes of the
        base (at least one leaf per group).
      progress: show progress bars over the leaves.

    Returns:
      What ``write`` returns.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> for name, w in [("base", [0., 0.]), ("a", [1., -1.]), ("b", [2., 3.])]:
      ...     _ = checkpoint.save_safetensors(f"{root}/{name}", {"w": np.array(w, "f4")})
      >>> job = engine.job_from_paths("task_arithmetic", f"{root}/base",
      ...                             [f"{root}/a", f"{root}/b"], statistics=None,
      ...                             kwargs={"scaling": 0.5})
      >>> def to_list(abstract, produce):  # a writer that keeps the leaves in memory
      ...     return [produce(j).tolist() for j in range(len(job.leaves))]
      >>> engine.merge(job, to_list, progress=False)
      [[1.5, 1.0]]
    """
    from tqdm.auto import tqdm

    topk = None
    if job.scope == "global" and job.method.global_scope:
        topk = _global_topk(job, group_bytes, progress)
    groups = job.groups(group_bytes)
    state: dict[str, Any] = {"group": -1, "data": None}
    where = {j: g for g, group in enumerate(groups) for j in group}
    bar = tqdm(total=len(job.leaves), desc=job.method.name, unit="leaf", disable=not progress)

    def produce(j: int) -> np.ndarray:
        g = where[j]
        if state["group"] != g:  # the previous group's inputs were dropped after its last leaf
            state["data"] = None
            state["data"] = job.read(groups[g])
            state["group"] = g
        if j in job.passthrough:
            out = job.copy(j, state["data"])
        else:
            out = job.cast_output(j, _merged(job, j, state["data"], topk))
        if j == groups[g][-1]:
            # The group's inputs go now, not when the next group is read: the writer
            # then writes this leaf (and waits for the next) without them.
            state["data"], state["group"] = None, -1
        if job.leaves[j].nbytes >= 2**20 or state["data"] is None:
            _release_free_memory()
        bar.update(1)
        return out

    with bar:
        return write(job.output, produce)
