"""Expert fine-tuning: optimizers, the learning-rate schedule and the training loop.

Every expert starts from the shared pretrained encoder ``w0`` with a fresh head seeded by
``(seed, task name)`` (:func:`init_expert`; a mirror task is seeded by the name of the task
it mirrors, :attr:`~umtam_jax.experiments.data.TaskData.seed_name`); :func:`finetune`
trains encoder and head together with one Optax transform on batches drawn in a seeded
order, either for a fixed number of steps or, with :class:`EarlyStopping`, until the
validation score stops improving (the best checkpoint is kept). Nothing here saves or restores:
:mod:`umtam_jax.experiments.experts` caches the trained experts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from umtam_jax.experiments._keys import seed_for, stable_hash
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.models import classifier, minilm
from umtam_jax.experiments.tasks import TokenizedTask

__all__ = [
    "EarlyStopping",
    "finetune",
    "init_expert",
    "init_opt_state",
    "make_optimizer",
    "optimizer_for",
    "schedule",
]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Train until the validation score stops improving, and keep the best checkpoint.

    The expert is scored on its validation split every ``eval_every`` steps (and after the
    last step); training stops once ``patience`` evaluations in a row failed to beat the
    best score by more than ``min_delta``, or after ``config.steps`` steps (the maximum;
    the learning-rate schedule decays over it). The parameters and optimizer state
    (hence the UMTAM statistics) of the best evaluation are returned.

    Attributes:
        eval_every: Steps between validation evaluations.
        patience: Evaluations without improvement before stopping.
        min_delta: The improvement an evaluation must exceed to count.

    Example:
        >>> from umtam_jax.experiments import EarlyStopping
        >>> EarlyStopping(eval_every=25, patience=3).key()
        {'eval_every': 25, 'patience': 3, 'min_delta': 0.0}
    """

    eval_every: int = 50
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.eval_every < 1 or self.patience < 1 or self.min_delta < 0:
            raise ValueError(f"invalid early stopping settings: {self}")

    def key(self) -> dict[str, Any]:
        """The settings as a dict (part of an expert's cache key)."""
        return dataclasses.asdict(self)


def make_optimizer(
    name: str = "umtam", learning_rate: float | optax.Schedule = 1e-4, **kwargs: Any
) -> optax.GradientTransformation:
    """Builds an optimizer by name.

    Args:
        name: ``"umtam"`` (:func:`umtam_jax.umtam`), ``"adamw"`` or ``"sgd"`` (Optax's).
        learning_rate: a constant or an Optax schedule.
        **kwargs: the constructor's other keyword arguments.

    Returns:
        The Optax transformation.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> import jax.numpy as jnp
        >>> from umtam_jax.experiments import make_optimizer
        >>> tx = make_optimizer("umtam", 1e-3, rank=2)
        >>> state = tx.init({"w": jnp.zeros((4, 3))})
    """
    if name == "umtam":
        import umtam_jax

        return umtam_jax.umtam(learning_rate, **kwargs)
    if name == "adamw":
        return optax.adamw(learning_rate, **kwargs)
    if name == "sgd":
        return optax.sgd(learning_rate, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; use 'umtam', 'adamw' or 'sgd'")


def schedule(config: PipelineConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` then linear decay to 0 over ``steps``.

    Args:
        config: The experiment's learning rate, steps and warm-up fraction.

    Returns:
        The Optax schedule (at least one warm-up step).

    Example:
      >>> from umtam_jax.experiments.config import PipelineConfig
      >>> from umtam_jax.experiments.training import schedule
      >>> lr = schedule(PipelineConfig(steps=10, learning_rate=1e-3, warmup_fraction=0.2))
      >>> [round(float(lr(step)), 6) for step in (0, 1, 2, 6, 10)]
      [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    warm = max(1, int(config.warmup_fraction * config.steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warm),
            optax.linear_schedule(config.learning_rate, 0.0, max(1, config.steps - warm)),
        ],
        [warm],
    )


#: How many optimizers, and compiled steps of each kind, are kept (every compiled step
#: holds executables; a long process trying many settings would otherwise keep them all).
_KEPT = 8
_TX_CACHE: collections.OrderedDict[str, optax.GradientTransformation] = collections.OrderedDict()


def optimizer_for(
    name: str, config: PipelineConfig, kwargs: Mapping[str, Any]
) -> optax.GradientTransformation:
    """The optimizer ``name`` on :func:`schedule`, one object per setting (the last few
    settings are kept).

    Same optimizer settings -> same transform object -> one compiled step for all tasks.

    Args:
        name: as :func:`make_optimizer`.
        config: the experiment's configuration (learning rate, steps, warm-up).
        kwargs: the optimizer's other keyword arguments.

    Returns:
        The Optax transformation, shared by every call with the same settings.

    Example:
      >>> from umtam_jax.experiments.config import PipelineConfig
      >>> from umtam_jax.experiments.training import optimizer_for
      >>> config = PipelineConfig(steps=10)
      >>> optimizer_for("adamw", config, {}) is optimizer_for("adamw", config, {})
      True
    """
    key = stable_hash([name, config.learning_rate, config.steps, config.warmup_fraction, kwargs])
    if key in _TX_CACHE:
        _TX_CACHE.move_to_end(key)  # the most recently used setting
    else:
        if len(_TX_CACHE) >= _KEPT:
            _TX_CACHE.popitem(last=False)  # the least recently used one
        _TX_CACHE[key] = make_optimizer(name, schedule(config), **kwargs)
    return _TX_CACHE[key]


@functools.lru_cache(maxsize=_KEPT)
def _grad_fn(config: minilm.BertConfig) -> Callable:
    """The jitted loss and gradient of a classifier (one per model configuration, whatever
    the optimizer)."""

    @jax.jit
    def grad_fn(params, batch, dropout_rng):
        (loss, _), grads = jax.value_and_grad(classifier.classifier_loss, has_aux=True)(
            params, batch, config=config, dropout_rng=dropout_rng
        )
        return loss, grads

    return grad_fn


@functools.lru_cache(maxsize=_KEPT)
def _update_fn(tx: optax.GradientTransformation) -> Callable:
    """The jitted update and ``apply_updates`` of ``tx`` (one per transform object)."""

    @jax.jit
    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return update


def _train_step(
    tx: optax.GradientTransformation, config: minilm.BertConfig, train_head: bool = True
) -> Callable:
    """``step(params, opt_state, batch, dropout_rng) -> (params, opt_state, loss)``.

    The gradient (which depends on the task's number of labels) and the optimizer update
    of the encoder (which does not) are compiled separately, so the expensive encoder
    update compiles once for all tasks and the gradient once for all optimizers;
    ``opt_state`` is ``{"encoder": ..., "head": ...}``, the transform applied to each part.
    For per-leaf transforms (UMTAM, AdamW, SGD) this is the same as one update of the whole
    tree; a global-norm clip would act per part. Without ``train_head`` the head and its
    state are returned unchanged.
    """
    grad_fn, update = _grad_fn(config), _update_fn(tx)

    def step(params, opt_state, batch, dropout_rng=None):
        loss, grads = grad_fn(params, batch, dropout_rng)
        new_params, new_state = dict(params), dict(opt_state)
        for part in ("encoder", "head") if train_head else ("encoder",):
            new_params[part], new_state[part] = update(grads[part], opt_state[part], params[part])
        return new_params, new_state, loss

    return step


def init_opt_state(tx: optax.GradientTransformation, params: Params) -> dict[str, Any]:
    """The optimizer state of :func:`_train_step`: one state per part.

    Args:
        tx: the optimizer.
        params: classifier parameters ``{"encoder": ..., "head": ...}``.

    Returns:
        ``{"encoder": state, "head": state}``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from umtam_jax.experiments.training import init_opt_state
      >>> params = {"encoder": {"w": jnp.zeros(3)}, "head": {"b": jnp.zeros(2)}}
      >>> sorted(init_opt_state(optax.sgd(0.1), params))
      ['encoder', 'head']
    """
    return {part: tx.init(params[part]) for part in ("encoder", "head")}


def init_expert(
    base_encoder: Params, num_labels: int, config: PipelineConfig, seed_name: str
) -> Params:
    """The shared pretrained encoder with a fresh head seeded by ``(config.seed, seed_name)``.

    Args:
        base_encoder: the pretrained encoder (shared, not copied).
        num_labels: the task's number of classes.
        config: the experiment's configuration.
        seed_name: a task's :attr:`~umtam_jax.experiments.data.TaskData.seed_name` (its
            own name unless it is a mirror task).

    Returns:
        Classifier parameters ``{"encoder": base_encoder, "head": ...}``.
    """
    key = jax.random.key(seed_for(config.seed, "head", seed_name))
    return classifier.init_classifier(key, num_labels, base_encoder, config=config.config)


def finetune(
    ttask: TokenizedTask,
    base_encoder: Params,
    tx: optax.GradientTransformation,
    config: PipelineConfig,
    *,
    progress: bool = True,
    early_stopping: EarlyStopping | None = None,
    validate: Callable[[Params], float] | None = None,
) -> tuple[Params, Any, dict[str, Any]]:
    """Fine-tunes encoder + a fresh head on ``ttask``'s training split (the head stays at
    its initialization when ``config.train_head`` is False).

    Batches are drawn epoch by epoch in an order fixed by ``(config.seed, seed name)``
    (the task's :attr:`~umtam_jax.experiments.data.TaskData.seed_name`);
    the result is deterministic for a seed. Without ``early_stopping`` it runs
    ``config.steps`` steps and returns the last parameters; with it, at most
    ``config.steps`` steps, stopping when the validation score stops improving, and
    returns the parameters and optimizer state of the best validation score.

    Args:
        ttask: The tokenized task.
        base_encoder: The shared pretrained encoder.
        tx: The optimizer.
        config: Training config.
        progress: Show a progress bar.
        early_stopping: Early stopping settings, or None (fixed number of steps).
        validate: ``validate(params) -> score`` (higher is better) for early stopping;
            by default the task metric on the validation split.

    Returns:
        ``(params, opt_state, info)`` with ``info["losses"]`` and ``info["seconds"]``;
        with early stopping also ``"best_step"``, ``"stopped_step"``, ``"stopped_early"``
        and ``"validation_history"`` (``[step, score]`` pairs).
    """
    train = ttask.arrays["train"]
    n = len(train["labels"])
    if n == 0:
        raise ValueError(f"task {ttask.name!r} has no training examples")
    params = init_expert(base_encoder, ttask.num_labels, config, ttask.task.seed_name)
    opt_state = init_opt_state(tx, params)
    step = _train_step(tx, config.config, config.train_head)
    rng = np.random.default_rng(seed_for(config.seed, "batches", ttask.task.seed_name))
    drop_key = jax.random.key(seed_for(config.seed, "dropout", ttask.task.seed_name))
    bs = config.batch_size
    order = np.zeros(0, np.int64)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train {ttask.name}", disable=not progress, leave=False)
    stopper = _Stopper(early_stopping, ttask, config, validate) if early_stopping else None
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
        if stopper is not None and stopper.update(i + 1, params, opt_state):
            break
    info: dict[str, Any] = {"losses": losses}
    if stopper is not None:
        params, opt_state = stopper.best_params, stopper.best_state
        info.update(stopper.info())
    jax.block_until_ready(params)
    return params, opt_state, {**info, "seconds": time.perf_counter() - t0}


class _Stopper:
    """The early-stopping state of :func:`finetune`: the best checkpoint and its score."""

    def __init__(
        self,
        settings: EarlyStopping,
        ttask: TokenizedTask,
        config: PipelineConfig,
        validate: Callable[[Params], float] | None,
    ) -> None:
        if validate is None:
            from umtam_jax.experiments.evaluation import evaluate_params

            def validate(p: Params) -> float:
                return evaluate_params(p, ttask, "validation", config)

        self.settings, self.validate, self.last_step = settings, validate, config.steps
        self.history: list[list[float]] = []
        self.best_score, self.best_step, self.bad = -np.inf, 0, 0
        self.best_params: Params = {}
        self.best_state: Any = None
        self.stopped = False

    def update(self, step: int, params: Params, opt_state: Any) -> bool:
        """Scores ``params`` when due; True when training should stop."""
        if step % self.settings.eval_every and step != self.last_step:
            return False
        score = float(self.validate(params))
        self.history.append([step, score])
        if not self.best_params or score > self.best_score + self.settings.min_delta:
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_params, self.best_state = params, opt_state  # immutable arrays
        else:
            self.bad += 1
        self.stopped = self.bad >= self.settings.patience and step != self.last_step
        return self.stopped

    def info(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_validation": self.best_score,
            "stopped_step": int(self.history[-1][0]),
            "stopped_early": self.stopped,
            "validation_history": self.history,
            "early_stopping": self.settings.key(),
        }
