"""Hyper-parameter selection: one merge method's grid searched on validation, reported on test.

Every setting of the grid is merged and scored on the validation split by the mean
*normalized* score over tasks (merged / expert); the best setting is then scored once on
the test split. Every method gets the same treatment; nothing is tuned on test.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.evaluation import merged_scores, normalized_score
from umtam_jax.experiments.experts import ExpertResult
from umtam_jax.experiments.merge import MERGE_METHODS, MergeMethod, merge_encoders
from umtam_jax.experiments.tasks import TokenizedTask

__all__ = ["select_on_validation"]

Params = dict[str, Any]


def select_on_validation(
    method: str | MergeMethod,
    grid: Sequence[Mapping[str, Any]],
    base_encoder: Params,
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    config: PipelineConfig,
    *,
    statistics: Sequence[Any] | None = None,
    fishers: Sequence[Any] | None = None,
    grams: Sequence[Any] | None = None,
    key: jax.Array | None = None,
    fixed: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Grid-searches one method on validation and reports the chosen setting on test.

    Returns:
        ``{"method", "hparams", "validation": {task: score, "avg", "norm"}, "test": {...},
        "grid": [{"hparams", "val_norm"}...], "merge_seconds"}`` where ``avg`` is the mean
        task metric and ``norm`` the mean of merged/expert per task.
    """
    m = MERGE_METHODS[method] if isinstance(method, str) else method
    fixed = dict(fixed or {})
    trials = []
    best = None
    merge_s = []
    encs = [e.params["encoder"] for e in experts]
    label = m.name if isinstance(method, MergeMethod) else method
    for hp in tqdm(grid, desc=f"merge {label}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        merged = merge_encoders(
            m,
            base_encoder,
            encs,
            statistics=statistics,
            fishers=fishers,
            grams=grams,
            key=key,
            **fixed,
            **hp,
        )
        jax.block_until_ready(merged)
        merge_s.append(time.perf_counter() - t0)
        val = merged_scores(merged, experts, ttasks, "validation", config)
        norm = normalized_score(val, experts, "validation")
        trials.append({"hparams": dict(hp), "val_norm": norm})
        if best is None or norm > best[0] + 1e-12:
            best = (norm, dict(hp), merged, val)
    assert best is not None
    norm, hp, merged, val = best
    test = merged_scores(merged, experts, ttasks, "test", config)

    def summary(s, split):
        return {
            **s,
            "avg": float(np.mean(list(s.values()))),
            "norm": normalized_score(s, experts, split),
        }

    return {
        "method": label,
        "hparams": {**fixed, **hp},
        "validation": summary(val, "validation"),
        "test": summary(test, "test"),
        "grid": trials,
        "merge_seconds": float(np.median(merge_s)),
    }
