"""The registry of the experiments' tasks: registration, mirrors and plugins.

A task is a :class:`TaskSpec` registered under its name: :func:`register_task` adds one,
:func:`register_mirror_task` adds a task's label-reversed mirror, and installed packages add
theirs through the entry-point group :data:`ENTRY_POINT_GROUP` (loaded on first use of the
registry) or the tools' ``--import`` option (:func:`import_task_modules`). Building,
splitting and caching a registered task's examples is
:func:`~umtam_jax.experiments.data.load_task`'s job; every name here is also reachable as
``umtam_jax.experiments.data.<name>``.

Example:
    >>> from umtam_jax.experiments import data, task_registry
    >>> "wn_defmatch" in task_registry.available_tasks()
    True
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from umtam_jax.experiments.metrics import _METRICS

__all__ = [
    "ENTRY_POINT_GROUP",
    "TaskSpec",
    "add_task_import_option",
    "available_tasks",
    "get_task",
    "import_task_modules",
    "register_mirror_task",
    "register_task",
    "unregister_task",
]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: Registry key.
        builder: ``builder(seed) -> Examples | Mapping[str, Examples]`` (a mapping must
            hold all of :data:`~umtam_jax.experiments.data.SPLITS`: a pre-split task).
            Builders may also take no argument.
        labels: Label names; label ``i`` is ``labels[i]``.
        metric: Name of the metric (see
            :func:`~umtam_jax.experiments.metrics.compute_metric`).
        kind: ``"single"`` (texts are strings) or ``"pair"`` (texts are 2-tuples).
        description: Free text.
        cache: Whether built examples are cached on disk.
        version: Part of the cache key; bump it when the builder changes.
        mirror_of: For a mirror task (:func:`register_mirror_task`), the task it mirrors;
            None otherwise.
    """

    name: str
    builder: Callable[..., Any]
    labels: tuple[str, ...]
    metric: str = "accuracy"
    kind: str = "single"
    description: str = ""
    cache: bool = False
    version: int = 1
    mirror_of: str | None = None


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    builder: Callable[..., Any],
    labels: Sequence[str],
    metric: str = "accuracy",
    kind: str = "single",
    *,
    description: str = "",
    cache: bool = False,
    version: int = 1,
    overwrite: bool = False,
) -> TaskSpec:
    """Registers a task.

    Args:
        name: Task name.
        builder: ``builder(seed) -> Examples | Mapping[str, Examples]`` (or a
            zero-argument callable). A mapping gives pre-made train/validation/test
            splits; otherwise :func:`~umtam_jax.experiments.data.load_task` splits
            stratified by label. A ``(texts, labels)`` tuple is accepted in place of
            :class:`~umtam_jax.experiments.data.Examples`.
        labels: Label names, label ``i`` being ``labels[i]``.
        metric: Metric name ("accuracy", "macro_f1" or one from
            :func:`~umtam_jax.experiments.metrics.register_metric`).
        kind: "single" or "pair".
        description: Free text.
        cache: Cache the built examples as JSON under :func:`~umtam_jax.experiments.data.cache_dir`.
        version: Cache-key version.
        overwrite: Allow replacing an existing task of that name.

    Returns:
        The registered :class:`TaskSpec`.
    """
    if kind not in ("single", "pair"):
        raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")
    if metric not in _METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(_METRICS)}")
    spec = TaskSpec(
        name=name,
        builder=builder,
        labels=tuple(labels),
        metric=metric,
        kind=kind,
        description=description,
        cache=cache,
        version=version,
    )
    return _add(spec, overwrite)


def _add(spec: TaskSpec, overwrite: bool) -> TaskSpec:
    """Puts ``spec`` in the registry, refusing to replace a task unless ``overwrite``."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {spec.name!r} already registered (pass overwrite=True)")
    _REGISTRY[spec.name] = spec
    return spec


def register_mirror_task(
    name: str, *, mirror_name: str | None = None, overwrite: bool = False
) -> TaskSpec:
    """Registers a task's mirror: the same examples with the label order reversed.

    Label ``i`` of the mirror is label ``K - 1 - i`` of ``name`` (``K`` classes), with
    its label names reversed to match, and :func:`~umtam_jax.experiments.data.load_task`
    gives the mirror exactly the examples, splits and order of ``name``. Its expert is
    seeded like ``name``'s (:attr:`~umtam_jax.experiments.data.TaskData.seed_name`:
    same initial head, batches and dropout), so the two experts differ only through the
    labels. For a two-class task every training target is swapped: from the same start,
    the two experts' first gradients point in nearly opposite directions (exactly
    opposite when the initial prediction is uniform). Trained heads can absorb the swap,
    after which both encoders learn the same features; with the heads kept fixed
    (:attr:`~umtam_jax.experiments.config.PipelineConfig.train_head`) the two experts
    share one head and only their encoders can answer oppositely: a constructed pair of
    opposed experts for merging studies.

    Args:
        name: A registered task (not itself a mirror).
        mirror_name: The mirror's name (default ``f"{name}_mirror"``).
        overwrite: Allow replacing an existing task of that name.

    Returns:
        The mirror's :class:`TaskSpec`.

    Example:
        >>> from umtam_jax.experiments import data
        >>> data.get_task("wn_defmatch_mirror").labels
        ('defines', 'different')
    """
    spec = get_task(name)
    if spec.mirror_of is not None:
        raise ValueError(f"task {name!r} is already the mirror of {spec.mirror_of!r}")
    if mirror_name == name:
        raise ValueError(f"a mirror of {name!r} needs a name of its own")
    mirror = TaskSpec(
        name=mirror_name or f"{name}_mirror",
        builder=spec.builder,
        labels=spec.labels[::-1],
        metric=spec.metric,
        kind=spec.kind,
        description=f"{name} with its label order reversed (its mirror).",
        version=spec.version,
        mirror_of=name,
    )
    return _add(mirror, overwrite)


def unregister_task(name: str) -> None:
    """Removes a task from the registry (no error if absent).

    Args:
        name: The task's name.

    Example:
      >>> from umtam_jax.experiments import data
      >>> _ = data.register_task("toy", lambda: (["a", "b"], [0, 1]), ["no", "yes"])
      >>> data.unregister_task("toy"); "toy" in data.available_tasks()
      False
    """
    _REGISTRY.pop(name, None)


#: Entry-point group through which installed packages contribute tasks.
ENTRY_POINT_GROUP = "umtam_jax.tasks"
_PLUGINS_LOADED = False


def _load_entry_point_tasks() -> None:
    """Imports (and calls, when callable) every ``umtam_jax.tasks`` entry point, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must say which one it is
            raise ImportError(
                f"task plugin {ep.name!r} ({ep.value}) of entry-point group "
                f"{ENTRY_POINT_GROUP!r} failed to load: {e}"
            ) from e
        if callable(obj):
            obj()


def import_task_modules(specs: Sequence[str]) -> list[str]:
    """Imports modules that register tasks; returns the task names they added.

    Args:
        specs: Each a module name importable from ``sys.path`` (``"my_pkg.tasks"``) or the
            path of a ``.py`` file.

    Returns:
        The names newly added to the registry, in registration order.

    Raises:
        FileNotFoundError: A ``.py`` path that does not exist.
        ImportError: A module that cannot be imported (the message names it).

    Example:
        >>> from umtam_jax.experiments import data
        >>> data.import_task_modules([])
        []
    """
    _load_entry_point_tasks()
    before = list(_REGISTRY)
    for spec in specs:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"task module file {spec!r} does not exist")
            name = "umtam_jax_task_module_" + re.sub(r"\W", "_", path.stem)
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot import task module file {spec!r}")
            module = importlib.util.module_from_spec(mod_spec)
            # Registered before it runs, as for a normal import (dataclasses, pickling and
            # relative look-ups in the file need ``sys.modules[name]``).
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise ImportError(f"cannot import task module {spec!r}: {e}") from e
    return [n for n in _REGISTRY if n not in before]


def add_task_import_option(parser: Any) -> None:
    """Adds ``--import MODULE_OR_FILE`` (repeatable, into ``args.imports``) to a parser.

    Pass ``args.imports`` to :func:`import_task_modules` to register their tasks.

    Args:
        parser: An :class:`argparse.ArgumentParser`.

    Example:
      >>> import argparse
      >>> from umtam_jax.experiments.task_registry import add_task_import_option
      >>> parser = argparse.ArgumentParser()
      >>> add_task_import_option(parser)
      >>> parser.parse_args(["--import", "my_tasks", "--import", "more.py"]).imports
      ['my_tasks', 'more.py']
    """
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module or .py file that registers tasks (repeatable); installed "
        f"packages can also register through the {ENTRY_POINT_GROUP!r} entry-point group",
    )


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered under ``name``.

    Args:
        name: A task's name (built-in, registered, or from an installed plugin).

    Returns:
        Its specification.

    Raises:
        KeyError: no such task, with the available names.

    Example:
      >>> from umtam_jax.experiments import data
      >>> spec = data.get_task("wn_defmatch")
      >>> spec.kind, spec.metric
      ('pair', 'accuracy')
    """
    _load_entry_point_tasks()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {available_tasks()}") from None


def available_tasks() -> list[str]:
    """The registered task names (built-in, registered, from plugins), sorted.

    Returns:
        The names.

    Example:
      >>> from umtam_jax.experiments import data
      >>> {"kjv_section", "py_package"} <= set(data.available_tasks())
      True
    """
    _load_entry_point_tasks()
    return sorted(_REGISTRY)
