"""The containers of a task's examples: :class:`Examples` and :class:`TaskData`.

:class:`Examples` holds texts (or text pairs) with their labels; :class:`TaskData` a
loaded task's three splits (:data:`SPLITS`) and what evaluating on it needs.
:mod:`~umtam_jax.experiments.data`, which builds and loads them, re-exports all three.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from umtam_jax.experiments.metrics import compute_metric

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Examples:
    """A list of examples.

    Attributes:
        texts: ``list[str]`` for single-text tasks, ``list[tuple[str, str]]`` for pair
            tasks.
        labels: int64 array of shape ``[len(texts)]``.

    Example:
      >>> from umtam_jax.experiments import data
      >>> ex = data.Examples(["a", "b", "c", "d"], [0, 1, 1, 0])
      >>> len(ex), ex.take([1, 2]).texts, ex.class_counts(2).tolist()
      (4, ['b', 'c'], [2, 2])
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

    Example:
      >>> from umtam_jax.experiments import data
      >>> split = data.Examples(["x", "y"], [0, 1])
      >>> task = data.TaskData("toy", "single", ("no", "yes"), "accuracy", split, split, split)
      >>> task.num_labels, task.seed_name
      (2, 'toy')
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
