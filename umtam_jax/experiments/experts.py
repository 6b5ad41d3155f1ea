"""The experts' cache: train an expert once, save it as a checkpoint, restore it after.

An expert's checkpoint lives in ``<workdir>/experts/<task>-<tag>-<fingerprint>``, where
the fingerprint (:func:`expert_fingerprint`) covers the task, the training config, the
optimizer and its kwargs and the split sizes, so a cached expert is reused only when it
was trained the same way. The checkpoint holds the parameters, the UMTAM statistics and
metadata with the fingerprint, the training info and the expert's validation/test scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.experiments._keys import arrays_hash, stable_hash
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.evaluation import evaluate_params
from umtam_jax.experiments.tasks import TokenizedTask
from umtam_jax.experiments.training import EarlyStopping, finetune, optimizer_for

__all__ = ["ExpertResult", "expert_fingerprint", "train_expert"]

Params = dict[str, Any]


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


def expert_fingerprint(
    ttask: TokenizedTask,
    config: PipelineConfig,
    optimizer: str = "umtam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    early_stopping: EarlyStopping | None = None,
    base_encoder: Params | None = None,
) -> str:
    """The cache key of an expert: a hash of everything that changes its training.

    Args:
        ttask: The tokenized task (its name, and every split's tokens and labels, enter
            the key: an expert of re-registered or corrected data is trained again).
        config: Training config (its :meth:`~PipelineConfig.training_key`).
        optimizer: The optimizer's name.
        optimizer_kwargs: Extra optimizer arguments.
        early_stopping: Early stopping settings; None (fixed steps) leaves the key as it
            was before early stopping existed, so the fixed-step caches stay valid.
        base_encoder: The encoder the expert starts from (its values enter the key: an
            expert is never restored for another ``w0``).

    Returns:
        16 hex digits, the last part of the checkpoint directory's name.
    """
    key: dict[str, Any] = {
        "task": ttask.name,
        "train": config.training_key(),
        "optimizer": optimizer,
        "kwargs": dict(optimizer_kwargs or {}),
        "n": {s: len(a["labels"]) for s, a in ttask.arrays.items()},
        "data": arrays_hash(ttask.arrays),  # every split's tokens and labels
    }
    if base_encoder is not None:
        key["base"] = arrays_hash(base_encoder)
    if early_stopping is not None:
        key["early_stopping"] = early_stopping.key()
    return stable_hash(key)


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
    early_stopping: EarlyStopping | None = None,
) -> ExpertResult:
    """Fine-tunes (or restores) the expert of one task and saves it with its statistics.

    The checkpoint lives in ``workdir/experts/<task>-<tag>-<fingerprint>``; the
    fingerprint covers the task's data, the base encoder, the training config, the
    optimizer and its kwargs, so a cached expert is reused only when it was trained the
    same way from the same data and start.

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
        early_stopping: Train until validation stops improving (at most
            ``config.steps`` steps) and keep the best checkpoint; None: exactly
            ``config.steps`` steps.

    Returns:
        The :class:`ExpertResult`.
    """
    from umtam_jax import checkpoint

    kwargs = dict(optimizer_kwargs or {})
    fp = expert_fingerprint(
        ttask, config, optimizer, kwargs, early_stopping, base_encoder=base_encoder
    )
    name = "-".join(p for p in (ttask.name, tag, fp) if p)
    path = Path(workdir).absolute() / "experts" / name
    if path.exists():
        restored = _restore(path, fp, ttask.name)
        if restored is not None:
            return restored
    tx = optimizer_for(optimizer, config, kwargs)
    params, opt_state, info = finetune(
        ttask, base_encoder, tx, config, progress=progress, early_stopping=early_stopping
    )
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


def _restore(path: Path, fp: str, task: str) -> ExpertResult | None:
    """The expert saved at ``path``, or None when its checkpoint holds another fingerprint
    (then it is trained again and replaced).

    Args:
        path: The expert's checkpoint directory (it exists).
        fp: The fingerprint of the expert asked for.
        task: The task's name (for messages).

    Returns:
        The restored :class:`ExpertResult`, or None.

    Raises:
        CheckpointCorruptError: the checkpoint is damaged or incomplete (a flipped byte,
            a missing file): it is never retrained over silently.
        ValueError: ``path`` holds a checkpoint without an expert fingerprint (not an
            expert of this library, or one written before fingerprints).
    """
    from umtam_jax import checkpoint

    def damaged(err: Exception) -> checkpoint.CheckpointCorruptError:
        return checkpoint.CheckpointCorruptError(
            f"the expert checkpoint {path} of task {task!r} is damaged ({err}): it is "
            f"never retrained over silently; restore it, or delete {path} to train the "
            "expert again"
        )

    try:
        user = checkpoint.read_metadata(path).get("user")
    except (FileNotFoundError, ValueError) as err:  # CheckpointCorruptError included
        raise damaged(err) from None
    if not isinstance(user, dict) or not isinstance(user.get("fingerprint"), str):
        raise ValueError(
            f"{path} holds no expert fingerprint (a checkpoint this library's experiments "
            "did not write, or wrote before they had fingerprints): move it out of the work "
            "directory's experts folder, or delete it to train the expert again"
        )
    if user["fingerprint"] != fp:
        return None  # another expert's (a name clash): trained again and replaced
    try:
        ck = checkpoint.restore_checkpoint(path)
        user = ck.metadata["user"]
        scores, info = user["scores"], user["info"]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise damaged(err) from None
    params = jax.tree.map(jnp.asarray, ck.params)
    return ExpertResult(task, path, params, ck.statistics, scores, {**info, "restored": True})
