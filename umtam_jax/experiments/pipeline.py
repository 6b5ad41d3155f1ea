"""Fine-tune → checkpoint → merge → evaluate pipeline for MiniLM experts on registered tasks.

Driven entirely by the task registry (:mod:`umtam_jax.experiments.data`): any task name
from :func:`~umtam_jax.experiments.data.available_tasks`, including one registered at run
time, goes through the same steps. Nothing here names a task except as a default.

Protocol (the standard multi-task merging setup, e.g. TIES / DARE / UMTAM):

1. Every expert starts from the same pretrained MiniLM encoder ``w0`` and gets a fresh,
   task-specific classification head (seeded from ``(seed, task name)``); encoder and head
   are fine-tuned together with one Optax transform (UMTAM by default, statistics kept).
2. Each expert is saved as an Orbax checkpoint (parameters, UMTAM statistics, metadata
   with the training config and the expert's validation/test scores) and reused when a
   checkpoint with the same fingerprint already exists.
3. Only the *encoders* are merged (task vectors ``w_τ − w0`` of the encoder); each task
   keeps its own fine-tuned head on top of the merged encoder.
4. Per method, merge hyper-parameters (density, scaling, ...) are chosen from a small grid
   by the mean *normalized* validation score over tasks (merged / expert, both on the
   validation split); the chosen setting is then reported on the test split. Every method
   gets the same treatment; nothing is tuned on test.

The public entry points are :func:`prepare_task`, :func:`train_expert`,
:func:`evaluate_params`, :func:`merge_encoders` and :func:`run_merging`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments.models import minilm

__all__ = [
    "DEFAULT_TASKS",
    "MERGE_METHODS",
    "ExpertResult",
    "MergeMethod",
    "PipelineConfig",
    "TokenizedTask",
    "default_grids",
    "evaluate_params",
    "finetune",
    "make_optimizer",
    "merge_encoders",
    "post_hoc_fishers",
    "predict",
    "prepare_task",
    "run_merging",
    "select_on_validation",
    "format_table",
    "train_expert",
    "tree_bytes",
]

#: Default task set of the demo and benchmarks (any registered names work).
DEFAULT_TASKS = ("wn_defmatch", "kjv_section", "fortune_topic", "wn_supersense")

Params = dict[str, Any]


# ---------------------------------------------------------------------------
# Configuration and data
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Sizes and training settings of an experiment.

    Attributes:
        max_length: Tokens per example (pairs: both texts together).
        batch_size: Training batch size.
        steps: Fine-tuning steps per expert.
        learning_rate: Peak learning rate (linear warm-up, then linear decay to 0).
        warmup_fraction: Fraction of the steps spent warming up.
        max_train: Cap on the training examples per task (stratified), None: all.
        max_eval: Cap on the validation and test examples per task, None: all.
        eval_batch_size: Batch size of the jitted forward pass in evaluation.
        dropout: Train with dropout (MiniLM's 0.1); off by default (faster on CPU).
        seed: Seed of data splits, head init, batch order and random merges.
        config: Encoder configuration (the pretrained MiniLM-L6 by default).
    """

    max_length: int = 48
    batch_size: int = 32
    steps: int = 100
    learning_rate: float = 1e-4
    warmup_fraction: float = 0.1
    max_train: int | None = 4096
    max_eval: int | None = 200
    eval_batch_size: int = 50
    dropout: bool = False
    seed: int = 0
    config: minilm.BertConfig = minilm.MINILM_L6

    def data_key(self) -> dict[str, Any]:
        """The fields that change the tokenized data."""
        return {
            "max_length": self.max_length,
            "max_train": self.max_train,
            "max_eval": self.max_eval,
            "seed": self.seed,
        }

    def training_key(self) -> dict[str, Any]:
        """The fields that change a trained expert (part of its checkpoint fingerprint)."""
        return {
            **self.data_key(),
            "batch_size": self.batch_size,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "warmup_fraction": self.warmup_fraction,
            "dropout": self.dropout,
            "config": dataclasses.asdict(self.config),
        }


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
        return self.task.num_labels

    def evaluate(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """The task's own metric."""
        return self.task.evaluate(y_true, y_pred)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        tokenizer: The MiniLM tokenizer (:func:`~umtam_jax.experiments.models.minilm.\
load_minilm_tokenizer`).
        config: Sizes (``max_length``, ``max_train``, ``max_eval``, ``seed``).
        cache_dir: Where to keep the tokenized arrays (None: no cache).

    Returns:
        The :class:`TokenizedTask`.
    """
    caps = {"train": config.max_train, "validation": config.max_eval, "test": config.max_eval}
    caps = {k: v for k, v in caps.items() if v is not None}
    task = data_lib.load_task(name, seed=config.seed, max_per_split=caps or None)
    spec = data_lib.get_task(name)
    path = None
    if cache_dir is not None:
        # The task's content enters the key, so a re-registered task is re-tokenized.
        digest = zlib.crc32(
            json.dumps([task.validation.texts[:50], task.train.texts[:50]], default=str).encode()
        )
        key = _hash([name, spec.version, spec.kind, config.data_key(), digest, len(task.train)])
        path = Path(cache_dir) / f"{name}-{key}.npz"
        if path.exists():
            with np.load(path) as z:
                arrays: dict[str, dict[str, np.ndarray]] = {}
                for k in z.files:
                    split, field = k.split("/")
                    arrays.setdefault(split, {})[field] = z[k]
            return TokenizedTask(name, task, arrays)
    arrays = {}
    for split, ex in task.splits.items():
        if len(ex):
            enc = minilm.tokenize_batch(tokenizer, ex.texts, config.max_length)
        else:
            enc = {
                k: np.zeros((0, config.max_length), np.int32)
                for k in ("input_ids", "attention_mask", "token_type_ids")
            }
        enc["labels"] = ex.labels.astype(np.int32)
        arrays[split] = enc
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{s}/{f}": v for s, d in arrays.items() for f, v in d.items()}
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **flat)
        tmp.replace(path)
    return TokenizedTask(name, task, arrays)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


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


def _seed_for(seed: int, *salt: str) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(salt).encode())) % (2**31)


def init_expert(
    base_encoder: Params, num_labels: int, config: PipelineConfig, task_name: str
) -> Params:
    """The shared pretrained encoder with a fresh head seeded by ``(seed, task name)``."""
    key = jax.random.key(_seed_for(config.seed, "head", task_name))
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
    rng = np.random.default_rng(_seed_for(config.seed, "batches", ttask.name))
    drop_key = jax.random.key(_seed_for(config.seed, "dropout", ttask.name))
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


_PREDICT_CACHE: dict[Any, Callable] = {}


def _predict_fn(config: minilm.BertConfig) -> Callable:
    if config not in _PREDICT_CACHE:

        @jax.jit
        def f(params, batch):
            return jnp.argmax(minilm.classifier_apply(params, batch, config=config), -1)

        _PREDICT_CACHE[config] = f
    return _PREDICT_CACHE[config]


def predict(
    params: Params,
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int = 50,
    config: minilm.BertConfig = minilm.MINILM_L6,
) -> np.ndarray:
    """Predicted labels, with a jitted forward pass over fixed-size (padded) batches."""
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
    """The task metric of ``params`` (encoder + head) on one split."""
    arrays = ttask.arrays[split]
    y = predict(params, arrays, batch_size=config.eval_batch_size, config=config.config)
    return float(ttask.evaluate(arrays["labels"], y))


# ---------------------------------------------------------------------------
# Experts (train or restore)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ExpertResult:
    """A fine-tuned expert.

    Attributes:
        task: Task name.
        path: Its checkpoint directory.
        params: ``{"encoder", "head"}``.
        statistics: UMTAM statistics (same tree as params), or None (non-UMTAM optimizer).
        scores: ``{"validation": ..., "test": ...}`` (the task metric).
        info: Training info (seconds, losses, optimizer, whether it was restored).
    """

    task: str
    path: Path
    params: Params
    statistics: Any
    scores: dict[str, float]
    info: dict[str, Any]


def train_expert(
    ttask: TokenizedTask,
    base_encoder: Params,
    config: PipelineConfig,
    workdir: str | Path,
    *,
    optimizer: str = "umtam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    tag: str = "",
    progress: bool = True,
    save_opt_state: bool = False,
) -> ExpertResult:
    """Fine-tunes (or restores) the expert of one task and saves it with its statistics.

    The checkpoint lives in ``workdir/experts/<task>-<tag>-<fingerprint>``; the
    fingerprint covers the training config, the optimizer and its kwargs, so a cached
    expert is reused only when it was trained the same way.

    Args:
        ttask: The tokenized task.
        base_encoder: The shared pretrained encoder ``w0``.
        config: Training config.
        workdir: Work directory holding the checkpoints.
        optimizer: ``"umtam"`` (default), ``"adamw"`` or ``"sgd"``.
        optimizer_kwargs: Extra optimizer arguments (e.g. ``{"rank": 16}``).
        tag: Free label in the directory name (e.g. ``"lean"``).
        progress: Show a progress bar.
        save_opt_state: Also save the full optimizer state (for resuming).

    Returns:
        The :class:`ExpertResult`.
    """
    from umtam_jax import checkpoint

    kwargs = dict(optimizer_kwargs or {})
    fp = _hash(
        {
            "task": ttask.name,
            "train": config.training_key(),
            "optimizer": optimizer,
            "kwargs": kwargs,
            "n": {s: len(a["labels"]) for s, a in ttask.arrays.items()},
        }
    )
    name = "-".join(p for p in (ttask.name, tag, fp) if p)
    path = Path(workdir).absolute() / "experts" / name
    if path.exists():
        try:
            ck = checkpoint.restore_checkpoint(path)
            user = ck.metadata["user"]
            if user.get("fingerprint") == fp:
                params = jax.tree.map(jnp.asarray, ck.params)
                return ExpertResult(
                    ttask.name,
                    path,
                    params,
                    ck.statistics,
                    user["scores"],
                    {**user["info"], "restored": True},
                )
        except (FileNotFoundError, ValueError, KeyError):
            pass  # incomplete or foreign: retrain and overwrite
    tx = _optimizer_for(optimizer, config, kwargs)
    params, opt_state, info = finetune(ttask, base_encoder, tx, config, progress=progress)
    scores = {s: evaluate_params(params, ttask, s, config) for s in ("validation", "test")}
    info = {**info, "optimizer": optimizer, "optimizer_kwargs": kwargs, "restored": False}
    stats = None
    if optimizer == "umtam":
        import umtam_jax

        stats = {part: umtam_jax.statistics(opt_state[part]) for part in opt_state}
    meta = {"fingerprint": fp, "task": ttask.name, "scores": scores, "info": info}
    checkpoint.save_checkpoint(
        path,
        params,
        opt_state=opt_state if save_opt_state else None,
        statistics=stats,
        overwrite=True,
        metadata=meta,
    )
    if stats is not None:  # what a later run restores (keeps reruns bit-identical)
        stats = checkpoint.restore_statistics(path)
    return ExpertResult(ttask.name, path, params, stats, scores, info)


_TX_CACHE: dict[str, optax.GradientTransformation] = {}


def _optimizer_for(name: str, config: PipelineConfig, kwargs: Mapping[str, Any]):
    # Same optimizer settings -> same transform object -> one compiled step for all tasks.
    key = _hash([name, config.learning_rate, config.steps, config.warmup_fraction, kwargs])
    if key not in _TX_CACHE:
        _TX_CACHE[key] = make_optimizer(name, schedule(config), **kwargs)
    return _TX_CACHE[key]


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A method of :data:`umtam_jax.merging.METHODS` as the experiments run it.

    Attributes:
        name: Display name.
        method: The registry key.
        defaults: Experiment defaults for parameters the registry requires (``density``)
            or sets otherwise; ``scaling=None`` means ``1/K``.
    """

    name: str
    method: str
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def needs(self) -> str:
        """``"statistics"``, ``"fisher"`` or ``""``: the per-expert input besides the experts."""
        from umtam_jax import merging

        extra = merging.METHODS[self.method].extra
        return {"statistics": "statistics", "curvatures": "statistics", "fishers": "fisher"}.get(
            extra, ""
        )


#: Merge methods by key (display name in ``.name``).
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod("Linear (TA 1/K)", "task_arithmetic", {"scaling": None}),
    "task_arithmetic": MergeMethod("Task arithmetic", "task_arithmetic"),
    "ties": MergeMethod("TIES", "ties", {"density": 0.2}),
    "dare": MergeMethod("DARE", "dare", {"density": 0.5}),
    "dare_ties": MergeMethod("DARE-TIES", "dare_ties", {"density": 0.5}),
    "fisher": MergeMethod("Fisher (post-hoc)", "fisher"),
    "ota": MergeMethod("OTA (UMTAM stats)", "ota"),
    "umtam": MergeMethod("UMTAM", "umtam"),
}


def _grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*axes.values())]


def default_grids(full: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per-method hyper-parameter grids selected on validation.

    Linear is task arithmetic at ``1/K`` by definition (no grid). Density-based methods
    search density and scaling; normalised averages (TIES, OTA, UMTAM) a scaling factor;
    summing ones (DARE, DARE-TIES) a scaling from ``1/K``-like to 1 (``None`` scaling for
    DARE is never used). Fisher has no hyper-parameter.
    """
    if full:
        dens = (0.1, 0.2, 0.4)
        norm_scale = (1.0, 1.5, 2.0)
        sum_scale = (0.3, 0.5, 1.0)
        dare_dens = (0.2, 0.5, 0.8)
    else:
        dens = (0.2, 0.4)
        norm_scale = (1.0, 2.0)
        sum_scale = (0.3, 0.6)
        dare_dens = (0.3, 0.6)
    return {
        "linear": [{}],
        "task_arithmetic": _grid(scaling=sum_scale),
        "ties": _grid(density=dens, scaling=norm_scale),
        "dare": _grid(density=dare_dens, scaling=sum_scale),
        "dare_ties": _grid(density=dare_dens, scaling=sum_scale),
        "fisher": [{}],
        "ota": _grid(scaling=norm_scale),
        "umtam": _grid(density=dens, scaling=norm_scale),
    }


def merge_encoders(
    method: str | MergeMethod,
    base_encoder: Params,
    expert_encoders: Sequence[Params],
    *,
    statistics: Sequence[Any] | None = None,
    fishers: Sequence[Any] | None = None,
    key: jax.Array | None = None,
    **hparams: Any,
) -> Params:
    """Merges K fine-tuned encoders with a named method through :mod:`umtam_jax.merging`.

    Args:
        method: A key of :data:`MERGE_METHODS` or a :class:`MergeMethod`.
        base_encoder: The shared pretrained encoder.
        expert_encoders: The experts' encoders.
        statistics: The experts' encoder statistics (UMTAM and OTA).
        fishers: The experts' encoder Fishers (Fisher merging).
        key: PRNG key (DARE, DARE-TIES).
        **hparams: Method hyper-parameters (density, scaling, UMTAM flags, ...).

    Returns:
        The merged encoder.
    """
    from umtam_jax import merging

    m = MERGE_METHODS[method] if isinstance(method, str) else method
    if m.needs == "statistics" and statistics is None:
        raise ValueError(f"{m.name} needs the experts' UMTAM statistics")
    if m.needs == "fisher" and fishers is None:
        raise ValueError(f"{m.name} needs the experts' Fishers")
    registered = merging.METHODS[m.method]
    options = {**m.defaults, **hparams}
    if options.get("scaling", 0.0) is None:
        options["scaling"] = 1.0 / len(expert_encoders)
    if registered.param("key") is not None:
        options["key"] = jax.random.key(0) if key is None else key
    extra = {"statistics": statistics, "fisher": fishers}.get(m.needs)
    return merging.merge(registered, base_encoder, list(expert_encoders), extra, **options)


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

    Returns:
        ``(fishers, seconds)``: one encoder-shaped Fisher per expert and the wall time.
    """
    from umtam_jax import merging

    def loss(p, b):
        return minilm.classifier_loss(p, b, config=config.config)[0]

    t0 = time.perf_counter()
    out = []
    for e in tqdm(experts, desc="post-hoc Fisher", disable=not progress, leave=False):
        tr = ttasks[e.task].arrays["train"]
        n = min(num_examples, len(tr["labels"]))
        n -= n % batch_size if n >= batch_size else 0
        batches = [
            {k: v[s : s + batch_size] for k, v in tr.items()}
            for s in range(0, max(n, 1), batch_size)
        ]
        f = merging.diagonal_fisher(loss, e.params, batches)
        out.append(jax.block_until_ready(f["encoder"]))
    return out, time.perf_counter() - t0


def _scores(
    merged_encoder: Params,
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    split: str,
    config: PipelineConfig,
) -> dict[str, float]:
    return {
        e.task: evaluate_params(
            {"encoder": merged_encoder, "head": e.params["head"]}, ttasks[e.task], split, config
        )
        for e in experts
    }


def _normalized(scores: Mapping[str, float], experts: Sequence[ExpertResult], split: str):
    vals = [scores[e.task] / max(e.scores[split], 1e-12) for e in experts]
    return float(np.mean(vals))


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
            key=key,
            **fixed,
            **hp,
        )
        jax.block_until_ready(merged)
        merge_s.append(time.perf_counter() - t0)
        val = _scores(merged, experts, ttasks, "validation", config)
        norm = _normalized(val, experts, "validation")
        trials.append({"hparams": dict(hp), "val_norm": norm})
        if best is None or norm > best[0] + 1e-12:
            best = (norm, dict(hp), merged, val)
    assert best is not None
    norm, hp, merged, val = best
    test = _scores(merged, experts, ttasks, "test", config)

    def summary(s, split):
        return {
            **s,
            "avg": float(np.mean(list(s.values()))),
            "norm": _normalized(s, experts, split),
        }

    return {
        "method": label,
        "hparams": {**fixed, **hp},
        "validation": summary(val, "validation"),
        "test": summary(test, "test"),
        "grid": trials,
        "merge_seconds": float(np.median(merge_s)),
    }


def run_merging(
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    base_encoder: Params,
    config: PipelineConfig,
    *,
    methods: Sequence[str] = ("linear", "ties", "dare", "dare_ties", "fisher", "ota", "umtam"),
    grids: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    fisher_examples: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Merges the experts' encoders with every method (validation-selected, test-reported).

    Returns:
        ``{"experts": {task: {"validation", "test"}}, "expert_avg": {...}, "methods":
        {key: select_on_validation(...)}, "fisher_seconds": float | None}``.
    """
    grids = dict(grids or default_grids())
    stats = None
    if any(MERGE_METHODS[m].needs == "statistics" for m in methods):
        if any(e.statistics is None for e in experts):
            raise ValueError("UMTAM/OTA merging needs experts trained with UMTAM (statistics)")
        stats = [e.statistics["encoder"] for e in experts]
    fishers, fisher_s = None, None
    if "fisher" in methods:
        fishers, fisher_s = post_hoc_fishers(
            experts, ttasks, config, num_examples=fisher_examples, progress=progress
        )
    key = jax.random.key(_seed_for(config.seed, "merge"))
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = select_on_validation(
            m,
            grids[m],
            base_encoder,
            experts,
            ttasks,
            config,
            statistics=stats,
            fishers=fishers,
            key=key,
            progress=progress,
        )
        out[m]["method"] = MERGE_METHODS[m].name
    if fishers is not None:
        out["fisher"]["extra_seconds"] = fisher_s
        out["fisher"]["fisher_examples_per_task"] = fisher_examples
    exp = {e.task: dict(e.scores) for e in experts}
    return {
        "experts": exp,
        "expert_avg": {
            s: float(np.mean([e.scores[s] for e in experts])) for s in ("validation", "test")
        },
        "methods": out,
        "fisher_seconds": fisher_s,
    }


def format_table(result: Mapping[str, Any], split: str = "test") -> str:
    """A Markdown table: per-task metric, average, normalized average (merged/expert)."""
    tasks = list(result["experts"])
    head = ["Method", *tasks, "Avg", "Norm. avg", "Chosen (on validation)"]
    rows = [
        [
            "Expert (upper bound)",
            *[f"{result['experts'][t][split]:.3f}" for t in tasks],
            f"{result['expert_avg'][split]:.3f}",
            "1.000",
            "",
        ]
    ]
    for r in result["methods"].values():
        s = r[split]
        hp = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["hparams"].items()
        )
        rows.append(
            [
                r["method"],
                *[f"{s[t]:.3f}" for t in tasks],
                f"{s['avg']:.3f}",
                f"{s['norm']:.3f}",
                hp,
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree."""
    return int(
        sum(
            np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
            for x in jax.tree.leaves(tree)
        )
    )


def load_base(config: PipelineConfig = PipelineConfig()) -> Params:  # noqa: B008
    """The pretrained MiniLM encoder (the shared start ``w0``)."""
    del config
    return minilm.load_minilm()


# ---------------------------------------------------------------------------
# Presets and one-call setup (demo and benchmarks)
# ---------------------------------------------------------------------------

#: Quick preset: sized for about 10 minutes for 4 tasks on 2 idle CPU cores.
QUICK = PipelineConfig(
    max_length=40, batch_size=32, steps=60, learning_rate=1e-4, max_train=4096, max_eval=200
)
#: Full-size preset.
FULL = PipelineConfig(
    max_length=64, batch_size=32, steps=600, learning_rate=1e-4, max_train=None, max_eval=2000
)
#: UMTAM settings of the demo: library defaults except a fresh subspace decomposition
#: every 10 steps, the fixed-basis projection of docs/algorithm.md §2.5 in between (see the
#: ``efficiency`` benchmark for the per-step cost of ``svd_every=1``).
DEMO_UMTAM_KWARGS: dict[str, Any] = {"svd_every": 10}


def enable_compilation_cache(directory: str | Path) -> None:
    """Turns on JAX's persistent compilation cache (reruns skip most compile time)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def prepare_experts(
    tasks: Sequence[str],
    config: PipelineConfig,
    workdir: str | Path,
    *,
    optimizer: str = "umtam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    tag: str = "",
    base_encoder: Params | None = None,
    ttasks: Mapping[str, TokenizedTask] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> tuple[Params, dict[str, TokenizedTask], list[ExpertResult]]:
    """Loads the base and tokenizer, prepares the tasks and trains (or restores) experts.

    Returns:
        ``(base_encoder, tokenized tasks by name, experts in task order)``.
    """
    workdir = Path(workdir)
    if base_encoder is None:
        base_encoder = minilm.load_minilm()
    if ttasks is None:
        tok = minilm.load_minilm_tokenizer()
        ttasks = {t: prepare_task(t, tok, config, cache_dir=workdir / "tokens") for t in tasks}
    experts = []
    for t in tasks:
        e = train_expert(
            ttasks[t],
            base_encoder,
            config,
            workdir,
            optimizer=optimizer,
            optimizer_kwargs=optimizer_kwargs,
            tag=tag,
            progress=progress,
        )
        if log is not None:
            how = "restored" if e.info.get("restored") else f"trained in {e.info['seconds']:.0f}s"
            log(
                f"  expert {t:<16} {how:<18} val {e.scores['validation']:.3f}  "
                f"test {e.scores['test']:.3f}  ({e.path.name})"
            )
        experts.append(e)
    return base_encoder, dict(ttasks), experts


def plot_merging(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Bar charts of the test metric per task and of the normalized average per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["experts"])
    rows = [("Expert", {**{t: result["experts"][t]["test"] for t in tasks}, "norm": 1.0})]
    rows += [(r["method"], r["test"]) for r in result["methods"].values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[2, 1])
    width = 0.8 / len(rows)
    x = np.arange(len(tasks))
    for i, (name, s) in enumerate(rows):
        a1.bar(x + i * width, [s[t] for t in tasks], width, label=name)
    a1.set_xticks(x + 0.4 - width / 2, tasks)
    a1.set_ylabel("test metric")
    a1.legend(fontsize=7, ncol=2)
    a1.set_ylim(0, 1)
    names = [n for n, _ in rows]
    a2.barh(names, [s["norm"] for _, s in rows], color="tab:blue")
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("normalized avg (merged / expert)")
    a2.invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
