"""Keyword arguments that differ by tensor: a :class:`~umtam_jax.engine.Job`'s groups.

A mergekit file can give each tensor its own arguments (layer gradients, filtered
values). The job groups its merged leaves by the arguments they are given
(:func:`option_groups`) and checks each group's merge once (:func:`checked_group`), as the
whole merge is checked, before any array is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax

from umtam_jax.merging import _pipeline as pipeline

if TYPE_CHECKING:
    from umtam_jax.engine._job import Job

#: Keyword arguments that differ by tensor: the merged tensors' names → each one's.
TensorKwargs = Callable[[Sequence[str]], Sequence[Mapping[str, Any]]]


def option_groups(
    job: Job, tensor_kwargs: TensorKwargs | None
) -> list[tuple[dict[str, Any], list[int]]]:
    """The merged leaves grouped by the arguments ``tensor_kwargs`` gives them.

    Args:
      job: the job, its leaf table built (``leaves``, ``passthrough``, ``scope``).
      tensor_kwargs: called once with the merged tensors' dotted names, in leaf order;
        None: no arguments differ.

    Returns:
      ``(arguments, leaf indices)`` pairs, one per distinct set of arguments, in order of
      first appearance; ``[({}, every merged leaf)]`` without ``tensor_kwargs``.

    Raises:
      ValueError: ``tensor_kwargs`` with ``scope="global"``.
    """
    merged = [j for j in range(len(job.leaves)) if j not in job.passthrough]
    if tensor_kwargs is None:
        return [({}, merged)]
    if job.scope == "global":
        raise ValueError("keyword arguments that differ by tensor need a per-tensor scope")
    names = job.tensor_names()
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for j, given in zip(merged, tensor_kwargs([names[j] for j in merged]), strict=True):
        groups.setdefault(repr(sorted(given.items())), (dict(given), []))[1].append(j)
    return list(groups.values())


def checked_group(
    job: Job, given: dict[str, Any], members: list[int], abstract: tuple[Any, Any, Any], k: int
) -> Any:
    """A group's checked options, its merge validated as the whole merge was.

    Where the method reads per-expert inputs (statistics, curvatures), whose trees a
    subset cannot express, only the options are checked here and the method's own checks
    run as each tensor is merged.

    Args:
      job: the job.
      given: the arguments the group's tensors are given, over the job's ``kwargs``.
      members: the group's leaf indices.
      abstract: the abstract ``(base, experts, extras)`` the whole merge was checked on.
      k: the number of experts the options are checked for.

    Returns:
      The group's options, as :func:`umtam_jax.merging._pipeline.check_options` gives them.

    Raises:
      ValueError / TypeError: the group's options or merge fail the method's checks; the
        message names the group's first tensor (:meth:`Job.tensor_error`).
    """
    kwargs = {**job.kwargs, **given}
    try:
        options = pipeline.check_options(job.method, kwargs, k)
        if abstract[2] is None:
            trees = [job.subset(t, members) for t in (abstract[0], *abstract[1])]
            run = functools.partial(job._run, kwargs=kwargs)
            jax.eval_shape(run, trees[0], trees[1:], None)
    except (ValueError, TypeError) as err:
        raise job.tensor_error(members[0], err, given) from None
    return options
