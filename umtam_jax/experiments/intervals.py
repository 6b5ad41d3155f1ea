"""Confidence intervals for merge comparisons: over seeds, or over test examples.

A comparison of two merges is only as good as the noise under it: which seed trained the
experts (and drew the data split) and which test examples were drawn. The statistic is
the mean over seeds and tasks of each task's metric, optionally divided by that seed's
expert score on the task (the "normalized" score merging papers report); a difference
is paired: both methods are scored on the same seeds and examples, so the noise they
share cancels.

* **Several seeds:** each seed's statistic (its mean over tasks; for a difference, A's
  minus B's) already carries both noises, its training and its own test sample. The
  interval is Student-t over those per-seed values, n − 1 degrees of freedom. Resampling
  the seeds instead (a hierarchical bootstrap) cannot leave [min, max] of the per-seed
  values, which holds the mean with probability 1 − 2·2⁻ⁿ: 75 % for 3 seeds.
* **One seed:** only the test examples' noise is observable: a paired percentile
  bootstrap over the test examples of each task. Its interval says nothing about
  another seed.

A difference is called ``"better"`` when its interval lies above 0, ``"worse"`` when it
lies below, ``"tied"`` otherwise (``"undefined"`` where a seed has no finite score).
"""

from __future__ import annotations

import dataclasses
import math
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
    """A point estimate with its confidence interval.

    Attributes:
      estimate: the statistic on the data as observed.
      low, high: the interval's ends.
      level: its coverage (0.95 by default).
      per_seed: the statistic of each seed (its mean over tasks; for a difference, the
        per-seed differences): the values a Student-t interval was computed from, or the
        one seed's value under a test-example bootstrap. Empty when not recorded.

    Example:
      >>> from umtam_jax.experiments.intervals import Interval
      >>> Interval(0.02, 0.005, 0.04).verdict(), Interval(-0.01, -0.03, 0.01).verdict()
      ('better', 'tied')
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95
    per_seed: tuple[float, ...] = ()

    def verdict(self) -> str:
        """``"better"`` (interval above 0), ``"worse"`` (below 0), ``"tied"``, or
        ``"undefined"`` when the interval has no ends (a seed without a finite score)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return "undefined"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tied"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_seed": list(self.per_seed),
                "verdict": self.verdict()}  # fmt: skip


def student_t(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """The mean of independent values with its Student-t interval (n − 1 degrees of
    freedom), e.g. of one statistic over seeds.

    Args:
      values: at least two finite numbers.
      level: interval coverage.

    Returns:
      The :class:`Interval` of the mean, ``per_seed`` holding ``values``.

    Raises:
      ValueError: fewer than two values, or one that is not finite.

    Example:
      >>> from umtam_jax.experiments.intervals import student_t
      >>> c = student_t([1.0, 2.0, 3.0])
      >>> c.estimate, round(c.low, 3), round(c.high, 3)
      (2.0, -0.484, 4.484)

    References:
      Student, "The Probable Error of a Mean", Biometrika 1908.
    """
    import scipy.stats

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a Student-t interval needs at least two values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"a Student-t interval needs finite values, got {x.tolist()}")
    mean = float(x.mean())
    t = float(scipy.stats.t.ppf(0.5 + level / 2, len(x) - 1))
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, level, tuple(float(v) for v in x))


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


def _task_score(metric, labels, run, normalizers, seed, task, idx) -> float:
    task_metric = metric[task] if isinstance(metric, Mapping) else metric
    score = task_metric(labels[seed][task][idx], run[seed][task][idx])
    return score / (normalizers[seed][task] if normalizers is not None else 1.0)


def _per_seed(metric, labels, run, normalizers, tasks) -> np.ndarray:
    """Each seed's mean over tasks of the (normalized) metric."""
    full = slice(None)
    return np.asarray(
        [
            np.mean([_task_score(metric, labels, run, normalizers, s, t, full) for t in tasks])
            for s in range(len(labels))
        ]
    )


def _example_bootstrap(metric, labels, runs, normalizers, tasks, samples, seed) -> np.ndarray:
    """``samples`` replicates of one seed's statistic of each run, the test examples of
    every task resampled with replacement, the same draw for every run (paired)."""
    rng = np.random.default_rng(seed)
    out = np.empty((samples, len(runs)))
    for b in range(samples):
        draws = {t: rng.integers(0, len(labels[0][t]), len(labels[0][t])) for t in tasks}
        for r, run in enumerate(runs):
            out[b, r] = np.mean(
                [_task_score(metric, labels, run, normalizers, 0, t, draws[t]) for t in tasks]
            )
    return out


def _interval(
    metric: Metrics,
    labels: Runs,
    runs: Sequence[Runs],
    normalizers: Sequence[Mapping[str, float]] | None,
    samples: int,
    level: float,
    seed: int,
) -> Interval:
    """The interval of the first run's statistic minus the second's (of the one run's
    statistic when there is one): Student-t over seeds, or the one seed's bootstrap."""
    tasks = _check(labels, runs, normalizers)
    if isinstance(metric, Mapping) and not set(tasks) <= set(metric):
        raise ValueError(f"no metric for tasks {sorted(set(tasks) - set(metric))}")
    first, *second = [_per_seed(metric, labels, r, normalizers, tasks) for r in runs]
    values = first - second[0] if second else first
    if len(labels) > 1 and not np.all(np.isfinite(values)):  # e.g. an empty split's NaN
        nan = float("nan")
        return Interval(float(np.mean(values)), nan, nan, level, tuple(map(float, values)))
    if len(labels) > 1:
        return student_t(values, level)
    reps = _example_bootstrap(metric, labels, runs, normalizers, tasks, samples, seed)
    reps = reps[:, 0] - reps[:, 1] if second else reps[:, 0]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(values[0]), float(low), float(high), level, (float(values[0]),))


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
    """One method's mean score over seeds and tasks, with its interval: Student-t over
    the seeds' scores when there are several, a bootstrap over the one seed's test
    examples otherwise.

    Args:
      metric: ``metric(labels, predictions) -> float`` of every task, or a mapping
        task -> its metric.
      labels: per seed, a mapping task -> test labels.
      predictions: per seed, a mapping task -> predicted labels (same shapes).
      normalizers: per seed, task -> the expert's score (the statistic is then the mean
        of score / expert score), or None for raw scores.
      samples: bootstrap replicates (one seed only).
      level: interval coverage.
      seed: the resampling's seed (one seed only).

    Returns:
      The :class:`Interval` of the mean score.

    Example:
      >>> import numpy as np
      >>> accuracy = lambda y, p: float(np.mean(y == p))
      >>> from umtam_jax.experiments.intervals import score_interval
      >>> labels = [{"a": np.array([0, 1, 1, 0])}]
      >>> score_interval(accuracy, labels, [{"a": np.array([0, 1, 0, 0])}]).estimate
      0.75

    References:
      Student, Biometrika 1908; Efron & Tibshirani, "An Introduction to the Bootstrap",
      1993 (percentile interval); Dror et al., "The Hitchhiker's Guide to Testing
      Statistical Significance in NLP", ACL 2018.
    """
    return _interval(metric, labels, [predictions], normalizers, samples, level, seed)


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
    """Method A's mean score minus method B's, with a paired interval.

    With several seeds, Student-t over the per-seed differences; with one, a bootstrap
    over its test examples, both methods scored on the same draw in every replicate.
    :meth:`Interval.verdict` then reads ``"better"`` / ``"worse"`` / ``"tied"`` for A
    against B.

    Args:
      metric: ``metric(labels, predictions) -> float`` of every task, or a mapping
        task -> its metric.
      labels: per seed, a mapping task -> test labels.
      predictions_a, predictions_b: the two methods' predictions, shaped like ``labels``.
      normalizers: per seed, task -> the expert's score, or None for raw scores.
      samples: bootstrap replicates (one seed only).
      level: interval coverage.
      seed: the resampling's seed (one seed only).

    Returns:
      The :class:`Interval` of the difference A − B.

    Example:
      >>> import numpy as np
      >>> accuracy = lambda y, p: float(np.mean(y == p))
      >>> y = np.arange(200) % 2
      >>> from umtam_jax.experiments.intervals import paired_difference
      >>> good, bad = y.copy(), np.where(np.arange(200) < 120, y, 1 - y)
      >>> paired_difference(accuracy, [{"t": y}], [{"t": good}], [{"t": bad}]).verdict()
      'better'

    References:
      Student, Biometrika 1908 (paired t); Koehn, "Statistical Significance Tests for
      Machine Translation Evaluation", EMNLP 2004 (paired bootstrap); Dror et al., ACL
      2018.
    """
    runs = [predictions_a, predictions_b]
    return _interval(metric, labels, runs, normalizers, samples, level, seed)
