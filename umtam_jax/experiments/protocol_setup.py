"""The set-up of a protocol run: its sizes, start encoder, expert recipes and one seed's
experts.

:data:`SIZES` holds the sizes of :mod:`~umtam_jax.experiments.protocol` (``tiny`` for the
tests, ``medium`` for a CPU, ``full`` for a GPU; their cost is in that module's docstring),
:data:`EXPERT_RECIPES` the ways the experts can be trained, and :func:`seed_inputs` one
seed's tokenized tasks and experts, trained or restored from the work directory. Every
name here is also importable from :mod:`~umtam_jax.experiments.protocol`.

Example:
    >>> from umtam_jax.experiments import protocol_setup
    >>> protocol_setup.resolve_size("tiny").budget
    4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from umtam_jax.experiments.config import DEFAULT_TASKS, DEMO_UMTAM_KWARGS, PipelineConfig
from umtam_jax.experiments.experts import ExpertResult, train_expert
from umtam_jax.experiments.models import minilm, minilm_pretrained
from umtam_jax.experiments.spaces import Candidate
from umtam_jax.experiments.tasks import TokenizedTask, prepare_task
from umtam_jax.experiments.training import EarlyStopping

__all__ = [
    "EXPERT_OPTIMIZERS",
    "EXPERT_RECIPES",
    "ProtocolSize",
    "SIZES",
    "TINY_BERT",
    "resolve_size",
    "seed_inputs",
    "start_encoder",
    "usable",
]

Params = dict[str, Any]

#: The random 1-layer BERT of the ``tiny`` size (the tests' model).
TINY_BERT = minilm.BertConfig(
    num_layers=1,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    max_position=64,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
)


@dataclasses.dataclass(frozen=True)
class ProtocolSize:
    """Every size setting of a protocol run.

    Attributes:
        name: ``"tiny"``, ``"medium"``, ``"full"`` or your own.
        config: Data and training config (its ``seed`` is replaced by each seed; its
            ``steps`` is the early-stopping maximum).
        early_stopping: Validation every N steps, patience.
        budget: Validation evaluations per method with hyper-parameters.
        pretrained: Start from pretrained MiniLM (else a random encoder of
            ``config.config``, seeded 0).
        optimizer_kwargs: UMTAM settings of the experts.
        fisher_examples: Training examples per task of the post-hoc Fisher pass.
        gram_examples: Training examples per task of the post-hoc Gram pass (RegMean).
        bootstrap_samples: Bootstrap replicates of the intervals.
        seeds: Default seeds.
        tasks: Default tasks.
        methods: Default methods (None: every candidate).
    """

    name: str
    config: PipelineConfig
    early_stopping: EarlyStopping
    budget: int
    pretrained: bool = True
    optimizer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fisher_examples: int = 64
    gram_examples: int = 256
    bootstrap_samples: int = 2000
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] | None = None


#: The protocol's sizes (see the module docstring for their cost).
SIZES: dict[str, ProtocolSize] = {
    "tiny": ProtocolSize(
        "tiny",
        PipelineConfig(
            max_length=16,
            batch_size=8,
            steps=12,
            learning_rate=1e-2,
            max_train=32,
            max_eval=16,
            eval_batch_size=8,
            config=TINY_BERT,
        ),
        EarlyStopping(eval_every=3, patience=2),
        budget=4,
        pretrained=False,
        optimizer_kwargs={"rank": 4, "min_dim_size_to_factor": 16},
        fisher_examples=8,
        gram_examples=16,
        bootstrap_samples=200,
        seeds=(0, 1),
    ),
    "medium": ProtocolSize(
        "medium",
        PipelineConfig(
            max_length=40,
            batch_size=32,
            steps=250,
            learning_rate=1e-4,
            max_train=4096,
            max_eval=300,
            max_test=1000,
            eval_batch_size=50,
        ),
        EarlyStopping(eval_every=25, patience=3),
        budget=6,
        optimizer_kwargs=DEMO_UMTAM_KWARGS,
    ),
    "full": ProtocolSize(
        "full",
        PipelineConfig(
            max_length=64,
            batch_size=32,
            steps=3000,
            learning_rate=1e-4,
            max_train=None,
            max_eval=2000,
            max_test=None,
            eval_batch_size=256,
        ),
        EarlyStopping(eval_every=100, patience=5),
        budget=12,
        seeds=(0, 1, 2, 3, 4),
    ),
}


def resolve_size(size: str | ProtocolSize) -> ProtocolSize:
    """The :class:`ProtocolSize` of a name of :data:`SIZES` (or the size itself)."""
    if isinstance(size, ProtocolSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {sorted(SIZES)}")
    return SIZES[size]


def start_encoder(size: ProtocolSize) -> Params:
    """The shared start encoder of a size: pretrained MiniLM-L6 or a random one (seed 0)."""
    if size.pretrained:
        return minilm_pretrained.load_minilm()
    return minilm.init_encoder(jax.random.key(0), size.config.config)


#: How the protocol can train its experts: name -> (optimizer, settings). UMTAM recipes
#: add their settings to the size's ``optimizer_kwargs``; AdamW takes Optax's defaults.
#: The ``umtam_*`` recipes are the optimizer's memory modes: no m×n momentum buffer and
#: no tracked saliency (``lean``), momentum and saliency stored in bfloat16 (``bf16``).
EXPERT_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "umtam": ("umtam", {}),
    "adamw": ("adamw", {}),
    "umtam_lean": ("umtam", {"error_decay": 0.0, "saliency": "final"}),
    "umtam_bf16": ("umtam", {"buffer_dtype": "bfloat16"}),
}
#: The recipe names.
EXPERT_OPTIMIZERS = tuple(EXPERT_RECIPES)


def _expert_kwargs(size: ProtocolSize, experts_by: str) -> dict[str, Any]:
    optimizer, extra = EXPERT_RECIPES[experts_by]
    return {**size.optimizer_kwargs, **extra} if optimizer == "umtam" else dict(extra)


def usable(pool: Mapping[str, Candidate], experts_by: str) -> list[str]:
    """The candidates of ``pool`` that experts trained by ``experts_by`` can run (those
    merging UMTAM statistics need UMTAM-trained experts)."""
    umtam = EXPERT_RECIPES[experts_by][0] == "umtam"
    return [k for k, c in pool.items() if umtam or c.needs != "statistics"]


def seed_inputs(
    size: ProtocolSize,
    seed: int,
    tasks: Sequence[str],
    workdir: Path,
    base_encoder: Params,
    tokenizer: Any,
    *,
    experts: str = "umtam",
    progress: bool = False,
) -> tuple[PipelineConfig, dict[str, TokenizedTask], list[ExpertResult]]:
    """One seed's config, tokenized tasks and experts, trained or restored from
    ``workdir`` (the caches of :func:`~umtam_jax.experiments.protocol.run_protocol`,
    shared by the studies built on it).

    Args:
        size: The protocol size.
        seed: The seed (training and data split).
        tasks: Registered task names.
        workdir: The work directory.
        base_encoder: The shared start encoder.
        tokenizer: The MiniLM tokenizer.
        experts: The experts' recipe, a key of :data:`EXPERT_RECIPES`.
        progress: Show progress bars while training.

    Returns:
        ``(config, tokenized tasks by name, experts in task order)``.
    """
    cfg = dataclasses.replace(size.config, seed=seed)
    ttasks = {t: prepare_task(t, tokenizer, cfg, cache_dir=workdir / "tokens") for t in tasks}
    trained = [
        train_expert(
            ttasks[t],
            base_encoder,
            cfg,
            workdir,
            optimizer=EXPERT_RECIPES[experts][0],
            optimizer_kwargs=_expert_kwargs(size, experts),
            early_stopping=size.early_stopping,
            progress=progress,
        )
        for t in tasks
    ]
    return cfg, ttasks, trained
