"""Conflict intensity: does the winning merge depend on how much the experts disagree?

The UMTAM paper leaves open how the intensity of sign conflicts between experts changes
which merge wins. This study answers it on the protocol's own experts, without training
anything new for the protocol's tasks (tasks outside the main run, such as a mirror task,
get their experts trained into the shared cache): every *pair* of tasks (or the given
``pairs``) is merged by each compared method under
the protocol (its own work directory ``pairs/<a>+<b>`` whose expert and token caches are
links to the main run's, so the experts are the same checkpoints), and each pair's
sign-conflict rate between its two experts (:func:`umtam_jax.merging.diagnostics.\
sign_conflict`, recorded with every merge) is set beside each method's gain over task
arithmetic with its interval. :func:`conflict_study` returns one row per pair, sorted by
conflict rate, and the rank correlation (Spearman) between conflict rate and each gain.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments.comparison import summarize
from umtam_jax.experiments.protocol import ProtocolSize, resolve_size, run_protocol

__all__ = ["conflict_study", "rank_correlations"]

#: The shared caches a pair's work directory links to.
_SHARED = ("experts", "tokens", "jax-cache")


def _link_caches(main: Path, pair: Path) -> None:
    pair.mkdir(parents=True, exist_ok=True)
    for name in _SHARED:
        (main / name).mkdir(parents=True, exist_ok=True)
        link = pair / name
        if not link.exists():
            os.symlink(os.path.relpath(main / name, pair), link, target_is_directory=True)


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the recorded values (None where a run did not record one)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    c = np.corrcoef(rx, ry)[0, 1]
    return None if not np.isfinite(c) else float(c)


def rank_correlations(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Spearman correlations between the pairs' conflict rates and each method's gain.

    Args:
        rows: Rows of :func:`conflict_study` (possibly from several studies).
        methods: The compared methods (``task_arithmetic``, the reference, is skipped).

    Returns:
        ``{"spearman": {method: rho or None}, "spearman_kept": {method: rho or None}}``:
        over every row with the rate over all entries, and over the rows that recorded the
        rate among kept entries with that rate (None with fewer than 3 rows).
    """
    out: dict[str, Any] = {"spearman": {}, "spearman_kept": {}}
    for m in methods:
        if m == "task_arithmetic":
            continue
        gains = [r[f"gain_{m}"]["estimate"] for r in rows]
        out["spearman"][m] = _spearman([r["conflict"] for r in rows], gains)
        kept = [(r["conflict_kept"], g) for r, g in zip(rows, gains, strict=True)
                if r.get("conflict_kept") is not None]  # fmt: skip
        out["spearman_kept"][m] = _spearman([k for k, _ in kept], [g for _, g in kept])
    return out


def conflict_study(
    workdir: str | Path,
    *,
    size: str | ProtocolSize = "medium",
    tasks: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    methods: Sequence[str] = ("umtam", "ties", "task_arithmetic"),
    seeds: Sequence[int] | None = None,
    samples: int | None = None,
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> dict[str, Any]:
    """Runs (or resumes) every pair of tasks and relates conflict rate to merge gains.

    Args:
        workdir: The main protocol run's work directory (its experts are reused).
        size: Its protocol size.
        tasks: Its tasks (default: the size's); every pair of them is merged.
        pairs: The pairs of tasks to merge instead of every pair of ``tasks``.
        methods: Compared methods; ``task_arithmetic`` is the reference and is added.
        seeds: Seeds (default: the size's).
        samples: Bootstrap replicates (default: the size's).
        log: Where progress lines go (None: silent).
        **kwargs: Passed to :func:`~umtam_jax.experiments.protocol.run_protocol`
            (``base_encoder``, ``tokenizer``, ...).

    Returns:
        ``{"pairs": [{"tasks", "conflict", "conflict_by_seed", "conflict_mass",
        "conflict_kept", "conflict_per_leaf", method: {"score", "low", "high"},
        "gain_<method>": {"estimate",
        "low", "high", "verdict"}}...], "spearman": {method: rho or None},
        "spearman_kept": {method: rho or None}, "methods", "seeds"}``: pairs sorted by
        conflict rate (seed mean); gains are paired differences of normalized test scores
        against task arithmetic; ``conflict_mass`` is the seed mean of the share of the
        task vectors' magnitude at conflicting entries; ``conflict_per_leaf`` the seed mean
        of the rate of each encoder leaf (path → rate, None where no entry moved in both);
        ``conflict_kept`` the seed mean of the rate among the entries each task vector
        keeps at TIES's default density (:data:`umtam_jax.merging.diagnostics.\
KEPT_DENSITY`; None for runs recorded without it), with its own rank correlations
        ``spearman_kept``.
    """
    sz = resolve_size(size)
    tasks = list(tasks or sz.tasks)
    seeds = list(sz.seeds if seeds is None else seeds)
    methods = list(dict.fromkeys([*methods, "task_arithmetic"]))
    workdir = Path(workdir)
    rows = []
    for a, b in itertools.combinations(tasks, 2) if pairs is None else pairs:
        pair = workdir / "pairs" / f"{a}+{b}"
        _link_caches(workdir, pair)
        results = run_protocol([a, b], methods, seeds, size=sz, workdir=pair, log=log, **kwargs)
        table = summarize(pair, methods=methods, seeds=seeds, references=("task_arithmetic",),
                          samples=samples or sz.bootstrap_samples)  # fmt: skip
        diagnostics = [
            results["runs"]["task_arithmetic"][str(s)].get("diagnostics") or {} for s in seeds
        ]
        found = [d.get("sign_conflict", {}) for d in diagnostics]
        kept = [d.get("sign_conflict_kept", {}).get("rate") for d in diagnostics]
        rates, masses = [d.get("rate") for d in found], [d.get("mass") for d in found]
        leaves = [d.get("per_leaf") or {} for d in found]
        row: dict[str, Any] = {
            "tasks": [a, b],
            "conflict": _mean(rates),
            "conflict_by_seed": rates,
            "conflict_mass": _mean(masses),
            "conflict_kept": _mean(kept),
            "conflict_per_leaf": {k: _mean([p.get(k) for p in leaves]) for k in leaves[0]},
        }
        for m in methods:
            r = table.row(m)
            row[m] = {"score": r["score"], "low": r["low"], "high": r["high"]}
            if m != "task_arithmetic":
                row[f"gain_{m}"] = {
                    "estimate": r["vs_task_arithmetic"],
                    "low": r["vs_task_arithmetic_low"],
                    "high": r["vs_task_arithmetic_high"],
                    "verdict": r["vs_task_arithmetic_verdict"],
                }
        rows.append(row)
    rows.sort(key=lambda r: r["conflict"])
    return store.jsonable(
        {"pairs": rows, **rank_correlations(rows, methods), "methods": methods, "seeds": seeds}
    )
