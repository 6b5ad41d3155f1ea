"""Post-hoc data passes: the per-expert inputs that some merge methods need beyond the experts.

Fisher merging needs each expert's diagonal Fisher (:func:`post_hoc_fishers`) and RegMean
each expert encoder's input Gram matrices (:func:`post_hoc_grams`). Both are an extra pass
over each expert's own training examples after training, timed so that their cost can be
reported next to the merge; UMTAM's statistics need no such pass (they come free from
training).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.experts import ExpertResult
from umtam_jax.experiments.models import classifier, minilm
from umtam_jax.experiments.tasks import TokenizedTask

__all__ = ["post_hoc_fishers", "post_hoc_grams"]

Params = dict[str, Any]

#: The model inputs of a tokenized batch (everything but the labels).
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _train_batches(
    arrays: Mapping[str, np.ndarray], num_examples: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """The first ``num_examples`` training examples (rounded down to whole batches when at
    least one batch; else one smaller batch), in batches of ``batch_size``."""
    n = min(num_examples, len(arrays["labels"]))
    n -= n % batch_size if n >= batch_size else 0
    return [
        {k: v[s : s + batch_size] for k, v in arrays.items()}
        for s in range(0, max(n, 1), batch_size)
    ]


def post_hoc_fishers(
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    config: PipelineConfig,
    *,
    num_examples: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[Params], float]:
    """Empirical diagonal Fishers of the experts' encoders on training examples.

    This is the extra data pass that Fisher merging needs (UMTAM's statistics come free
    from training). Per-example squared gradients of the classification loss with the
    true labels over the first ``num_examples`` training examples.

    Args:
        experts: the fine-tuned experts.
        ttasks: the tokenized tasks, by name.
        config: the experiment's configuration.
        num_examples: training examples per expert.
        batch_size: examples per gradient batch.
        progress: show a progress bar.

    Returns:
        ``(fishers, seconds)``: one encoder-shaped Fisher per expert and the wall time.
    """
    from umtam_jax import merging

    def loss(p, b):
        return classifier.classifier_loss(p, b, config=config.config)[0]

    t0 = time.perf_counter()
    out = []
    for e in tqdm(experts, desc="post-hoc Fisher", disable=not progress, leave=False):
        batches = _train_batches(ttasks[e.task].arrays["train"], num_examples, batch_size)
        f = merging.diagonal_fisher(loss, e.params, batches)
        out.append(jax.block_until_ready(f["encoder"]))
    return out, time.perf_counter() - t0


def post_hoc_grams(
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    config: PipelineConfig,
    *,
    num_examples: int = 256,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[Params], float]:
    """Input Gram matrices of every linear layer of the experts' encoders, for RegMean.

    The extra data pass that RegMean needs: each expert's encoder runs on the first
    ``num_examples`` examples of its own task's training split and
    :func:`umtam_jax.merging.input_grams` sums ``XᵀX`` of every ``Dense`` layer's inputs
    over the real tokens (padding masked out with the attention mask). The Grams are sums
    (RegMean's definition), so an expert that saw more tokens weighs more.

    Args:
        experts: The experts (their encoders are used).
        ttasks: The tokenized tasks by name (each expert's training split).
        config: The experiment config (the encoder configuration).
        num_examples: Training examples per expert (whole batches when at least one).
        batch_size: Examples per forward pass.
        progress: Show a progress bar.

    Returns:
        ``(grams, seconds)``: one encoder-shaped tree per expert with the ``(d_in, d_in)``
        Gram at every ``Dense`` kernel and None elsewhere, and the wall time.
    """
    from umtam_jax import merging

    def apply(p, b):
        return minilm.encoder_apply(p, b, config=config.config)

    def mask(b):
        return b["attention_mask"]

    t0 = time.perf_counter()
    out = []
    for e in tqdm(experts, desc="post-hoc Grams", disable=not progress, leave=False):
        tr = ttasks[e.task].arrays["train"]
        batches = [{k: b[k] for k in _INPUTS} for b in _train_batches(tr, num_examples, batch_size)]
        g = merging.input_grams(apply, e.params["encoder"], batches, mask=mask)
        out.append(jax.block_until_ready(g))
    return out, time.perf_counter() - t0
