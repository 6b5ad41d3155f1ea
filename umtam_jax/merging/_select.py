"""Top-k keep masks with exact counts (docs/algorithm.md §4.2: UMTAM, TIES trim, prune).

A mask keeps exactly ``max(1, int(density * N))`` entries with the largest scores, ``N`` the
size of one tensor (``scope="tensor"``), of one slice of a tensor over its batch axes
(``scope="layer"`` or a layout callable: each layer of a scanned ``(L, m, n)`` leaf, as if
unrolled) or of the whole expert (``scope="global"``). Equal
scores are broken deterministically in favour of the lower flat index (row-major order; for
``scope="global"`` the leaves are concatenated in ``jax.tree_util`` flattening order), so the
count is exact even when many scores tie (e.g. all-zero saliencies).

Implementation: an exact radix select. Scores are mapped to unsigned integers with the same
order (the IEEE-754 bit pattern, sign-flipped), the k-th largest key ``t`` is found one
digit at a time from the most significant (one histogram pass per digit: 16-bit digits, 2
passes for float32 and 4 for float64; 8-bit digits up to ``_NARROW_DIGITS_UP_TO`` scores,
whose 256 bins cost less than the 65,536 of wide ones), and the mask is ``key > t`` plus
the first ``k − count(key > t)`` entries equal to ``t`` in flat order (a cumulative
count). This is the same mask as ``jax.lax.top_k`` on the flattened scores scattered into
a boolean array (``top_k`` also returns the lower index first among equal values), but it
streams over the scores instead of sorting them, in chunks of ``_CHUNK`` entries, so that
its temporaries are a chunk's, not the leaf's. With jit on the project's 2-core CPU,
k = 0.2 N, float32, N = 1M / 10M / 38.6M: 0.009 / 0.057 / 0.20 s, against 0.16 / 4.1 s for
``top_k`` + scatter and 0.31 / 3.1 s for a full sort at 1M / 10M
(``benchmarks/merge_time.py``; an earlier 1-bit radix select of 32 counting passes took
0.014 / 0.20 / 1.06 s); a 64 × 64 leaf takes 0.1 ms with 8-bit digits against 0.8 ms with
16-bit ones (``benchmarks/merge_overhead.py``). The tie-breaking count runs only
when more keys equal ``t`` than fit. Bit patterns order ``-0.0`` below ``+0.0`` and NaN
above ``+inf`` (NaN scores are kept first).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer._axis_order import from_canonical, to_canonical


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


DIGIT_BITS = 16
"""Bits resolved per histogram pass of the radix select over more than
``_NARROW_DIGITS_UP_TO`` scores (2 passes for float32)."""

#: Up to this many scores, the radix select takes 8-bit digits (4 passes of 256 bins for
#: float32): the 65,536 bins of a 16-bit pass cost more than the scores themselves (a
#: 64 × 64 leaf: 0.1 ms against 0.8 ms; at 2**19 scores 16 bits are ahead; jit, 2-core CPU).
_NARROW_DIGITS_UP_TO = 1 << 18


def _digit_bits(n: int) -> int:
    """Bits per histogram pass of the radix select over ``n`` scores."""
    return 8 if n <= _NARROW_DIGITS_UP_TO else DIGIT_BITS


#: Entries per step of a histogram pass: the pass's temporaries (keys, digits) are this
#: many, not the leaf's size (a 150k × 4096 embedding's would be gigabytes).
_CHUNK = 1 << 22


def _chunks(n: int, chunk: int) -> tuple[int, Any]:
    """How many chunks of ``min(chunk, n)`` entries cover ``n``, and chunk ``i``'s start
    and which of its entries are its own: the last chunk ends at ``n``, overlapping the
    one before, whose entries it does not count again."""
    size = min(chunk, n)

    def chunk_at(i: Any) -> tuple[Any, jax.Array]:
        start = jnp.minimum(i * size, n - size)
        return start, start + jnp.arange(size) >= i * size

    return -(-n // size), chunk_at


def _loop(count: int, step: Any, init: Any) -> Any:
    """``fori_loop(0, count, step, init)``, straight-line code for one chunk (most
    leaves): no loop to compile."""
    return step(0, init) if count == 1 else jax.lax.fori_loop(0, count, step, init)


def _histogram(flat: jax.Array, digit_of: Any, bins: int, chunk: int) -> jax.Array:
    """``bincount(digit_of(flat), length=bins + 1)`` as int32, summed chunk by chunk."""
    count, chunk_at = _chunks(flat.shape[0], chunk)

    def step(i: Any, hist: jax.Array) -> jax.Array:
        start, own = chunk_at(i)
        part = jax.lax.dynamic_slice_in_dim(flat, start, own.shape[0])
        digits = jnp.where(own, digit_of(part), bins)
        return hist + jnp.bincount(digits, length=bins + 1).astype(jnp.int32)

    return _loop(count, step, jnp.zeros(bins + 1, jnp.int32))


def _end_of_first(flat: jax.Array, t: Any, need: Any, chunk: int) -> jax.Array:
    """The flat index just past the ``need``-th key equal to ``t`` (``need >= 1``), found
    chunk by chunk: a cumulative count over the whole leaf would be as large as it."""
    count, chunk_at = _chunks(flat.shape[0], chunk)

    def step(i: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        seen, end = carry
        start, own = chunk_at(i)
        part = jax.lax.dynamic_slice_in_dim(flat, start, own.shape[0])
        equal = (_sortable_keys(part)[0] == t) & own
        running = seen + jnp.cumsum(equal, dtype=jnp.int32)
        here = (seen < need) & (running[-1] >= need)
        found = (start + jnp.argmax(running >= need) + 1).astype(jnp.int32)
        end = jnp.where(here, found, end)
        return running[-1], end

    return _loop(count, step, (jnp.int32(0), jnp.int32(0)))[1]


def _kth_largest_key(flat: jax.Array, k: Any, chunk: int = _CHUNK):
    """The k-th largest of the keys of ``flat`` (:func:`_sortable_keys`), by
    most-significant-digit radix select.

    Each pass histograms one digit (:func:`_digit_bits` bits) of the keys that share the
    digits found so far (a scatter-add into one bin per digit value, the other keys go to
    an extra bin) and picks the digit that holds the k-th largest: ``nbits / bits``
    passes, each over the scores in chunks of ``_CHUNK`` (their keys are never all in
    memory).

    Returns:
      ``(t, need, ties)``: the key ``t``, how many keys equal to ``t`` belong to the top k
      (``k − count(keys > t)``) and how many keys equal ``t``.
    """
    _, utype, nbits = _sortable_keys(flat[:0])
    bits = _digit_bits(flat.shape[0])
    bins = 1 << bits
    digit_mask = utype(bins - 1)
    prefix = utype(0)
    rank = jnp.asarray(k, jnp.int32)  # wanted rank among the keys matching ``prefix``
    for level in range(nbits // bits):
        shift = utype(nbits - (level + 1) * bits)

        def digit_of(x: jax.Array, shift: Any = shift, level: int = level, prefix: Any = prefix):
            keys = _sortable_keys(x)[0]
            digit = ((keys >> shift) & digit_mask).astype(jnp.int32)
            if level:
                high = shift + utype(bits)
                digit = jnp.where((keys >> high) == (prefix >> high), digit, bins)
            return digit

        hist = _histogram(flat, digit_of, bins, chunk)[:bins]
        at_least = jnp.cumsum(hist[::-1])[::-1]  # matching keys with digit >= d
        chosen = jnp.max(jnp.where(at_least >= rank, jnp.arange(bins), -1))
        rank = rank - (at_least[chosen] - hist[chosen])  # minus those with a larger digit
        prefix = prefix | (chosen.astype(utype) << shift)
    return prefix, rank, hist[chosen]


def _topk_mask(scores: jax.Array, k: Any, chunk: int = _CHUNK) -> jax.Array:
    """The mask of :func:`topk_mask`; ``k`` a Python int or a traced integer.

    A traced ``k`` (one compilation for every count) is clipped to ``[0, N]``; ``k <= 0``
    keeps nothing. Its temporaries are ``chunk`` entries, not ``N``.
    """
    flat = scores.reshape(-1)
    n = flat.shape[0]
    static = isinstance(k, int)
    if static and k >= n:
        return jnp.ones(scores.shape, bool)
    if static and k <= 0:
        return jnp.zeros(scores.shape, bool)
    if n == 0:  # nothing to keep, whatever a traced k is
        return jnp.zeros(scores.shape, bool)
    rank = k if static else jnp.clip(k, 0, n)
    t, need, ties = _kth_largest_key(flat, rank, chunk)
    # More keys equal t than fit: the first ``need`` of them in flat order.
    end = jax.lax.cond(
        need == ties, lambda: jnp.int32(n), lambda: _end_of_first(flat, t, need, chunk)
    )
    keys = _sortable_keys(flat)[0]  # fused into the comparisons
    mask = (keys > t) | ((keys == t) & (jnp.arange(n) < end))
    if not static:
        mask = mask & (rank > 0)
    return mask.reshape(scores.shape)


@functools.partial(jax.jit, static_argnums=1)
def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask (shape of ``scores``) with exactly ``k`` True at the largest scores.

    Ties are broken towards the lower flat index; NaN scores count as the largest (the
    smallest if their sign bit is set). Inside
    a traced function, ``_topk_mask`` takes a traced ``k`` as well.
    """
    return _topk_mask(scores, k)


def stack_slices(x: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """``x`` with its ``batch`` axes moved first and merged into one: ``(slices, *rest)``,
    slice i the i-th index over them in row-major order; :func:`unstack_slices` undoes it."""
    order = _slices_first(x.ndim, batch)
    moved = to_canonical(x, order)
    return moved.reshape(math.prod(moved.shape[: len(batch)]), *moved.shape[len(batch) :])


def unstack_slices(y: jax.Array, shape: tuple[int, ...], batch: tuple[int, ...]) -> jax.Array:
    """The array of ``shape`` whose :func:`stack_slices` is ``y`` (reshaped as needed)."""
    order = _slices_first(len(shape), batch)
    return from_canonical(y.reshape(tuple(shape[a] for a in order)), order)


def _slices_first(ndim: int, batch: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(batch) + tuple(a for a in range(ndim) if a not in batch)


#: Slices up to this many entries are selected by sorting each (every slice of a leaf at
#: once); larger ones by the radix select, one at a time on CPU, all at once (vmapped)
#: elsewhere where their digits are 8-bit. On a 2-core CPU (jit), 1000
#: slices of 16: 2.2 ms sorted, 9.6 ms by radix; of 64: 13 / 7.5 ms; 12 of 4096: 23 /
#: 0.5 ms (sorting is O(n log n) and XLA's CPU sort is slow).
_SORTED_SLICE_SIZE = 32


def sliced_mask(scores: jax.Array, density: float, batch: tuple[int, ...] = ()) -> jax.Array:
    """Keep mask of one leaf with an exact count per slice over the ``batch`` axes.

    Each slice (the entries sharing their indices on ``batch``: one layer of a scanned
    leaf) keeps ``keep_count(slice size, density)`` entries, the same mask as
    :func:`topk_mask` on that slice alone (ties to the lower flat index within it);
    ``batch=()`` is one count for the whole leaf. The count is an argument of the compiled
    selection, so a sweep over densities compiles once per leaf shape.

    Args:
      scores: the leaf's scores.
      density: fraction in (0, 1] kept per slice.
      batch: distinct axis positions indexing the slices.

    Returns:
      A boolean mask shaped like ``scores``.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging._select import sliced_mask
      >>> sliced_mask(jnp.array([[1.0, 3.0, 2.0], [6.0, 5.0, 4.0]]), 0.5, (0,)).tolist()
      [[False, True, False], [True, False, False]]
    """
    batch = tuple(batch)
    size = math.prod(n for axis, n in enumerate(scores.shape) if axis not in batch)
    k = keep_count(size, density)
    if scores.size == 0 or k >= size or k <= 0:  # nothing to select
        return jnp.full(scores.shape, k > 0, bool)
    return _sliced_mask(scores, k, batch)


@functools.partial(jax.jit, static_argnums=2)
def _sliced_mask(scores: jax.Array, k: Any, batch: tuple[int, ...]) -> jax.Array:
    """:func:`sliced_mask` keeping ``k`` (traced, in ``[1, slice size)``) per slice."""
    if not batch:
        return _topk_mask(scores, k)
    stacked = stack_slices(scores, batch)
    rows = stacked.reshape(stacked.shape[0], -1)
    if rows.shape[1] > _SORTED_SLICE_SIZE:

        def one_at_a_time() -> jax.Array:
            return jax.lax.map(lambda row: _topk_mask(row, k), rows)

        def all_at_once() -> jax.Array:  # one set of kernels for every slice, not a loop
            return jax.vmap(lambda row: _topk_mask(row, k))(rows)

        if rows.shape[1] > _NARROW_DIGITS_UP_TO:  # a 65,536-bin histogram per slice at once
            mask = one_at_a_time()
        else:  # XLA:CPU runs the loop faster (12 slices of 4096: 0.5 against 1.6 ms)
            mask = jax.lax.platform_dependent(cpu=one_at_a_time, default=all_at_once)
    else:
        keys, _, _ = _sortable_keys(rows)
        # Largest key first, equal keys in index order (a stable sort of the complement).
        rank = jnp.argsort(jnp.argsort(~keys, axis=1, stable=True), axis=1)
        mask = rank < k
    return unstack_slices(mask, scores.shape, batch)


def global_masks(scores: list[jax.Array], k: int) -> list[jax.Array]:
    """Masks keeping exactly ``k`` entries over all the score leaves together (``k`` an
    argument of the compiled selection: one compilation per list of shapes)."""
    total = sum(s.size for s in scores)
    if k >= total or k <= 0:
        return [jnp.full(s.shape, k > 0, bool) for s in scores]
    return _global_masks(scores, k)


@jax.jit
def _global_masks(scores: list[jax.Array], k: Any) -> list[jax.Array]:
    dtype = jnp.result_type(*[s.dtype for s in scores])
    flat = jnp.concatenate([s.reshape(-1).astype(dtype) for s in scores])
    mask = _topk_mask(flat, k)
    out, start = [], 0
    for s in scores:
        out.append(mask[start : start + s.size].reshape(s.shape))
        start += s.size
    return out
