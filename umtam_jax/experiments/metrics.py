"""Metrics of the experiments' classification tasks, in a small registry.

A task names its metric (``"accuracy"``, ``"macro_f1"`` or one added with
:func:`register_metric`); :meth:`~umtam_jax.experiments.data.TaskData.evaluate` computes it.

Example:
    >>> from umtam_jax.experiments import metrics
    >>> metrics.compute_metric("accuracy", [0, 1, 1], [0, 1, 0])  # doctest: +ELLIPSIS
    0.66...
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["accuracy", "compute_metric", "macro_f1", "register_metric"]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int | None = None) -> float:
    """Fraction of correct predictions.

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        num_labels: Unused (the signature every metric shares).

    Returns:
        The accuracy in [0, 1] (0 for no examples).

    Example:
      >>> from umtam_jax.experiments.metrics import accuracy
      >>> accuracy([0, 1, 1, 2], [0, 1, 2, 2])
      0.75
    """
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

    Example:
      >>> from umtam_jax.experiments.metrics import macro_f1
      >>> round(macro_f1([0, 0, 1, 1], [0, 1, 1, 1]), 4)  # F1 2/3 and 4/5
      0.7333
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
    """Registers a metric for tasks to name (replacing one of the same name).

    Args:
        name: The name tasks give as their ``metric``.
        fn: ``fn(y_true, y_pred, num_labels=None) -> float``, higher is better.

    Example:
      >>> from umtam_jax.experiments import metrics
      >>> metrics.register_metric("error_count", lambda t, p, num_labels=None: -sum(
      ...     a != b for a, b in zip(t, p)))
      >>> metrics.compute_metric("error_count", [0, 1, 1], [0, 0, 0])
      -2
    """
    _METRICS[name] = fn


def compute_metric(
    name: str, y_true: np.ndarray, y_pred: np.ndarray, num_labels: int | None = None
) -> float:
    """Computes the metric ``name`` ("accuracy", "macro_f1" or a registered one).

    Args:
        name: The metric's name.
        y_true: True labels.
        y_pred: Predicted labels.
        num_labels: Number of classes, passed on to the metric.

    Returns:
        The metric's value.

    Raises:
        KeyError: no metric of that name, with the known names.

    Example:
      >>> from umtam_jax.experiments.metrics import compute_metric
      >>> compute_metric("accuracy", [1, 0], [1, 1])
      0.5
    """
    if name not in _METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(_METRICS)}")
    return _METRICS[name](y_true, y_pred, num_labels=num_labels)
