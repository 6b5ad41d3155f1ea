"""Tokenized tasks: a registered task's capped splits, tokenized for MiniLM (cached as ``.npz``).

The task registry and the raw examples live in :mod:`umtam_jax.experiments.data`; this
module turns one registered task into the arrays the training and evaluation stages read
(:class:`TokenizedTask`), keyed on disk by the task's name, version, kind, content and the
config's :meth:`~umtam_jax.experiments.config.PipelineConfig.data_key`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import store
from umtam_jax.experiments._keys import arrays_hash, stable_hash
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.models import minilm_pretrained

__all__ = ["TokenizedTask", "prepare_task"]


@dataclasses.dataclass(frozen=True)
class TokenizedTask:
    """A task with its tokenized splits.

    Attributes:
        name: Task name.
        task: The :class:`~umtam_jax.experiments.data.TaskData`.
        arrays: split -> ``{"input_ids", "attention_mask", "token_type_ids", "labels"}``
            NumPy arrays.
    """

    name: str
    task: data_lib.TaskData
    arrays: dict[str, dict[str, np.ndarray]]

    @property
    def num_labels(self) -> int:
        """The number of classes (the task's label names)."""
        return self.task.num_labels

    def evaluate(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """The task's own metric of some predictions.

        Args:
            y_true: The true labels.
            y_pred: The predicted labels.

        Returns:
            The metric the task names (accuracy, macro-F1 or a registered one).

        Raises:
            KeyError: the task's metric is not registered.
        """
        return self.task.evaluate(y_true, y_pred)


def prepare_task(
    name: str,
    tokenizer: Any,
    config: PipelineConfig,
    *,
    cache_dir: str | Path | None = None,
) -> TokenizedTask:
    """Loads a registered task, caps its splits and tokenizes them (cached as ``.npz``).

    Args:
        name: A registered task name.
        tokenizer: The MiniLM tokenizer (:func:`~umtam_jax.experiments.models.minilm_pretrained.\
load_minilm_tokenizer`).
        config: Sizes (``max_length``, ``max_train``, ``max_eval``, ``max_test``, ``seed``).
        cache_dir: Where to keep the tokenized arrays (None: no cache).

    Returns:
        The :class:`TokenizedTask`.
    """
    limits = {"train": config.max_train, "validation": config.max_eval, "test": config.test_cap}
    caps = {k: v for k, v in limits.items() if v is not None}
    task = data_lib.load_task(name, seed=config.seed, max_per_split=caps or None)
    spec = data_lib.get_task(name)
    path = None
    if cache_dir is not None:
        # Every split's texts and labels enter the key: a re-registered or corrected task
        # is tokenized again.
        content = {
            split: [json.dumps(ex.texts), np.asarray(ex.labels)]
            for split, ex in task.splits.items()
        }
        key = stable_hash([name, spec.version, spec.kind, config.data_key(), arrays_hash(content)])
        path = Path(cache_dir) / f"{name}-{key}.npz"
        cached = store.read_npz(path)  # None: missing or unreadable, tokenized again
        if cached is not None:
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for k, value in cached.items():
                split, field = k.split("/")
                arrays.setdefault(split, {})[field] = value
            return TokenizedTask(name, task, arrays)
    arrays = {}
    for split, ex in task.splits.items():
        if len(ex):
            enc = minilm_pretrained.tokenize_batch(tokenizer, ex.texts, config.max_length)
        else:
            enc = {
                k: np.zeros((0, config.max_length), np.int32)
                for k in ("input_ids", "attention_mask", "token_type_ids")
            }
        enc["labels"] = ex.labels.astype(np.int32)
        arrays[split] = enc
    if path is not None:
        store.write_npz(path, {f"{s}/{f}": v for s, d in arrays.items() for f, v in d.items()})
    return TokenizedTask(name, task, arrays)
