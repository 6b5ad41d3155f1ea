"""Expert fine-tuning: optimizers, the learning-rate schedule and the training loop.

Every expert starts from the shared pretrained encoder ``w0`` with a fresh head seeded by
``(seed, task name)`` (:func:`init_expert`); :func:`finetune` trains encoder and head
together with one Optax transform on batches drawn in a seeded order. Nothing here saves
or restores: :mod:`umtam_jax.experiments.experts` caches the trained experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from umtam_jax.experiments._keys import seed_for, stable_hash
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.models import minilm
from umtam_jax.experiments.tasks import TokenizedTask

__all__ = [
    "finetune",
    "init_expert",
    "init_opt_state",
    "make_optimizer",
    "optimizer_for",
    "schedule",
]

Params = dict[str, Any]


def make_optimizer(
    name: str = "umtam", learning_rate: float | optax.Schedule = 1e-4, **kwargs: Any
) -> optax.GradientTransformation:
    """Builds an optimizer by name: ``"umtam"`` (kwargs go to :func:`umtam_jax.umtam`),
    ``"adamw"``, ``"sgd"`` (kwargs go to the Optax constructor)."""
    if name == "umtam":
        import umtam_jax

        return umtam_jax.umtam(learning_rate, **kwargs)
    if name == "adamw":
        return optax.adamw(learning_rate, **kwargs)
    if name == "sgd":
        return optax.sgd(learning_rate, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; use 'umtam', 'adamw' or 'sgd'")


def schedule(config: PipelineConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` then linear decay to 0 over ``steps``."""
    warm = max(1, int(config.warmup_fraction * config.steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warm),
            optax.linear_schedule(config.learning_rate, 0.0, max(1, config.steps - warm)),
        ],
        [warm],
    )


_TX_CACHE: dict[str, optax.GradientTransformation] = {}


def optimizer_for(
    name: str, config: PipelineConfig, kwargs: Mapping[str, Any]
) -> optax.GradientTransformation:
    """The optimizer ``name`` on :func:`schedule`, one object per setting.

    Same optimizer settings -> same transform object -> one compiled step for all tasks.
    """
    key = stable_hash([name, config.learning_rate, config.steps, config.warmup_fraction, kwargs])
    if key not in _TX_CACHE:
        _TX_CACHE[key] = make_optimizer(name, schedule(config), **kwargs)
    return _TX_CACHE[key]


_STEP_CACHE: dict[Any, Callable] = {}


def _train_step(tx: optax.GradientTransformation, config: minilm.BertConfig) -> Callable:
    """``step(params, opt_state, batch, dropout_rng) -> (params, opt_state, loss)``.

    The gradient (which depends on the task's number of labels) and the optimizer update
    of the encoder (which does not) are compiled separately, so the expensive encoder
    update compiles once for all tasks; ``opt_state`` is ``{"encoder": ..., "head": ...}``,
    the transform applied to each part. For per-leaf transforms (UMTAM, AdamW, SGD) this is
    the same as one update of the whole tree; a global-norm clip would act per part.
    """
    key = (id(tx), config)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]

    @jax.jit
    def grad_fn(params, batch, dropout_rng):
        (loss, _), grads = jax.value_and_grad(minilm.classifier_loss, has_aux=True)(
            params, batch, config=config, dropout_rng=dropout_rng
        )
        return loss, grads

    @jax.jit
    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def step(params, opt_state, batch, dropout_rng=None):
        loss, grads = grad_fn(params, batch, dropout_rng)
        new_params, new_state = {}, {}
        for part in ("encoder", "head"):
            new_params[part], new_state[part] = update(grads[part], opt_state[part], params[part])
        return new_params, new_state, loss

    _STEP_CACHE[key] = step
    return step


def init_opt_state(tx: optax.GradientTransformation, params: Params) -> dict[str, Any]:
    """The optimizer state of :func:`_train_step`: one state per part."""
    return {part: tx.init(params[part]) for part in ("encoder", "head")}


def init_expert(
    base_encoder: Params, num_labels: int, config: PipelineConfig, task_name: str
) -> Params:
    """The shared pretrained encoder with a fresh head seeded by ``(seed, task name)``."""
    key = jax.random.key(seed_for(config.seed, "head", task_name))
    return minilm.init_classifier(key, num_labels, base_encoder, config=config.config)


def finetune(
    ttask: TokenizedTask,
    base_encoder: Params,
    tx: optax.GradientTransformation,
    config: PipelineConfig,
    *,
    progress: bool = True,
) -> tuple[Params, Any, dict[str, Any]]:
    """Fine-tunes encoder + a fresh head on ``ttask``'s training split.

    Batches are drawn epoch by epoch in an order fixed by ``(config.seed, task name)``;
    the result is deterministic for a seed.

    Returns:
        ``(params, opt_state, info)`` with ``info["losses"]`` and ``info["seconds"]``.
    """
    train = ttask.arrays["train"]
    n = len(train["labels"])
    if n == 0:
        raise ValueError(f"task {ttask.name!r} has no training examples")
    params = init_expert(base_encoder, ttask.num_labels, config, ttask.name)
    opt_state = init_opt_state(tx, params)
    step = _train_step(tx, config.config)
    rng = np.random.default_rng(seed_for(config.seed, "batches", ttask.name))
    drop_key = jax.random.key(seed_for(config.seed, "dropout", ttask.name))
    bs = config.batch_size
    order = np.zeros(0, np.int64)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train {ttask.name}", disable=not progress, leave=False)
    for i in bar:
        if order.size < bs:
            order = np.concatenate([order, *[rng.permutation(n) for _ in range(-(-bs // n))]])
        idx, order = order[:bs], order[bs:]
        batch = {k: v[idx] for k, v in train.items()}
        rng_i = jax.random.fold_in(drop_key, i) if config.dropout else None
        params, opt_state, loss = step(params, opt_state, batch, rng_i)
        if i % 10 == 0 or i == config.steps - 1:
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    jax.block_until_ready(params)
    return params, opt_state, {"losses": losses, "seconds": time.perf_counter() - t0}
