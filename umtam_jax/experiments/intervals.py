"""Confidence intervals for merge comparisons: a paired, hierarchical bootstrap.

A comparison of two merges is only as good as the noise under it: which test examples were
drawn and which seed trained the experts. Both are resampled here. A replicate draws the
seeds with replacement (when there are several), then, inside each drawn seed and task,
the test examples with replacement; both methods are scored on the same draw (paired),
so the noise they share cancels. The statistic is the mean over seeds and tasks of each
task's metric, optionally divided by that seed's expert score on the task (the
"normalized" score merging papers report).

A difference is called ``"better"`` when its 95 % interval lies above 0, ``"worse"`` when
it lies below, ``"tied"`` otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]
"""``metric(labels, predictions) -> score`` of one task (higher is better)."""

Metrics = Metric | Mapping[str, Metric]
"""One metric for every task, or a mapping task -> its own metric (tasks may differ:
accuracy on one, macro-F1 on another)."""

# predictions[seed][task] -> array of predicted labels on that seed's test split.
Runs = Sequence[Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval.

    Attributes:
      estimate: the statistic on the data as observed.
      low, high: the percentile interval's ends.
      level: its coverage (0.95 by default).

    Example:
      >>> from umtam_jax.experiments.intervals import Interval
      >>> Interval(0.02, 0.005, 0.04).verdict(), Interval(-0.01, -0.03, 0.01).verdict()
      ('better', 'tied')
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def verdict(self) -> str:
        """``"better"`` (interval above 0), ``"worse"`` (below 0) or ``"tied"``."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tied"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict()}


def _check(labels: Runs, runs: Sequence[Runs], normalizers: Any) -> list[str]:
    if not labels:
        raise ValueError("no seeds: labels must hold one mapping task -> labels per seed")
    tasks = sorted(labels[0])
    for s, per_task in enumerate(labels):
        if sorted(per_task) != tasks:
            raise ValueError(f"labels[{s}] has tasks {sorted(per_task)}, expected {tasks}")
    for r, run in enumerate(runs):
        if len(run) != len(labels):
            raise ValueError(f"predictions {r} has {len(run)} seeds, labels {len(labels)}")
        for s, per_task in enumerate(run):
            for t in tasks:
                if t not in per_task:
                    raise ValueError(f"predictions {r}, seed {s}: no task {t!r}")
                if np.shape(per_task[t]) != np.shape(labels[s][t]):
                    raise ValueError(
                        f"predictions {r}, seed {s}, task {t!r}: shape "
                        f"{np.shape(per_task[t])} != labels {np.shape(labels[s][t])}"
                    )
    if normalizers is not None:
        if len(normalizers) != len(labels):
            raise ValueError(f"normalizers has {len(normalizers)} seeds, labels {len(labels)}")
        for s, per_task in enumerate(normalizers):
            for t in tasks:
                value = per_task.get(t) if isinstance(per_task, Mapping) else None
                if value is None or not np.isfinite(value) or value <= 0:
                    raise ValueError(f"normalizers[{s}][{t!r}] must be a positive number")
    return tasks


def _statistic(metric, labels, run, normalizers, tasks, seeds, draws) -> float:
    values = []
    for s, draw in zip(seeds, draws, strict=True):
        for t in tasks:
            idx = draw[t]
            task_metric = metric[t] if isinstance(metric, Mapping) else metric
            score = task_metric(labels[s][t][idx], run[s][t][idx])
            values.append(score / (normalizers[s][t] if normalizers is not None else 1.0))
    return float(np.mean(values))


def _replicates(
    metric: Metrics,
    labels: Runs,
    runs: Sequence[Runs],
    normalizers: Sequence[Mapping[str, float]] | None,
    samples: int,
    seed: int,
) -> tuple[list[float], np.ndarray]:
    """The observed statistic of each run and ``samples`` paired bootstrap replicates."""
    tasks = _check(labels, runs, normalizers)
    if isinstance(metric, Mapping) and not set(tasks) <= set(metric):
        raise ValueError(f"no metric for tasks {sorted(set(tasks) - set(metric))}")
    n_seeds = len(labels)
    identity = [{t: np.arange(len(labels[s][t])) for t in tasks} for s in range(n_seeds)]
    observed = [
        _statistic(metric, labels, run, normalizers, tasks, range(n_seeds), identity)
        for run in runs
    ]
    rng = np.random.default_rng(seed)
    out = np.empty((samples, len(runs)))
    for b in range(samples):
        seeds = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, int)
        draws = [
            {t: rng.integers(0, len(labels[s][t]), len(labels[s][t])) for t in tasks} for s in seeds
        ]
        for r, run in enumerate(runs):
            out[b, r] = _statistic(metric, labels, run, normalizers, tasks, seeds, draws)
    return observed, out


def _interval(estimate: float, replicates: np.ndarray, level: float) -> Interval:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def score_interval(
    metric: Metrics,
    labels: Runs,
    predictions: Runs,
    *,
    normalizers: Sequence[Mapping[str, float]] | None = None,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """One method's mean score over seeds and tasks, with its bootstrap interval.

    Args:
      metric: ``metric(labels, predictions) -> float`` of every task, or a mapping
        task -> its metric.
      labels: per seed, a mapping task -> test labels.
      predictions: per seed, a mapping task -> predicted labels (same shapes).
      normalizers: per seed, task -> the expert's score (the statistic is then the mean
        of score / expert score), or None for raw scores.
      samples: bootstrap replicates.
      level: interval coverage.
      seed: the resampling's seed.

    Returns:
      The :class:`Interval` of the mean score.

    Example:
      >>> import numpy as np
      >>> accuracy = lambda y, p: float(np.mean(y == p))
      >>> labels = [{"a": np.array([0, 1, 1, 0])}]
      >>> score_interval(accuracy, labels, [{"a": np.array([0, 1, 0, 0])}]).estimate
      0.75

    References:
      Efron & Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile interval);
      Dror et al., "The Hitchhiker's Guide to Testing Statistical Significance in NLP",
      ACL 2018.
    """
    observed, reps = _replicates(metric, labels, [predictions], normalizers, samples, seed)
    return _interval(observed[0], reps[:, 0], level)


def paired_difference(
    metric: Metrics,
    labels: Runs,
    predictions_a: Runs,
    predictions_b: Runs,
    *,
    normalizers: Sequence[Mapping[str, float]] | None = None,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Method A's mean score minus method B's, with a paired bootstrap interval.

    Both methods are scored on the same resampled seeds and test examples in every
    replicate; :meth:`Interval.verdict` then reads ``"better"`` / ``"worse"`` / ``"tied"``
    for A against B.

    Args:
      metric: ``metric(labels, predictions) -> float`` of every task, or a mapping
        task -> its metric.
      labels: per seed, a mapping task -> test labels.
      predictions_a, predictions_b: the two methods' predictions, shaped like ``labels``.
      normalizers: per seed, task -> the expert's score, or None for raw scores.
      samples: bootstrap replicates.
      level: interval coverage.
      seed: the resampling's seed.

    Returns:
      The :class:`Interval` of the difference A − B.

    Example:
      >>> import numpy as np
      >>> accuracy = lambda y, p: float(np.mean(y == p))
      >>> y = np.arange(200) % 2
      >>> good, bad = y.copy(), np.where(np.arange(200) < 120, y, 1 - y)
      >>> paired_difference(accuracy, [{"t": y}], [{"t": good}], [{"t": bad}]).verdict()
      'better'

    References:
      Koehn, "Statistical Significance Tests for Machine Translation Evaluation", EMNLP
      2004 (paired bootstrap); Dror et al., ACL 2018.
    """
    observed, reps = _replicates(
        metric, labels, [predictions_a, predictions_b], normalizers, samples, seed
    )
    return _interval(observed[0] - observed[1], reps[:, 0] - reps[:, 1], level)
