"""Orchestration of the fine-tune → checkpoint → merge → evaluate pipeline of MiniLM experts.

Driven entirely by the task registry (:mod:`umtam_jax.experiments.data`): any task name
from :func:`~umtam_jax.experiments.data.available_tasks`, including one registered at run
time, goes through the same steps. Nothing here names a task except as a default.

Protocol (the standard multi-task merging setup, e.g. TIES / DARE / UMTAM):

1. Every expert starts from the same pretrained MiniLM encoder ``w0`` and gets a fresh,
   task-specific classification head (seeded from ``(seed, task name)``, a mirror task's
   from the name of the task it mirrors); encoder and head are fine-tuned together with
   one Optax transform (UMTAM by default, statistics kept), or the encoder alone with
   ``PipelineConfig.train_head=False``.
2. Each expert is saved as an Orbax checkpoint (parameters, UMTAM statistics, metadata
   with the training config and the expert's validation/test scores) and reused when a
   checkpoint with the same fingerprint already exists.
3. Only the *encoders* are merged (task vectors ``w_τ − w0`` of the encoder); each task
   keeps its own head (as trained) on top of the merged encoder.
4. Per method, merge hyper-parameters (density, scaling, ...) are chosen from a small grid
   by the mean *normalized* validation score over tasks (merged / expert, both on the
   validation split); the chosen setting is then reported on the test split. Every method
   gets the same treatment; nothing is tuned on test.

This module only runs the stages in order: :func:`prepare_experts` (steps 1-2) and
:func:`run_merging` (steps 3-4). The stages themselves live in their own modules, all
re-exported by :mod:`umtam_jax.experiments`: :mod:`~umtam_jax.experiments.config`,
:mod:`~umtam_jax.experiments.tasks`, :mod:`~umtam_jax.experiments.training`,
:mod:`~umtam_jax.experiments.experts`, :mod:`~umtam_jax.experiments.evaluation`,
:mod:`~umtam_jax.experiments.merge`, :mod:`~umtam_jax.experiments.posthoc`,
:mod:`~umtam_jax.experiments.selection` and :mod:`~umtam_jax.experiments.reporting`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.experts import ExpertResult, train_expert
from umtam_jax.experiments.merge import MERGE_METHODS, default_grids, merge_key
from umtam_jax.experiments.models import minilm_pretrained
from umtam_jax.experiments.posthoc import post_hoc_fishers, post_hoc_grams
from umtam_jax.experiments.selection import select_on_validation
from umtam_jax.experiments.tasks import TokenizedTask, prepare_task

__all__ = ["enable_compilation_cache", "load_base", "prepare_experts", "run_merging"]

Params = dict[str, Any]


def load_base(config: PipelineConfig = PipelineConfig()) -> Params:  # noqa: B008
    """The pretrained MiniLM encoder (the shared start ``w0``).

    Args:
        config: the experiment's configuration (any: every configuration starts from
            the same pretrained encoder).

    Returns:
        The encoder's parameters (a nested dict of arrays).
    """
    del config
    return minilm_pretrained.load_minilm()


def enable_compilation_cache(directory: str | Path) -> None:
    """Turns on JAX's persistent compilation cache (reruns skip most compile time).

    Args:
        directory: the cache folder, created if missing. Programs that take at least a
            second to compile are cached there.
    """
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

    Args:
        tasks: registered task names, one expert each.
        config: the experiment's configuration (data sizes, training).
        workdir: the work directory (tokenized tasks in ``tokens/``, experts in
            ``experts/``).
        optimizer: ``"umtam"``, ``"adamw"`` or ``"sgd"``
            (:func:`~umtam_jax.experiments.experts.train_expert`).
        optimizer_kwargs: the optimizer's other arguments.
        tag: a free label in the experts' folder names.
        base_encoder: the shared start ``w0`` (None: the pretrained MiniLM encoder).
        ttasks: tokenized tasks by name, covering ``tasks`` (None: each task tokenized,
            and cached, here).
        progress: show progress bars.
        log: called with one line per expert (None: silent).

    Returns:
        ``(base_encoder, tokenized tasks by name, experts in task order)``.

    Raises:
        KeyError: an unregistered task, or one missing from ``ttasks``.
        ValueError: an unknown ``optimizer``.
    """
    workdir = Path(workdir)
    if base_encoder is None:
        base_encoder = minilm_pretrained.load_minilm()
    if ttasks is None:
        tok = minilm_pretrained.load_minilm_tokenizer()
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


def run_merging(
    experts: Sequence[ExpertResult],
    ttasks: Mapping[str, TokenizedTask],
    base_encoder: Params,
    config: PipelineConfig,
    *,
    methods: Sequence[str] = ("linear", "ties", "dare", "dare_ties", "fisher", "ota", "umtam"),
    grids: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    fisher_examples: int = 64,
    gram_examples: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Merges the experts' encoders with every method (validation-selected, test-reported).

    The per-expert inputs are computed only when a method needs them: UMTAM statistics
    from the experts, post-hoc Fishers (Fisher merging) on ``fisher_examples`` and input
    Grams (RegMean) on ``gram_examples`` training examples per task; the wall time of a
    post-hoc pass is recorded as ``extra_seconds`` of the methods that need it.

    Args:
        experts: the fine-tuned experts (:func:`prepare_experts`).
        ttasks: the tokenized tasks by name (those of the experts at least).
        base_encoder: the shared start ``w0``.
        config: the experiment's configuration.
        methods: keys of :data:`~umtam_jax.experiments.merge.MERGE_METHODS`.
        grids: each method's hyper-parameter settings to select from (None:
            :func:`~umtam_jax.experiments.merge.default_grids`).
        fisher_examples: training examples per task of the post-hoc Fishers.
        gram_examples: training examples per task of RegMean's input Grams.
        progress: show progress bars.

    Returns:
        ``{"experts": {task: {"validation", "test"}}, "expert_avg": {...}, "methods":
        {key: select_on_validation(...)}, "fisher_seconds": float | None,
        "gram_seconds": float | None}``.

    Raises:
        KeyError: a method that is not in ``MERGE_METHODS`` or has no grid.
        ValueError: a method needs UMTAM statistics and an expert has none.
    """
    grids = dict(grids or default_grids())
    needs = {m: MERGE_METHODS[m].needs for m in methods}
    stats = None
    if "statistics" in needs.values():
        if any(e.statistics is None for e in experts):
            raise ValueError("UMTAM/OTA merging needs experts trained with UMTAM (statistics)")
        stats = [e.statistics["encoder"] for e in experts]
    fishers, fisher_s = None, None
    if "fisher" in needs.values():
        fishers, fisher_s = post_hoc_fishers(
            experts, ttasks, config, num_examples=fisher_examples, progress=progress
        )
    grams, gram_s = None, None
    if "grams" in needs.values():
        grams, gram_s = post_hoc_grams(
            experts, ttasks, config, num_examples=gram_examples, progress=progress
        )
    key = merge_key(config)
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
            grams=grams,
            key=key,
            progress=progress,
        )
        out[m]["method"] = MERGE_METHODS[m].name
    for m in methods:
        if needs[m] == "fisher":
            out[m]["extra_seconds"] = fisher_s
            out[m]["fisher_examples_per_task"] = fisher_examples
        elif needs[m] == "grams":
            out[m]["extra_seconds"] = gram_s
            out[m]["gram_examples_per_task"] = gram_examples
    exp = {e.task: dict(e.scores) for e in experts}
    return {
        "experts": exp,
        "expert_avg": {
            s: float(np.mean([e.scores[s] for e in experts])) for s in ("validation", "test")
        },
        "methods": out,
        "fisher_seconds": fisher_s,
        "gram_seconds": gram_s,
    }


def __getattr__(name: str) -> Any:
    # The stages' names resolve here too (they are defined in their own modules).
    import umtam_jax.experiments as experiments

    if name in experiments.__all__:
        return getattr(experiments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
