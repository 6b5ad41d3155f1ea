"""Top-k keep masks with exact counts (SPEC §4 step 2, §5 TIES trim, SPEC §9 item 4).

A mask keeps exactly ``max(1, int(density * N))`` entries with the largest scores, ``N`` the
size of one tensor (``scope="tensor"``) or of the whole expert (``scope="global"``). Equal
scores are broken deterministically in favour of the lower flat index (row-major order; for
``scope="global"`` the leaves are concatenated in ``jax.tree_util`` flattening order), so the
count is exact even when many scores tie (e.g. all-zero saliencies).

Implementation: an exact radix select. Scores are mapped to unsigned integers with the same
order (the IEEE-754 bit pattern, sign-flipped), the k-th largest key is found bit by bit
from the most significant one (32 passes of ``count(key >= candidate)`` for float32, 64 for
float64), and the mask is ``key > t`` plus the first ``k − count(key > t)`` entries equal to
``t`` in flat order (a cumulative sum). This is the same mask as ``jax.lax.top_k`` on the
flattened scores scattered into a boolean array (``top_k`` also returns the lower index
first among equal values), but it streams over the scores instead of sorting them.
Measured with jit on the project's 2-core CPU, k = 0.2 N, float32: N = 1M, 0.15 s for
``top_k`` + scatter against 0.37 s for a full ``jnp.sort`` threshold and 0.42 s for a
stable ``argsort`` (idle machine); and, with the machine shared by other jobs, N = 100k /
1M / 11.7M (MiniLM's embedding): 0.017 / 0.26 / 9.6 s for ``top_k`` against
0.007 / 0.08 / 1.3 s for the radix select, which is therefore used.
Bit patterns order ``-0.0`` below ``+0.0`` and NaN above ``+inf`` (NaN scores are kept
first).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def keep_count(n: int, density: float) -> int:
    """``max(1, int(density · n))``, capped at ``n``."""
    return min(n, max(1, int(density * n)))


def _sortable_keys(x: jax.Array) -> tuple[jax.Array, Any, int]:
    """Unsigned integers ordered like the floats ``x`` (float64 stays 64-bit)."""
    if x.dtype == jnp.float64:
        utype, nbits = jnp.uint64, 64
    else:
        x = x.astype(jnp.float32)
        utype, nbits = jnp.uint32, 32
    bits = jax.lax.bitcast_convert_type(x, utype)
    negative = (bits >> (nbits - 1)) == 1
    flip = jnp.where(negative, ~utype(0), utype(1) << (nbits - 1))
    return bits ^ flip, utype, nbits


def _topk_mask(scores: jax.Array, k: int) -> jax.Array:
    flat = scores.reshape(-1)
    n = flat.shape[0]
    if k >= n:
        return jnp.ones(scores.shape, bool)
    keys, utype, nbits = _sortable_keys(flat)

    def refine(i, t):
        candidate = t | (utype(1) << (utype(nbits - 1) - i.astype(utype)))
        enough = jnp.sum(keys >= candidate, dtype=jnp.int32) >= k
        return jnp.where(enough, candidate, t)

    # t: the largest key with at least k keys >= t, i.e. the k-th largest key.
    t = jax.lax.fori_loop(0, nbits, refine, utype(0))
    above = keys > t
    need = k - jnp.sum(above, dtype=jnp.int32)
    equal = keys == t
    first_equal = equal & (jnp.cumsum(equal, dtype=jnp.int32) <= need)
    return (above | first_equal).reshape(scores.shape)


@functools.partial(jax.jit, static_argnums=1)
def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask (shape of ``scores``) with exactly ``k`` True at the largest scores.

    Ties are broken towards the lower flat index; NaN scores count as the largest.
    """
    return _topk_mask(scores, k)


@functools.partial(jax.jit, static_argnums=1)
def global_masks(scores: list[jax.Array], k: int) -> list[jax.Array]:
    """Masks keeping exactly ``k`` entries over all the score leaves together."""
    dtype = jnp.result_type(*[s.dtype for s in scores])
    flat = jnp.concatenate([s.reshape(-1).astype(dtype) for s in scores])
    mask = _topk_mask(flat, k)
    out, start = [], 0
    for s in scores:
        out.append(mask[start : start + s.size].reshape(s.shape))
        start += s.size
    return out


def keep_masks(scores: list[jax.Array], density: float, scope: str) -> list[jax.Array]:
    """Keep masks for one expert's score leaves.

    Args:
      scores: one score array per leaf (floating point; compared as float32 or wider).
      density: fraction in (0, 1] of entries to keep.
      scope: ``"tensor"`` (exact count per leaf) or ``"global"`` (exact count over all the
        leaves together).

    Returns:
      One boolean mask per leaf.
    """
    if scope == "tensor":
        return [topk_mask(s, keep_count(s.size, density)) for s in scores]
    return global_masks(list(scores), keep_count(sum(s.size for s in scores), density))
