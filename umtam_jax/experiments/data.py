"""Real, offline classification tasks for the experiments.

Every task is built from a Debian package (no hub downloads) and lives in a small
registry, so that a new task plugs in without editing this module::

    from umtam_jax.experiments import data

    data.register_task(
        "my_task",
        builder=lambda seed: data.Examples(texts=["a", "b"], labels=[0, 1]),
        labels=("neg", "pos"),
        metric="accuracy",
    )
    task = data.load_task("my_task", seed=0)

Tasks defined outside this package reach the command-line tools in two ways: an installed
package declares an entry point in the group ``umtam_jax.tasks`` (the referenced module
is imported, and a referenced callable is called, on first use of the registry), or the
tools' ``--import MODULE_OR_FILE`` option imports a module that calls
:func:`register_task` (see :func:`import_task_modules`)::

    # pyproject.toml of a package that ships tasks
    [project.entry-points."umtam_jax.tasks"]
    my_tasks = "my_package.tasks"          # or "my_package.tasks:register"

The built-in tasks (``wn_defmatch``, ``kjv_section``, ``fortune_topic``,
``wn_supersense``, ``py_package`` and the mirror ``wn_defmatch_mirror``) are built and
registered by :mod:`~umtam_jax.experiments.builtin_tasks`, which importing this module
imports. This module holds what every task shares: loading and the cache, and the
examples' containers (:class:`Examples`, :class:`TaskData`, defined in
:mod:`~umtam_jax.experiments._examples`); it re-exports the registry
(:mod:`~umtam_jax.experiments.task_registry`), the splits
(:mod:`~umtam_jax.experiments.splits`) and the metrics
(:mod:`~umtam_jax.experiments.metrics`), so ``data.register_task``,
``data.stratified_split`` and ``data.compute_metric`` are the same functions.

Builders are deterministic given the seed; splits are stratified by label (80/10/10
by default) and disjoint; ``max_per_split`` subsamples each split with the class
proportions preserved (for quick runs). Built examples are cached as JSON under
:func:`cache_dir` (``$UMTAM_JAX_CACHE`` or ``~/.cache/umtam_jax``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments._examples import SPLITS, Examples, TaskData
from umtam_jax.experiments._keys import stable_hash
from umtam_jax.experiments.metrics import (
    accuracy,
    compute_metric,
    macro_f1,
    register_metric,
)
from umtam_jax.experiments.splits import keyed_rng, stratified_split, stratified_subsample
from umtam_jax.experiments.task_registry import (
    ENTRY_POINT_GROUP,
    TaskSpec,
    add_task_import_option,
    available_tasks,
    get_task,
    import_task_modules,
    register_mirror_task,
    register_task,
    unregister_task,
)

__all__ = [
    "APT_PACKAGES",
    "ENTRY_POINT_GROUP",
    "Examples",
    "MissingDataError",
    "SPLITS",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "add_task_import_option",
    "available_tasks",
    "cache_dir",
    "compute_metric",
    "get_task",
    "import_task_modules",
    "load_task",
    "macro_f1",
    "register_metric",
    "register_mirror_task",
    "register_task",
    "stratified_split",
    "stratified_subsample",
    "unregister_task",
]

#: Debian packages holding the task data (``apt-get install -y`` these).
APT_PACKAGES = (
    "fortunes",
    "fortunes-min",
    "wordnet-base",
    "bible-kjv",
    "bible-kjv-text",
    "libpython3.11-stdlib",
)


class MissingDataError(RuntimeError):
    """Raised when the Debian package (or file) holding a data set is missing."""


def _missing(what: str, packages: Sequence[str]) -> MissingDataError:
    cmd = "apt-get update && apt-get install -y " + " ".join(packages)
    return MissingDataError(
        f"{what} not found. Install the Debian package(s) with:\n    {cmd}\n"
        "(or run umtam_jax/experiments/install_data.sh)"
    )


def _dedupe(texts: list, labels: list[int]) -> Examples:
    """Keeps the first copy of each text; drops texts seen with two labels."""
    first: dict = {}
    conflict = set()
    for t, y in zip(texts, labels, strict=True):
        if t in first and first[t] != y:
            conflict.add(t)
        first.setdefault(t, y)
    seen = set()
    keep_t, keep_y = [], []
    for t, y in zip(texts, labels, strict=True):
        if t in conflict or t in seen:
            continue
        seen.add(t)
        keep_t.append(t)
        keep_y.append(y)
    return Examples(keep_t, np.asarray(keep_y, dtype=np.int64))


def cache_dir() -> Path:
    """The cache directory of tasks, tokens and pretrained files.

    Returns:
        ``$UMTAM_JAX_CACHE`` when set, else ``~/.cache/umtam_jax``.

    Example:
      >>> import os
      >>> from umtam_jax.experiments import data
      >>> os.environ.get("UMTAM_JAX_CACHE") is not None or data.cache_dir().name == "umtam_jax"
      True
    """
    env = os.environ.get("UMTAM_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "umtam_jax"


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _coerce_examples(obj: Any) -> Examples:
    if isinstance(obj, Examples):
        return obj
    if isinstance(obj, Mapping):
        return Examples(obj["texts"], obj["labels"])
    texts, labels = obj
    return Examples(list(texts), labels)


def _call_builder(builder: Callable[..., Any], seed: int) -> Any:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return builder(seed)
    return builder(seed) if params else builder()


def _to_json(ex: Examples) -> dict:
    return {
        "texts": [t if isinstance(t, str) else list(t) for t in ex.texts],
        "labels": ex.labels.tolist(),
    }


def _read_cached(path: Path) -> Examples | dict | None:
    """A task's cached examples; None (built again) when missing, damaged or edited: the
    file carries the hash of its content (:func:`~umtam_jax.experiments._keys.stable_hash`,
    a SHA-256 prefix)."""
    raw = store.read_json(path)
    if not isinstance(raw, dict) or raw.get("content_hash") != stable_hash(raw.get("content")):
        return None
    content = raw["content"]
    try:
        if isinstance(content, dict) and "splits" in content:
            return {s: _coerce_examples(content["splits"][s]) for s in SPLITS}
        return _coerce_examples(content)
    except (KeyError, TypeError, ValueError):
        return None


def _build(spec: TaskSpec, seed: int, use_cache: bool, root: Path) -> Examples | dict:
    path = root / "tasks" / f"{spec.name}-v{spec.version}-seed{seed}.json"
    cached = _read_cached(path) if use_cache else None
    if cached is not None:
        return cached
    out = _call_builder(spec.builder, seed)
    if isinstance(out, Mapping) and all(s in out for s in SPLITS):
        splits = {s: _coerce_examples(out[s]) for s in SPLITS}
        built: Examples | dict = splits
        payload = {"splits": {s: _to_json(splits[s]) for s in SPLITS}}
    else:
        built = _coerce_examples(out)
        payload = _to_json(built)
    if use_cache:
        record = {"content": payload, "content_hash": stable_hash(payload)}
        store.write_atomic(path, lambda f: f.write(json.dumps(record).encode()))
    return built


def _check(spec: TaskSpec, ex: Examples) -> None:
    if len(ex) and (ex.labels.min() < 0 or ex.labels.max() >= len(spec.labels)):
        raise ValueError(f"task {spec.name!r}: labels outside [0, {len(spec.labels)})")
    for t in ex.texts[:100]:
        ok = (
            isinstance(t, str)
            if spec.kind == "single"
            else (isinstance(t, tuple) and len(t) == 2 and all(isinstance(s, str) for s in t))
        )
        if not ok:
            raise TypeError(f"task {spec.name!r} ({spec.kind}): bad example {t!r}")


def load_task(
    name: str,
    *,
    seed: int = 0,
    max_per_split: int | Mapping[str, int] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    use_cache: bool | None = None,
    cache_root: str | os.PathLike | None = None,
) -> TaskData:
    """Builds (or reads from cache) a registered task and splits it.

    Args:
        name: Registered task name (see :func:`available_tasks`).
        seed: Seed of the builder, the split, the subsampling and the shuffling.
        max_per_split: Cap on the examples per split (an int for all splits, or a
            mapping split name -> cap); subsampling is stratified by label.
        fractions: Train/validation/test fractions (ignored by pre-split tasks).
        use_cache: Override the task's caching flag.
        cache_root: Override :func:`cache_dir`.

    Returns:
        A :class:`TaskData`; each split is shuffled (deterministically).

    Example:
      >>> from umtam_jax.experiments import data
      >>> task = data.load_task("kjv_section", seed=0, max_per_split=20, use_cache=False)
      >>> task.label_names, task.metric, len(task.train)
      (('law', 'prophets', 'gospels_acts', 'epistles_revelation'), 'macro_f1', 20)
    """
    spec = get_task(name)
    if spec.mirror_of is not None:
        source = load_task(
            spec.mirror_of,
            seed=seed,
            max_per_split=max_per_split,
            fractions=fractions,
            use_cache=use_cache,
            cache_root=cache_root,
        )
        # The task mirrored as registered now (a plugin may have replaced it since).
        top = source.num_labels - 1
        mirrored: dict[str, Any] = {
            s: Examples(ex.texts, top - ex.labels) for s, ex in source.splits.items()
        }
        labels = source.label_names[::-1]
        return dataclasses.replace(source, name=spec.name, label_names=labels, **mirrored)
    root = Path(cache_root) if cache_root is not None else cache_dir()
    built = _build(spec, seed, spec.cache if use_cache is None else use_cache, root)
    if isinstance(built, dict):
        splits = dict(built)
    else:
        idx = stratified_split(built.labels, fractions, seed)
        splits = {s: built.take(i) for s, i in zip(SPLITS, idx, strict=True)}
    out = {}
    for s in SPLITS:
        ex = splits[s]
        _check(spec, ex)
        cap = max_per_split.get(s) if isinstance(max_per_split, Mapping) else max_per_split
        if cap is not None:
            ex = ex.take(stratified_subsample(ex.labels, int(cap), seed))
        out[s] = ex.take(keyed_rng(seed, "shuffle", s).permutation(len(ex)))
    return TaskData(
        name=spec.name,
        kind=spec.kind,
        label_names=spec.labels,
        metric=spec.metric,
        **out,
    )


# The built-in tasks register themselves when their module is imported; it imports the
# names above, hence last.
from umtam_jax.experiments import builtin_tasks as _builtin_tasks  # noqa: E402, F401
