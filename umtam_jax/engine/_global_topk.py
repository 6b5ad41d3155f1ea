"""The exact global top-k of ``scope="global"``, out of core.

A merge with ``scope="global"`` keeps exactly ``max(1, int(density · N))`` entries of each
expert over the whole model, with the in-memory tie rule (equal scores go to the lower
flat index of the concatenation, in flattening order). Out of core the k-th largest score
is found by a radix select over the scores' order-preserving integer keys (as in
:mod:`umtam_jax.merging._select`): pass 1 accumulates a histogram of the top 16 key bits
over all leaves, which fixes the threshold's top 16 bits; pass 2 a histogram of the next
16 bits among keys with that prefix (float64 scores need four passes). The merge pass then
keeps every key above the threshold and, in flattening order, the first
``k − count(key > threshold)`` keys equal to it. Each pass re-reads the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax._precision import at_least_float32
from umtam_jax.merging._select import DIGIT_BITS, _sortable_keys, keep_count

_CHUNK = 1 << 22  # entries per slice in the NumPy histogram and mask steps


@jax.jit
def _keys_jit(scores: jax.Array, like: jax.Array) -> jax.Array:
    # As in _select.global_masks: cast to the common dtype, then order-preserving keys.
    return _sortable_keys(scores.reshape(-1).astype(like.dtype))[0]


def _histogram(keys: np.ndarray, shift: int, prefix: int | None) -> np.ndarray:
    """Counts of the 16-bit digit ``(key >> shift) & 0xFFFF`` over the keys whose higher
    bits equal ``prefix`` (all keys when ``prefix`` is None), in bounded-size slices."""
    size = 2**DIGIT_BITS
    counts = np.zeros(size, np.int64)
    utype = keys.dtype.type
    for start in range(0, keys.size, _CHUNK):
        part = keys[start : start + _CHUNK]
        if prefix is not None:
            part = part[(part >> utype(shift + DIGIT_BITS)) == utype(prefix)]
        digits = ((part >> utype(shift)) & utype(size - 1)).astype(np.int32)
        counts += np.bincount(digits, minlength=size)
    return counts


def _leaf_mask(keys: np.ndarray, threshold: int, take_at_most: int) -> tuple[np.ndarray, int]:
    """``key > threshold`` plus the first ``take_at_most`` keys equal to it (flat order).

    Returns the mask and how many equal keys it took.
    """
    t = keys.dtype.type(threshold)
    mask = keys > t
    equal = keys == t
    n_equal = int(np.count_nonzero(equal))
    take = min(take_at_most, n_equal)
    if take == n_equal:
        mask |= equal
    elif take > 0:
        seen = 0
        for start in range(0, keys.size, _CHUNK):
            part = equal[start : start + _CHUNK]
            c = int(np.count_nonzero(part))
            if seen + c >= take:
                stop = start + int(np.flatnonzero(part)[take - seen - 1]) + 1
                mask[:stop] |= equal[:stop]
                break
            seen += c
    return mask, take


class GlobalTopK:
    """Exact global keep masks of several experts, found over passes through the leaves.

    Args:
      sizes: the number of entries of every leaf, in flattening order.
      dtypes: the leaves' dtypes (scores are compared in their common compute dtype).
      densities: one density per expert.
    """

    def __init__(self, sizes: list[int], dtypes: list[Any], densities: list[float]):
        total = sum(sizes)
        self.keep = [keep_count(total, d) for d in densities]
        self.everything = [kt >= total for kt in self.keep]
        dtype = jnp.result_type(*[at_least_float32(d) for d in dtypes])
        self.like = jnp.zeros((), dtype)
        self.nbits = 64 if dtype == jnp.float64 else 32
        k = len(densities)
        self.threshold = [0] * k
        self.remaining = list(self.keep)  # equal-to-threshold entries still to take

    def active(self) -> list[int]:
        """The experts that do not keep everything (the others need no pass)."""
        return [t for t, e in enumerate(self.everything) if not e]

    @property
    def passes(self) -> int:
        return self.nbits // DIGIT_BITS

    def keys(self, scores: jax.Array) -> np.ndarray:
        return np.asarray(_keys_jit(scores, self.like))

    def find_thresholds(
        self, scan: Callable[[int], Iterable[list[jax.Array]]], progress: Callable[[int], Any]
    ) -> None:
        """Runs the histogram passes.

        Args:
          scan: ``scan(p)`` yields, for every leaf in flattening order, an iterable of the
            active experts' scores on that leaf (pass ``p``; the inputs are read again each
            pass); a generator that computes each when it is reached holds one at a time.
          progress: called with the pass index before each pass.
        """
        active = self.active()
        if not active:
            return
        need = {t: self.keep[t] for t in active}
        prefix = dict.fromkeys(active, 0)
        for p in range(self.passes):
            progress(p)
            shift = self.nbits - DIGIT_BITS * (p + 1)
            hist = {t: np.zeros(2**DIGIT_BITS, np.int64) for t in active}
            for scores in scan(p):
                each = iter(scores)  # not zip: its reused tuple would hold the last scores
                for t in active:
                    s = next(each)
                    hist[t] += _histogram(self.keys(s), shift, prefix[t] if p > 0 else None)
                    del s  # before the next expert's scores are computed
                if next(each, None) is not None:
                    raise ValueError("scan yielded more scores than active experts")
            for t in active:
                # Largest digit d with count(digit >= d) >= need: the k-th largest's digit.
                above = np.cumsum(hist[t][::-1])  # above[i] = count(digit >= 65535 - i)
                i = int(np.searchsorted(above, need[t]))
                d = 2**DIGIT_BITS - 1 - i
                need[t] -= int(above[i - 1]) if i > 0 else 0
                prefix[t] = (prefix[t] << DIGIT_BITS) | d
        for t in active:
            self.threshold[t] = prefix[t]
            self.remaining[t] = need[t]

    def mask(self, t: int, scores: jax.Array) -> jax.Array:
        """Expert ``t``'s keep mask on the next leaf (leaves visited in flattening order)."""
        if self.everything[t]:
            return jnp.ones(scores.shape, bool)
        mask, took = _leaf_mask(self.keys(scores), self.threshold[t], self.remaining[t])
        self.remaining[t] -= took
        return jnp.asarray(mask.reshape(scores.shape))
