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
imports; this module holds what every task shares: the registry, the metrics, the splits,
loading and the cache.

Builders are deterministic given the seed; splits are stratified by label (80/10/10
by default) and disjoint; ``max_per_split`` subsamples each split with the class
proportions preserved (for quick runs). Built examples are cached as JSON under
:func:`cache_dir` (``$UMTAM_JAX_CACHE`` or ``~/.cache/umtam_jax``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "APT_PACKAGES",
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

SPLITS = ("train", "validation", "test")

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
    """Returns the cache directory (``$UMTAM_JAX_CACHE`` or ``~/.cache/umtam_jax``)."""
    env = os.environ.get("UMTAM_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "umtam_jax"


def _rng(seed: int, *salt: str) -> np.random.Generator:
    """A generator keyed by seed and stable string salts (never Python's ``hash``)."""
    return np.random.default_rng([int(seed), *(zlib.crc32(s.encode()) for s in salt)])


# ---------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Examples:
    """A list of examples.

    Attributes:
        texts: ``list[str]`` for single-text tasks, ``list[tuple[str, str]]`` for pair
            tasks.
        labels: int64 array of shape ``[len(texts)]``.
    """

    texts: list
    labels: np.ndarray

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(
            self, "texts", [t if isinstance(t, str) else tuple(t) for t in self.texts]
        )
        if len(self.texts) != labels.shape[0]:
            raise ValueError(f"{len(self.texts)} texts but {labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Examples:
        """Returns the examples at the integer indices ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        return Examples([self.texts[i] for i in idx], self.labels[idx])

    def class_counts(self, num_labels: int) -> np.ndarray:
        """Returns the number of examples of each class."""
        return np.bincount(self.labels, minlength=num_labels)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: Registry key.
        builder: ``builder(seed) -> Examples | Mapping[str, Examples]`` (a mapping must
            hold all of :data:`SPLITS`: a pre-split task). Builders may also take no
            argument.
        labels: Label names; label ``i`` is ``labels[i]``.
        metric: Name of the metric (see :func:`compute_metric`).
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


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A loaded task with its splits.

    Attributes:
        name: Task name.
        kind: ``"single"`` or ``"pair"``.
        label_names: Label names.
        metric: Metric name (see :func:`compute_metric`).
        train: Training split.
        validation: Validation split.
        test: Test split.
        seed_name: The name training seeds are drawn from (head initialization, batch
            order, dropout): the task's own name, or the mirrored task's for a mirror.
    """

    name: str
    kind: str
    label_names: tuple[str, ...]
    metric: str
    train: Examples
    validation: Examples
    test: Examples
    seed_name: str = ""

    def __post_init__(self):
        if not self.seed_name:
            object.__setattr__(self, "seed_name", self.name)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def splits(self) -> dict[str, Examples]:
        """The three splits by name."""
        return {s: getattr(self, s) for s in SPLITS}

    def evaluate(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """Computes the task metric."""
        return compute_metric(self.metric, y_true, y_pred, num_labels=self.num_labels)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int | None = None) -> float:
    """Fraction of correct predictions."""
    del num_labels
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if y_true.size else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int | None = None) -> float:
    """Unweighted mean of the per-class F1 scores (classes absent from both count 0).

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        num_labels: Number of classes (default: max label + 1).

    Returns:
        Macro-F1 in [0, 1], like ``sklearn.metrics.f1_score(average="macro")`` over
        ``labels=range(num_labels)``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if num_labels is None:
        num_labels = int(max(y_true.max(initial=-1), y_pred.max(initial=-1)) + 1)
    f1 = []
    for c in range(num_labels):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1)) if f1 else 0.0


_METRICS: dict[str, Callable[..., float]] = {"accuracy": accuracy, "macro_f1": macro_f1}


def register_metric(name: str, fn: Callable[..., float]) -> None:
    """Registers ``fn(y_true, y_pred, num_labels=None) -> float`` under ``name``."""
    _METRICS[name] = fn


def compute_metric(
    name: str, y_true: np.ndarray, y_pred: np.ndarray, num_labels: int | None = None
) -> float:
    """Computes the metric ``name`` ("accuracy", "macro_f1" or a registered one)."""
    if name not in _METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(_METRICS)}")
    return _METRICS[name](y_true, y_pred, num_labels=num_labels)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

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
            splits; otherwise :func:`load_task` splits stratified by label. A
            ``(texts, labels)`` tuple is accepted in place of :class:`Examples`.
        labels: Label names, label ``i`` being ``labels[i]``.
        metric: Metric name ("accuracy", "macro_f1" or one from
            :func:`register_metric`).
        kind: "single" or "pair".
        description: Free text.
        cache: Cache the built examples as JSON under :func:`cache_dir`.
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
    its label names reversed to match, and :func:`load_task` gives the mirror exactly
    the examples, splits and order of ``name``. Its expert is seeded like ``name``'s
    (:attr:`TaskData.seed_name`: same initial head, batches and dropout), so the two
    experts differ only through the labels. For a two-class task every training
    target is swapped: from the same start, the two experts' first gradients point in
    nearly opposite directions (exactly opposite when the initial prediction is
    uniform). Trained heads can absorb the swap, after which both encoders learn the
    same features; with the heads kept fixed
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
    """Removes a task from the registry (no error if absent)."""
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
    """Adds ``--import MODULE_OR_FILE`` (repeatable, into ``args.imports``) to an
    :class:`argparse.ArgumentParser`; pass ``args.imports`` to :func:`import_task_modules`."""
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
    """Returns the :class:`TaskSpec` registered under ``name``."""
    _load_entry_point_tasks()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {available_tasks()}") from None


def available_tasks() -> list[str]:
    """Returns the registered task names (built-in, registered, from plugins), sorted."""
    _load_entry_point_tasks()
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[np.ndarray]:
    """Splits indices per class in the given fractions (disjoint, covering all).

    Args:
        labels: Integer labels (or any integer stratum, e.g. a group's class).
        fractions: One fraction per split; normalised to sum to 1.
        seed: Random seed.

    Returns:
        One sorted index array per split.
    """
    labels = np.asarray(labels)
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    rng = _rng(seed, "stratified_split")
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        # Later splits get round(n * f); the first one takes the rest.
        counts = [int(round(idx.size * f)) for f in fr[1:]]
        while sum(counts) > idx.size:
            counts[int(np.argmax(counts))] -= 1
        bounds = np.cumsum([idx.size - sum(counts), *counts])[:-1]
        for k, piece in enumerate(np.split(idx, bounds)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Picks ``n`` indices with the class proportions kept (largest remainder).

    Args:
        labels: Integer labels.
        n: Number of indices wanted (all are returned if ``n >= len(labels)``).
        seed: Random seed.

    Returns:
        Sorted index array.
    """
    labels = np.asarray(labels)
    if n >= labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / labels.size
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    rng = _rng(seed, "stratified_subsample")
    picked = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        picked.append(idx[rng.permutation(idx.size)[:q]])
    return np.sort(np.concatenate(picked))


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


def _build(spec: TaskSpec, seed: int, use_cache: bool, root: Path) -> Examples | dict:
    path = root / "tasks" / f"{spec.name}-v{spec.version}-seed{seed}.json"
    if use_cache and path.exists():
        raw = json.loads(path.read_text())
        if "splits" in raw:
            return {s: _coerce_examples(raw["splits"][s]) for s in SPLITS}
        return _coerce_examples(raw)
    out = _call_builder(spec.builder, seed)
    if isinstance(out, Mapping) and all(s in out for s in SPLITS):
        built: Examples | dict = {s: _coerce_examples(out[s]) for s in SPLITS}
        payload = {"splits": {s: _to_json(built[s]) for s in SPLITS}}
    else:
        built = _coerce_examples(out)
        payload = _to_json(built)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)
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
        mirrored = {s: Examples(ex.texts, top - ex.labels) for s, ex in source.splits.items()}
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
        out[s] = ex.take(_rng(seed, "shuffle", s).permutation(len(ex)))
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
