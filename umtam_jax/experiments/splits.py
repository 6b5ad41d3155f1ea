"""Seeded, stratified splits and subsamples of labelled examples.

Every random choice is keyed by the seed and a stable string (CRC-32, never Python's
``hash``), so the same seed gives the same split on every machine and Python version.
:func:`~umtam_jax.experiments.data.load_task` splits and caps tasks with these; they are
re-exported from :mod:`umtam_jax.experiments.data`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["keyed_rng", "stratified_split", "stratified_subsample"]


def keyed_rng(seed: int, *salt: str) -> np.random.Generator:
    """A generator keyed by seed and stable string salts (never Python's ``hash``).

    Args:
        seed: The experiment's seed.
        *salt: Strings naming the use (``"shuffle"``, a split's name, ...), so that each
            use draws its own stream.

    Returns:
        A NumPy generator, the same for the same arguments on every machine.

    Example:
      >>> from umtam_jax.experiments.splits import keyed_rng
      >>> a, b = keyed_rng(0, "shuffle", "train"), keyed_rng(0, "shuffle", "train")
      >>> bool(a.integers(1000) == b.integers(1000))
      True
    """
    return np.random.default_rng([int(seed), *(zlib.crc32(s.encode()) for s in salt)])


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[np.ndarray]:
    """Splits indices per class in the given fractions (disjoint, covering all).

    Args:
        labels: Integer labels (or any integer stratum, e.g. a group's class).
        fractions: One fraction per split; normalised to sum to 1.
        seed: Random seed.

    Returns:
        One sorted index array per split.

    Example:
      >>> from umtam_jax.experiments import data
      >>> labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
      >>> [p.tolist() for p in data.stratified_split(labels, (0.6, 0.2, 0.2), seed=0)]
      [[1, 2, 3, 7, 8, 9], [0, 6], [4, 5]]
    """
    labels = np.asarray(labels)
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    rng = keyed_rng(seed, "stratified_split")
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        # Later splits get round(n * f); the first one takes the rest.
        counts = [int(round(idx.size * f)) for f in fr[1:]]
        while sum(counts) > idx.size:
            counts[int(np.argmax(counts))] -= 1
        bounds = np.cumsum([idx.size - sum(counts), *counts])[:-1]
        for k, piece in enumerate(np.split(idx, bounds)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Picks ``n`` indices with the class proportions kept (largest remainder).

    Args:
        labels: Integer labels.
        n: Number of indices wanted (all are returned if ``n >= len(labels)``).
        seed: Random seed.

    Returns:
        Sorted index array.

    Example:
      >>> from umtam_jax.experiments import data
      >>> data.stratified_subsample([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], 5, seed=0).tolist()
      [0, 1, 5, 6, 7]
    """
    labels = np.asarray(labels)
    if n >= labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / labels.size
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    rng = keyed_rng(seed, "stratified_subsample")
    picked = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        picked.append(idx[rng.permutation(idx.size)[:q]])
    return np.sort(np.concatenate(picked))
