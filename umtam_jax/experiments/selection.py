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

from umtam_jax.experiments import intervals
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.evaluation import merged_scores, normalized_score, predict
from umtam_jax.experiments.experts import ExpertResult
from umtam_jax.experiments.merge import MERGE_METHODS, MergeMethod, merge_encoders
from umtam_jax.experiments.tasks import TokenizedTask

__all__ = ["select_on_validation"]

Params = dict[str, Any]


def _test_scores(
    merged: Params,
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    config: PipelineConfig,
    samples: int,
) -> tuple[dict[str, float], intervals.Interval, dict[str, list[int]]]:
    """Test scores by task, the interval of their normalized mean, the predictions."""
    preds, labels, metrics = {}, {}, {}
    for e in experts:
        tt = ttasks[e.task]
        arrays = tt.arrays["test"]
        params = {"encoder": merged, "head": e.params["head"]}
        preds[e.task] = predict(params, arrays, batch_size=config.eval_batch_size,
                                config=config.config)  # fmt: skip
        labels[e.task], metrics[e.task] = arrays["labels"], tt.evaluate
    scores = {t: float(metrics[t](labels[t], p)) for t, p in preds.items()}
    norm = [{e.task: max(e.scores["test"], 1e-12) for e in experts}]
    interval = intervals.score_interval(
        metrics, [labels], [preds], normalizers=norm, samples=samples
    )
    return scores, interval, {t: np.asarray(p).tolist() for t, p in preds.items()}


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
    samples: int = 1000,
) -> dict[str, Any]:
    """Grid-searches one method on validation and reports the chosen setting on test.

    Each setting of ``grid`` is merged by
    :func:`~umtam_jax.experiments.merge.merge_encoders` and scored on the validation
    split; the setting of highest validation ``norm`` is then scored once on test.

    Args:
        method: A key of :data:`~umtam_jax.experiments.merge.MERGE_METHODS` (the
            result's ``"method"`` is then that key) or a
            :class:`~umtam_jax.experiments.merge.MergeMethod` (its ``name`` is).
        grid: The settings tried, in order, at least one: each a mapping of the method's
            keyword arguments, which override its experiment defaults
            (``MergeMethod.defaults``). A setting replaces the best so far only when its
            validation ``norm`` is higher by more than 1e-12, so a tie goes to the
            earlier setting.
        base_encoder: The shared pretrained encoder's parameters, the merge's base.
        experts: The fine-tuned experts: their encoders are merged, and the merged encoder
            is scored on each expert's task under that expert's head, normalized by the
            expert's own score on the split.
        ttasks: The tokenized tasks by name, each expert's with its ``"validation"`` and
            ``"test"`` splits.
        config: The experiment's configuration (its encoder ``config`` and
            ``eval_batch_size``).
        statistics: The experts' encoder UMTAM statistics, for the methods that read them
            (UMTAM, OTA); the other methods ignore them.
        fishers: The experts' encoder Fishers, for Fisher merging; ignored otherwise.
        grams: The experts' encoder input Gram matrices, for RegMean; ignored otherwise.
        key: The PRNG key of the methods that draw at random (DARE, DARE-TIES), the same
            for every setting; None: ``jax.random.key(0)``. Ignored by the other methods.
        fixed: Keyword arguments given to every setting, and reported with the chosen
            one in ``"hparams"``; none of them may also be in a setting of ``grid`` (a
            TypeError).
        progress: Show a progress bar over the settings.
        samples: Bootstrap replicates of the test interval.

    Returns:
        ``{"method", "hparams", "validation": {task: score, "avg", "norm"}, "test": {...},
        "test_interval", "test_predictions", "grid": [{"hparams", "val_norm"}...],
        "merge_seconds"}`` where ``avg`` is the mean task metric, ``norm`` the mean of
        merged/expert per task, ``test_interval`` the 95 % bootstrap interval of the test
        ``norm`` over test examples (one seed: the noise of the test sample only; with
        ``per_seed``, its one value) and
        ``test_predictions`` the predicted labels by task.

    Raises:
        ValueError: the method needs statistics, Fishers or Gram matrices that were not
            given.
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
    test, interval, predictions = _test_scores(merged, experts, ttasks, config, samples)

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
        "test_interval": interval.as_dict(),
        "test_predictions": predictions,
        "grid": trials,
        "merge_seconds": float(np.median(merge_s)),
    }
