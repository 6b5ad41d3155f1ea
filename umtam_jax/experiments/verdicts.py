"""Verdicts of a measured interval against a claimed number: the rule by which the paper's
claims are judged (:mod:`umtam_jax.experiments.claims`, and the claims' own benchmarks,
``efficiency`` and ``spectrum``).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["VERDICTS", "Kind", "judge"]

#: How a claimed number is read: an effect in the paper's direction, a cost, or a threshold.
Kind = Literal["effect", "cost", "at_least", "at_most"]
#: The three verdicts :func:`judge` returns.
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def judge(
    low: float | None,
    high: float | None,
    claimed: float | None,
    kind: Kind = "effect",
    *,
    estimate: float | None = None,
    no_interval: str = "single run, no interval",
) -> tuple[str, str]:
    """The verdict of an interval against the paper's claim.

    Kinds (values in the claim's unit; for ``"effect"`` positive is the paper's direction):

    * ``"effect"``: reproduced when the interval excludes 0 on the positive side and
      covers or exceeds ``claimed`` (if given); not reproduced when it lies below 0 or
      below ``claimed``; inconclusive when it covers 0 (and not only values below
      ``claimed``).
    * ``"cost"``: a claimed (small) cost; reproduced when the whole interval lies at or
      below ``claimed`` (the cost is shown no larger), not reproduced when it lies above,
      inconclusive when it covers ``claimed`` (a wide interval proves nothing).
    * ``"at_least"`` / ``"at_most"``: a threshold; reproduced when the whole interval is
      on the claimed side, not reproduced when it is on the other, else inconclusive.

    Without an interval the verdict is inconclusive (``no_interval``), with what the point
    ``estimate`` alone would read.

    Returns:
        ``(verdict, why)``.

    Raises:
        ValueError: ``claimed`` is None for a kind other than ``"effect"``, or ``kind`` is
            unknown.

    Example:
        >>> from umtam_jax.experiments.verdicts import judge
        >>> judge(2.0, 20.0, 14.9)
        ('reproduced', 'the interval is above 0 and reaches 14.9')
        >>> judge(-1.0, 3.0, 1.6)[0], judge(-5.0, -1.0, 1.6)[0]
        ('inconclusive', 'not reproduced')
    """
    if low is None or high is None:
        if estimate is None:
            return "inconclusive", no_interval
        verdict, why = _read(estimate, estimate, claimed, kind, "the value")
        return "inconclusive", f"{no_interval}; the point value alone reads {verdict}: {why}"
    return _read(low, high, claimed, kind, "the interval")


def _read(low: float, high: float, claimed: float | None, kind: Kind, it: str) -> tuple[str, str]:
    if kind == "effect":
        if high < 0:
            return "not reproduced", f"{it} is below 0 (the other direction)"
        if claimed is not None and high < claimed:
            return "not reproduced", f"{it} is below the paper's {claimed:g}" + (
                " and covers 0" if low <= 0 else ""
            )
        if low <= 0:
            return "inconclusive", f"{it} covers 0"
        return "reproduced", f"{it} is above 0" + (f" and reaches {claimed:g}" if claimed else "")
    if claimed is None:
        raise ValueError(f"a {kind!r} claim needs its claimed value (got None)")
    if kind == "cost":
        if low > claimed:
            return "not reproduced", f"{it} is above the paper's {claimed:g}"
        if high > claimed:
            return "inconclusive", f"{it} covers the paper's {claimed:g}"
        return "reproduced", f"{it} is not above the paper's {claimed:g}"
    if kind not in ("at_least", "at_most"):
        raise ValueError(f"unknown kind {kind!r}")
    up = kind == "at_least"
    if (low > claimed) if up else (high < claimed):
        return "reproduced", f"{it} is {'above' if up else 'below'} {claimed:g}"
    if (high < claimed) if up else (low > claimed):
        return "not reproduced", f"{it} is {'below' if up else 'above'} {claimed:g}"
    return "inconclusive", f"{it} covers the threshold {claimed:g}"
