"""The protocol's table: normalized scores and paired differences with their intervals.

:func:`summarize` reads what :func:`~umtam_jax.experiments.protocol.run_protocol` stored
in a work directory (the test labels, every (seed, method)'s test predictions, the
experts' test scores) and computes, with :mod:`~umtam_jax.experiments.intervals`:

* per method, the mean over seeds and tasks of ``score / expert score`` (each seed's
  expert on that task) with its 95 % interval, resampling seeds and test examples;
* per method and reference method (UMTAM and task arithmetic by default), the paired
  difference ``method − reference`` with its interval and verdict (``"better"``,
  ``"worse"``, ``"tied"``).

A :class:`MergeTable` holds the tidy rows (one dict per method) and renders Markdown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments import intervals, store
from umtam_jax.experiments.data import compute_metric

__all__ = ["MergeTable", "compare_runs", "read_results", "summarize", "task_metrics"]


@dataclasses.dataclass
class MergeTable:
    """The protocol's comparison table.

    Attributes:
        rows: One dict per method: ``method``, ``name``, ``seeds``, ``score`` /
            ``low`` / ``high`` (normalized test score and interval), ``raw_score`` (the
            mean task metric), ``validation_score``, ``budget``, ``evaluations``,
            ``open_edges`` (``"seed N: axis"`` strings), ``merge_seconds``, ``hparams``
            (by seed) and, per reference ``R``, ``vs_R`` / ``vs_R_low`` / ``vs_R_high`` /
            ``vs_R_verdict`` (None for the reference itself).
        references: The reference methods.
        seeds: The seeds summarized.
        tasks: The tasks.
        missing: Methods asked for but not finished for every seed.
        level: The intervals' coverage.
    """

    rows: list[dict[str, Any]]
    references: tuple[str, ...]
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    missing: tuple[str, ...] = ()
    level: float = 0.95

    def row(self, method: str) -> dict[str, Any]:
        """The row of one method.

        Args:
            method: the method's key (its ``method`` entry).

        Returns:
            The row itself (not a copy).

        Raises:
            KeyError: no row for ``method``.
        """
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(method)

    def to_markdown(self, sort: bool = True) -> str:
        """The table in Markdown.

        Args:
            sort: rows by normalized test score, best first; False: in :attr:`rows` order.

        Returns:
            A header and one line per method: its name, normalized test score and
            interval, per reference the difference, interval and verdict (``—`` for the
            reference itself), budget, number of open edges and merge seconds; then a
            line naming the :attr:`missing` methods, if any.

        Example:
            >>> from umtam_jax.experiments import MergeTable
            >>> t = MergeTable(
            ...     [{"method": "m", "name": "M", "score": 0.9, "low": 0.8, "high": 0.95,
            ...       "budget": 1, "evaluations": 1, "open_edges": [], "merge_seconds": 0.1}],
            ...     references=(), seeds=(0,), tasks=("a",))
            >>> print(t.to_markdown())  # doctest: +NORMALIZE_WHITESPACE
            | Method | Norm. test score [95 % CI] | Budget | Open edges | Merge s |
            |---|---|---|---|---|
            | M | 0.900 [0.800, 0.950] | 1 | 0 | 0.10 |
        """
        pct = f"{100 * self.level:g} %"
        head = ["Method", f"Norm. test score [{pct} CI]"]
        head += [f"Δ vs {self._name(r)} [{pct} CI]" for r in self.references]
        head += ["Budget", "Open edges", "Merge s"]
        rows = sorted(self.rows, key=lambda r: -r["score"]) if sort else self.rows
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["name"], f"{r['score']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"]
            for ref in self.references:
                d = r.get(f"vs_{ref}")
                cells.append(
                    "—"
                    if d is None
                    else f"{d:+.3f} [{r[f'vs_{ref}_low']:+.3f}, {r[f'vs_{ref}_high']:+.3f}] "
                    f"{r[f'vs_{ref}_verdict']}"
                )
            cells += [str(r["budget"]), str(len(r["open_edges"])), f"{r['merge_seconds']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        foot = []
        if self.missing:
            foot.append(f"Not finished for every seed: {', '.join(self.missing)}.")
        if foot:
            lines += ["", *foot]
        return "\n".join(lines)

    def _name(self, method: str) -> str:
        try:
            return self.row(method)["name"]
        except KeyError:
            return method


_PARTS = ("experts", "posthoc", "runs", "labels")


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of a protocol run (:func:`~umtam_jax.experiments.protocol.
    run_protocol`) at ``path``, None when there is none.

    Args:
        path: The file.

    Returns:
        The record: an object with a ``protocol`` object (and ``experts``, ``posthoc``,
        ``runs`` and ``labels`` objects), or None when the file does not exist.

    Raises:
        ValueError: the file is damaged, or is not a protocol run's record (a file of
            its own in the work directory, never taken over).
    """
    results = store.read_record(path)
    if results is None:
        return None
    if not (
        isinstance(results, dict)
        and isinstance(results.get("protocol"), dict)
        and all(isinstance(results.get(p, {}), dict) for p in _PARTS)
    ):
        raise ValueError(
            f"{path} is not the record of a protocol run (an object with a 'protocol' "
            f"object and {', '.join(repr(p) for p in _PARTS)} objects): move it out of "
            "the work directory, or use another work directory"
        )
    return results


def task_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each task's metric function from ``{task: {"metric", "num_labels"}}`` (as the
    protocol records them); an empty split scores NaN."""

    def make(name: str, k: int) -> intervals.Metric:
        return lambda y, p: compute_metric(name, y, p, num_labels=k) if len(y) else float("nan")

    return {t: make(m["metric"], m["num_labels"]) for t, m in metrics.items()}


def summarize(
    workdir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    references: Sequence[str] = ("umtam", "task_arithmetic"),
    samples: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
) -> MergeTable:
    """The table of a protocol run, from its work directory.

    Args:
        workdir: The work directory of :func:`~umtam_jax.experiments.protocol.run_protocol`.
        methods: Methods to summarize (default: every method run).
        seeds: Seeds (default: every seed whose experts were trained); a method is
            summarized only when it finished for all of them.
        references: Reference methods of the paired differences.
        samples: Bootstrap replicates (one seed only; several give Student-t intervals).
        level: Interval coverage.
        bootstrap_seed: The resampling's seed (one seed only).

    Returns:
        A :class:`MergeTable`.

    Raises:
        FileNotFoundError: ``workdir`` has no ``results.json``, or a seed's test labels.
        ValueError: ``results.json`` or a labels or predictions file is damaged (never
            taken for a method that did not finish).
    """
    workdir = Path(workdir)
    results = read_results(workdir / "results.json")
    if results is None:
        raise FileNotFoundError(f"no results.json in {workdir}")
    protocol = results["protocol"]
    tasks = tuple(protocol["tasks"])
    seeds = tuple(int(s) for s in (seeds if seeds is not None else results["experts"]))
    methods = list(methods or protocol["methods"])
    labels, normalizers = [], []
    for s in seeds:
        arrays = store.read_npz_record(workdir / results["labels"][str(s)])
        if arrays is None:
            raise FileNotFoundError(f"test labels of seed {s} missing in {workdir}")
        labels.append({t: arrays[t] for t in tasks})
        normalizers.append(
            {t: max(float(results["experts"][str(s)][t]["test"]), 1e-12) for t in tasks}
        )
    metric = task_metrics(protocol["metrics"])
    preds: dict[str, list[dict[str, np.ndarray]]] = {}
    missing = []
    for m in methods:
        runs = results["runs"].get(m, {})
        loaded = [store.read_npz_record(workdir / runs[str(s)]["predictions"])
                  if str(s) in runs else None for s in seeds]  # fmt: skip
        if any(x is None for x in loaded):
            missing.append(m)
            continue
        preds[m] = [{t: x[t] for t in tasks} for x in loaded if x is not None]
    kw: dict[str, Any] = {
        "normalizers": normalizers,
        "samples": samples,
        "level": level,
        "seed": bootstrap_seed,
    }
    rows = []
    for m, p in preds.items():
        recs = [results["runs"][m][str(s)] for s in seeds]
        ci = intervals.score_interval(metric, labels, p, **kw)
        raw = np.mean(
            [[metric[t](labels[i][t], p[i][t]) for t in tasks] for i in range(len(seeds))]
        )
        row: dict[str, Any] = {
            "method": m,
            "name": recs[0]["name"],
            "seeds": len(seeds),
            "score": ci.estimate,
            "low": ci.low,
            "high": ci.high,
            "per_seed": list(ci.per_seed),
            "raw_score": float(raw),
            "validation_score": float(np.mean([r["validation_norm"] for r in recs])),
            "budget": recs[0]["budget"],
            "evaluations": float(np.mean([r["evaluations"] for r in recs])),
            "open_edges": [
                f"seed {s}: {a}" for s, r in zip(seeds, recs, strict=True) for a in r["open_edges"]
            ],  # fmt: skip
            "merge_seconds": float(np.median([r["merge_seconds"] for r in recs])),
            "hparams": {str(s): r["hparams"] for s, r in zip(seeds, recs, strict=True)},
        }
        for ref in references:
            if ref == m or ref not in preds:
                keys = ("", "_low", "_high", "_verdict", "_per_seed")
                row.update({f"vs_{ref}{x}": None for x in keys})
                continue
            d = intervals.paired_difference(metric, labels, p, preds[ref], **kw)
            row.update(
                {
                    f"vs_{ref}": d.estimate,
                    f"vs_{ref}_low": d.low,
                    f"vs_{ref}_high": d.high,
                    f"vs_{ref}_verdict": d.verdict(),
                    f"vs_{ref}_per_seed": list(d.per_seed),
                }
            )
        rows.append(row)
    return MergeTable(
        rows,
        references=tuple(r for r in references if r in preds),
        seeds=seeds,
        tasks=tasks,
        missing=tuple(missing),
        level=level,
    )


def _run_predictions(workdir: Path, method: str, seeds: Sequence[int]) -> tuple[Any, list, list]:
    results = read_results(workdir / "results.json")
    if results is None:
        raise FileNotFoundError(f"no results.json in {workdir}")
    runs = results["runs"].get(method, {})
    missing = [s for s in seeds if str(s) not in runs]
    if missing:
        raise ValueError(f"{method!r} has no finished run for seeds {missing} in {workdir}")
    labels = [store.read_npz_record(workdir / results["labels"][str(s)]) for s in seeds]
    preds = [store.read_npz_record(workdir / runs[str(s)]["predictions"]) for s in seeds]
    if any(x is None for x in labels + preds):
        raise FileNotFoundError(f"test labels or predictions of {method!r} missing in {workdir}")
    return results["protocol"], labels, preds


def compare_runs(
    a: tuple[str | Path, str],
    b: tuple[str | Path, str],
    *,
    seeds: Sequence[int] | None = None,
    samples: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
) -> intervals.Interval:
    """Raw test score of one protocol run's method minus another's, paired.

    For comparing *pipelines*: e.g. UMTAM-trained experts merged by UMTAM against
    AdamW-trained experts merged by TIES, each from its own work directory. Their
    normalized scores divide by different experts, so the raw task metrics (mean over
    seeds and tasks) are compared; the pairing holds because a seed fixes the data split,
    and the test labels are checked to be identical.

    Args:
        a, b: ``(work directory, method)`` of each side.
        seeds: Seeds (default: those with experts in both runs).
        samples, level, bootstrap_seed: As :func:`summarize`.

    Returns:
        The :class:`~umtam_jax.experiments.intervals.Interval` of A − B.

    Raises:
        ValueError: the runs differ in tasks or test labels, or a method did not finish.
    """
    wa, wb = Path(a[0]), Path(b[0])
    if seeds is None:
        ra, rb = read_results(wa / "results.json"), read_results(wb / "results.json")
        if ra is None or rb is None:
            raise FileNotFoundError(f"no results.json in {wa if ra is None else wb}")
        seeds = sorted(int(s) for s in set(ra["experts"]) & set(rb["experts"]))
    proto_a, labels_a, preds_a = _run_predictions(wa, a[1], seeds)
    proto_b, labels_b, preds_b = _run_predictions(wb, b[1], seeds)
    tasks = tuple(proto_a["tasks"])
    if tuple(proto_b["tasks"]) != tasks:
        raise ValueError(f"the runs hold different tasks: {tasks} vs {tuple(proto_b['tasks'])}")
    for s, la, lb in zip(seeds, labels_a, labels_b, strict=True):
        for t in tasks:
            if not np.array_equal(la[t], lb[t]):
                raise ValueError(f"seed {s}, task {t!r}: the runs' test labels differ")
    return intervals.paired_difference(
        task_metrics(proto_a["metrics"]),
        [{t: x[t] for t in tasks} for x in labels_a],
        [{t: x[t] for t in tasks} for x in preds_a],
        [{t: x[t] for t in tasks} for x in preds_b],
        samples=samples,
        level=level,
        seed=bootstrap_seed,
    )
