"""Evaluation: predictions and task metrics of a model, and of a merged encoder per task.

:func:`evaluate_params` scores one model (encoder + head) on one split with the task's own
metric; :func:`merged_scores` scores a merged encoder under every expert's own head and
:func:`normalized_score` averages those scores relative to the experts' (merged / expert).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.models import classifier, minilm
from umtam_jax.experiments.tasks import TokenizedTask

if TYPE_CHECKING:
    from umtam_jax.experiments.experts import ExpertResult

__all__ = ["evaluate_params", "merged_scores", "normalized_score", "predict"]

Params = dict[str, Any]

_PREDICT_CACHE: dict[Any, Callable] = {}


def _predict_fn(config: minilm.BertConfig) -> Callable:
    if config not in _PREDICT_CACHE:

        @jax.jit
        def f(params, batch):
            return jnp.argmax(classifier.classifier_apply(params, batch, config=config), -1)

        _PREDICT_CACHE[config] = f
    return _PREDICT_CACHE[config]


def predict(
    params: Params,
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int = 50,
    config: minilm.BertConfig = minilm.MINILM_L6,
) -> np.ndarray:
    """Predicted labels, with a jitted forward pass over fixed-size (padded) batches.

    Args:
        params: classifier parameters ``{"encoder": ..., "head": ...}``.
        arrays: a split's arrays: ``input_ids``, ``attention_mask`` and
            ``token_type_ids`` of shape ``(n, length)``, and ``labels`` (only its length
            is read).
        batch_size: the examples per forward pass; the last batch is padded to it, so
            one compiled program serves every batch.
        config: the encoder's architecture.

    Returns:
        The arg-max class of each example, an integer array of shape ``(n,)``.
    """
    n = len(arrays["labels"])
    f = _predict_fn(config)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    out = []
    for s in range(0, n, batch_size):
        batch = {k: arrays[k][s : s + batch_size] for k in keys}
        m = len(batch["input_ids"])
        if m < batch_size:
            batch = {k: np.pad(v, ((0, batch_size - m), (0, 0))) for k, v in batch.items()}
        out.append(np.asarray(f(params, batch))[:m])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def evaluate_params(
    params: Params, ttask: TokenizedTask, split: str, config: PipelineConfig
) -> float:
    """The task metric of ``params`` (encoder + head) on one split.

    Args:
        params: classifier parameters ``{"encoder": ..., "head": ...}``.
        ttask: the tokenized task.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        config: the experiment's configuration (model and evaluation batch size).

    Returns:
        The task's metric (accuracy, or its own) on the split.
    """
    arrays = ttask.arrays[split]
    y = predict(params, arrays, batch_size=config.eval_batch_size, config=config.config)
    return float(ttask.evaluate(arrays["labels"], y))


def merged_scores(
    merged_encoder: Params,
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    split: str,
    config: PipelineConfig,
) -> dict[str, float]:
    """The task metric of ``merged_encoder`` under each expert's own head, by task.

    Args:
        merged_encoder: the merged encoder's parameters.
        experts: the fine-tuned experts, whose heads are reused.
        ttasks: the tokenized tasks, by name.
        split: the split evaluated.
        config: the experiment's configuration.

    Returns:
        The metric per task name.
    """
    return {
        e.task: evaluate_params(
            {"encoder": merged_encoder, "head": e.params["head"]}, ttasks[e.task], split, config
        )
        for e in experts
    }


def normalized_score(
    scores: Mapping[str, float], experts: Sequence[ExpertResult], split: str
) -> float:
    """The mean over tasks of ``scores[task] / expert score`` on ``split``.

    Args:
        scores: the merged model's metric per task (:func:`merged_scores`).
        experts: the experts, whose own scores on ``split`` normalize.
        split: the split of the scores.

    Returns:
        The normalized average: 1.0 matches every expert on its own task.

    Example:
      >>> from types import SimpleNamespace
      >>> from umtam_jax.experiments.evaluation import normalized_score
      >>> experts = [SimpleNamespace(task="a", scores={"test": 0.8}),
      ...            SimpleNamespace(task="b", scores={"test": 0.5})]
      >>> round(normalized_score({"a": 0.6, "b": 0.5}, experts, "test"), 3)  # (0.75 + 1) / 2
      0.875
    """
    vals = [scores[e.task] / max(e.scores[split], 1e-12) for e in experts]
    return float(np.mean(vals))
