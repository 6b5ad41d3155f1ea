"""Experiment configuration: :class:`PipelineConfig`, its presets and the default tasks.

A :class:`PipelineConfig` holds every size and training setting of an experiment; its
:meth:`~PipelineConfig.data_key` and :meth:`~PipelineConfig.training_key` are the parts
that enter the cache keys of the tokenized data and of the trained experts. ``QUICK`` and
``FULL`` are the presets of the demo and the benchmarks, ``DEMO_UMTAM_KWARGS`` the UMTAM
settings they train with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from umtam_jax.experiments.models import minilm

__all__ = ["DEFAULT_TASKS", "DEMO_UMTAM_KWARGS", "FULL", "QUICK", "PipelineConfig"]

#: Default task set of the demo and benchmarks (any registered names work).
DEFAULT_TASKS = ("wn_defmatch", "kjv_section", "fortune_topic", "wn_supersense")


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
        max_test: Cap on the test examples per task when it differs from ``max_eval``
            (an int, or None: all); the default ``"max_eval"`` uses ``max_eval`` and leaves
            the cache keys as they were before this field existed.
        eval_batch_size: Batch size of the jitted forward pass in evaluation.
        dropout: Train with dropout (MiniLM's 0.1); off by default (faster on CPU).
        seed: Seed of data splits, head init, batch order and random merges.
        config: Encoder configuration (the pretrained MiniLM-L6 by default).
        train_head: Train the classification head with the encoder (default). False keeps
            each head at its seeded initialization, so only the encoder learns the task:
            a task and its mirror (:func:`~umtam_jax.experiments.data.\
register_mirror_task`) then share one fixed head and their encoders must move apart.

    Example:
      >>> from umtam_jax.experiments.config import PipelineConfig
      >>> config = PipelineConfig(steps=10, max_train=64)
      >>> config.steps, config.max_test, config.config.num_layers
      (10, 'max_eval', 6)
    """

    max_length: int = 48
    batch_size: int = 32
    steps: int = 100
    learning_rate: float = 1e-4
    warmup_fraction: float = 0.1
    max_train: int | None = 4096
    max_eval: int | None = 200
    max_test: int | None | str = "max_eval"
    eval_batch_size: int = 50
    dropout: bool = False
    seed: int = 0
    config: minilm.BertConfig = minilm.MINILM_L6
    train_head: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_test, str) and self.max_test != "max_eval":
            raise ValueError(f"max_test must be an int, None or 'max_eval', got {self.max_test!r}")

    @property
    def test_cap(self) -> int | None:
        """The cap on the test examples per task (None: all)."""
        return self.max_eval if self.max_test == "max_eval" else self.max_test  # type: ignore[return-value]

    def data_key(self) -> dict[str, Any]:
        """The fields that change the tokenized data."""
        key: dict[str, Any] = {
            "max_length": self.max_length,
            "max_train": self.max_train,
            "max_eval": self.max_eval,
            "seed": self.seed,
        }
        if self.max_test != "max_eval":  # only then: older keys stay unchanged
            key["max_test"] = self.max_test
        return key

    def training_key(self) -> dict[str, Any]:
        """The fields that change a trained expert (part of its checkpoint fingerprint)."""
        key = {
            **self.data_key(),
            "batch_size": self.batch_size,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "warmup_fraction": self.warmup_fraction,
            "dropout": self.dropout,
            "config": dataclasses.asdict(self.config),
        }
        if not self.train_head:  # only then: older keys stay unchanged
            key["train_head"] = False
        return key


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
