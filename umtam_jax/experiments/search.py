"""Hyper-parameter search on validation with an equal budget and grids that grow at edges.

Comparing merges fairly needs two things of the search: the same number of validation
evaluations for every method, and no choice left on the edge of its grid (a best value on
the edge means the optimum may lie outside). :func:`grid_search` starts from a grid,
then repeatedly

1. extends an axis outward when the best point sits on its edge (within the axis's
   bounds), evaluating one new point: the best setting with that axis moved one step
   beyond the edge;
2. when no axis is on an open edge, refines: the midpoint between the best value and a
   neighbour on one axis, the better-scoring neighbour first;

until the budget of evaluations is spent or nothing is left to try. The result says
whether the choice still sits on an open edge (the search could not settle) so tables
can flag it. Ties go to the earlier evaluated point, so the initial grid's order decides.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Axis:
    """One searched hyper-parameter.

    Attributes:
      name: the keyword.
      values: the initial grid values (numbers, at least one).
      low, high: closed bounds no value may leave (None: unbounded).
      log: extend and refine geometrically (scales, learning rates) instead of linearly.
      step: the factor (``log``) or increment (linear) of one extension; by default the
        ratio or gap of the two outermost initial values on that side (2 or 0.1 with
        one value).
      integer: values are rounded to integers (ranks, counts).

    Example:
      >>> from umtam_jax.experiments.search import Axis
      >>> Axis("density", (0.4, 0.2, 0.4), low=0.01, high=1.0, log=True).values
      (0.2, 0.4)
    """

    name: str
    values: tuple[float, ...]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        values = tuple(sorted(set(self.values)))
        if not values:
            raise ValueError(f"axis {self.name!r} has no values")
        for v in values:
            if not math.isfinite(v):
                raise ValueError(f"axis {self.name!r}: value {v!r} is not finite")
            if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
                raise ValueError(
                    f"axis {self.name!r}: value {v!r} outside [{self.low}, {self.high}]"
                )
            if self.log and v <= 0:
                raise ValueError(f"axis {self.name!r}: log axes need positive values, got {v!r}")
        object.__setattr__(self, "values", values)

    def _round(self, v: float) -> float:
        return float(round(v)) if self.integer else v

    def beyond(self, values: Sequence[float], upward: bool) -> float | None:
        """The next value past the current edge, or None at a bound / nothing new."""
        edge = values[-1] if upward else values[0]
        inner = values[-2] if len(values) > 1 else None
        if self.log:
            factor = self.step or (edge / inner if inner else 2.0)
            factor = max(factor, 1 / factor)
            new = edge * factor if upward else edge / factor
        else:
            gap = self.step or (abs(edge - inner) if inner is not None else 0.1)
            new = edge + gap if upward else edge - gap
        bound = self.high if upward else self.low
        if bound is not None:
            new = min(new, bound) if upward else max(new, bound)
        new = self._round(new)
        return None if new in values else new

    def between(self, a: float, b: float) -> float | None:
        """The midpoint of ``a`` and ``b`` (geometric on log axes), or None if not new."""
        mid = math.sqrt(a * b) if self.log else (a + b) / 2
        mid = self._round(mid)
        return None if mid in (a, b) else mid


@dataclasses.dataclass
class SearchResult:
    """What :func:`grid_search` found.

    Attributes:
      best: the chosen setting.
      score: its validation score.
      trials: every evaluated ``(setting, score)`` in evaluation order.
      open_edges: axes on which the choice still sits on an edge that could be extended
        (the budget ran out first); empty when the search settled.

    Example:
      >>> from umtam_jax.experiments.search import Axis, grid_search
      >>> result = grid_search(lambda s: -((s["scale"] - 0.8) ** 2),
      ...                      [Axis("scale", (0.5, 1.0), low=0.0, log=True)], budget=6)
      >>> round(result.best["scale"], 2), len(result.trials), result.open_edges
      (0.77, 6, [])
    """

    best: dict[str, Any]
    score: float
    trials: list[tuple[dict[str, Any], float]]
    open_edges: list[str]


def grid_search(
    evaluate: Callable[[dict[str, Any]], float],
    axes: Sequence[Axis],
    *,
    budget: int,
    fixed: dict[str, Any] | None = None,
) -> SearchResult:
    """Maximizes ``evaluate`` over the grid of ``axes``, extended and refined to ``budget``.

    Args:
      evaluate: the validation score of one setting (higher is better).
      axes: the searched hyper-parameters; none means the one setting ``fixed``.
      budget: the number of evaluations to spend (at least the initial grid's size).
      fixed: keywords passed unchanged with every setting.

    Returns:
      A :class:`SearchResult`.

    Raises:
      ValueError: the initial grid is larger than the budget, or duplicate axes.

    Example:
      >>> from umtam_jax.experiments.search import Axis, grid_search
      >>> score = lambda hp: -((hp["scaling"] - 3.5) ** 2)
      >>> axes = [Axis("scaling", (0.5, 1.0), low=0.0, log=True)]
      >>> short = grid_search(score, axes, budget=4)  # 0.5, 1, then 2 and 4 past the edge
      >>> short.best, short.open_edges  # 4 is still on the edge: the budget ran out
      ({'scaling': 4.0}, ['scaling'])
      >>> grid_search(score, axes, budget=6).open_edges  # 8 is worse: settled
      []

    References:
      Bergstra & Bengio, "Random Search for Hyper-Parameter Optimization", JMLR 2012
      (on the budgets of grid searches).
    """
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate axes in {names}")
    fixed = dict(fixed or {})
    grid = [
        dict(zip(names, vs, strict=True)) for vs in itertools.product(*(a.values for a in axes))
    ]
    if len(grid) > budget:
        raise ValueError(f"the initial grid has {len(grid)} points, more than budget={budget}")
    values = {a.name: list(a.values) for a in axes}
    trials: list[tuple[dict[str, Any], float]] = []
    seen: dict[tuple, float] = {}

    def run(point: dict[str, Any]) -> bool:
        key = tuple(point[n] for n in names)
        if key in seen or len(trials) >= budget:
            return False
        score = float(evaluate({**fixed, **point}))
        if not math.isfinite(score):
            score = -math.inf  # a diverged setting is never chosen
        seen[key] = score
        trials.append((dict(point), score))
        for n in names:
            if point[n] not in values[n]:
                values[n] = sorted([*values[n], point[n]])
        return True

    def best() -> dict[str, Any]:
        return max(trials, key=lambda t: t[1])[0]  # max keeps the first of equal scores

    def open_edges(point: dict[str, Any]) -> list[tuple[Axis, float]]:
        out = []
        for a in axes:
            vs = values[a.name]
            for upward, edge in ((False, vs[0]), (True, vs[-1])):
                if point[a.name] == edge:
                    new = a.beyond(vs, upward)
                    if new is not None:
                        out.append((a, new))
        return out

    for point in grid:
        run(point)
    while len(trials) < budget:
        current = best()
        edges = open_edges(current)
        if edges and any(run({**current, a.name: new}) for a, new in edges):
            continue
        if not any(run(point) for point in _midpoints(current, axes, values, seen, names)):
            break
    chosen = best()
    return SearchResult(
        best={**fixed, **chosen},
        score=seen[tuple(chosen[n] for n in names)],
        trials=trials,
        open_edges=[a.name for a, _ in open_edges(chosen)],
    )


def _midpoints(current, axes, values, seen, names):
    """Refinement candidates around ``current``: on each axis, the midpoints towards its
    two neighbouring values, the side whose neighbour scored higher first."""
    for a in axes:
        vs = values[a.name]
        i = vs.index(current[a.name])
        sides = []
        for j in (i - 1, i + 1):
            if 0 <= j < len(vs):
                neighbour = {**current, a.name: vs[j]}
                score = seen.get(tuple(neighbour[n] for n in names), -math.inf)
                sides.append((score, j))
        for _, j in sorted(sides, key=lambda s: -s[0]):
            mid = a.between(current[a.name], vs[j])
            if mid is not None:
                yield {**current, a.name: mid}
