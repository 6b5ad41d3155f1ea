"""Orthonormal bases of thin matrices, several at once (docs/algorithm.md §2.5): the
range finder's orthonormalisations.

Performance note (CPU). jaxlib runs LAPACK through SciPy's OpenBLAS, whose own threads
compete with XLA's thread pool: on a loaded 2-core machine a thin Householder QR of a
3072×32 matrix, or an SVD of a 32×3072 one, was measured at 40 ms to 1.3 s, against
~0.2 ms for the matmuls that replace it here. The decompositions' fast path therefore
touches LAPACK only for r×r matrices (symmetric eigendecompositions and one SVD,
which OpenBLAS runs single-threaded) and does the m×r / n×r work with XLA matmuls, for
any sketch, rank-deficient ones included: no conditional chooses a slower method (a
conditional is a wait for the device on a GPU). Only a matrix with fewer than twice as
many rows as columns (wide ones included) gets a Householder QR, chosen by its shape.

On CPU, where a conditional that skips work costs nothing, tall matrices take two
unshifted Gram passes, and the three passes only when those report an inaccurate basis
(:func:`_orthonormalize_tall_checked`): ~10 ms less per default update at 28.4M parameters
(docs/performance.md). GPU/TPU and explicitly sharded arrays always take the three
conditional-free passes, :func:`_orthonormalize_tall`.
"""

from __future__ import annotations

import math
import typing

import jax
import jax.numpy as jnp

from umtam_jax._precision import full_precision
from umtam_jax.optimizer import _sharding


def _householder(y: jax.Array) -> jax.Array:
    # LAPACK needs the thin y whole: gather it (m×k, never m×n) and shard q back like y.
    q, _ = jnp.linalg.qr(_sharding.replicate(y))
    return _sharding.reshard_like(q, _sharding.explicit_spec(y))


def _batch_size(x: jax.Array) -> int:
    """How many matrices ``x`` holds (1 for a matrix, the product of its leading axes for
    a stack)."""
    return math.prod(x.shape[:-2])


def unstack(flat: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
    """Splits ``flat`` (the entries of several stacks of matrices, one after another along
    axis 0: matrices, vectors, ...) back into arrays with the leading axes of ``like``'s
    members."""
    out, start = [], 0
    for x in like:
        size = _batch_size(x)
        part = flat[start : start + size].reshape(x.shape[:-2] + flat.shape[1:])
        # Under Explicit sharding, partitioned on the stacking axes as ``x`` is (flat_stack
        # may have gathered the stack).
        spec = _sharding.explicit_spec(x)
        if spec is not None:
            batch = spec[: x.ndim - 2]
            part = _sharding.reshard_like(part, batch + (None,) * (part.ndim - len(batch)))
        out.append(part)
        start += size
    return out


def flat_stack(xs: list[jax.Array]) -> jax.Array:
    """The matrices of ``xs`` (matrices or stacks of them) as one stack, in order.

    Under Explicit sharding, stacks partitioned differently (a layer-stacked leaf sharded
    on its layer axis beside a single matrix) cannot be concatenated as they are: they are
    gathered first. The callers stack small matrices there (k×k Gram matrices and cores),
    never an m×n one; :func:`unstack` partitions each part like its input again.
    """
    flats = [x.reshape((-1,) + x.shape[-2:]) for x in xs]
    if len({_sharding.explicit_spec(x) for x in flats}) > 1:
        flats = [_sharding.replicate(x) for x in flats]
    return jnp.concatenate(flats)


def _gram_eigh(ys: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and eigenvectors of every ``yᵀy``, the k×k decompositions of
    all matrices as one batched call (stacks flattened: one row per matrix)."""
    return jnp.linalg.eigh(flat_stack([_sharding.matmul(y.mT, y) for y in ys]))


def _times(ys: list[jax.Array], small: jax.Array) -> list[jax.Array]:
    """``y @ s`` for every ``y``, with ``small`` the k×k matrices of all of them (flat)."""
    return [y @ s for y, s in zip(ys, unstack(small, ys), strict=True)]


def _unit_peak(y: jax.Array) -> jax.Array:
    """``y`` divided by each matrix's ``max|y|`` (unless that is 0 or not finite): its Gram
    matrix can then neither overflow nor underflow."""
    peak = jnp.max(jnp.abs(y), axis=(-2, -1), keepdims=True)
    usable = jnp.isfinite(peak) & (peak > 0)
    return y * (1.0 / jnp.where(usable, peak, 1.0))


def _fill_columns(like: jax.Array) -> jax.Array:
    """Fixed, pseudo-random columns of norm ~1, shaped and sharded like ``like``: the
    directions that complete a basis where the input spans fewer than k.

    A hash of the row and column index computed in the step (a few integer operations per
    entry, which XLA computes once per shape; a constant of the sketch's size, 6 MB for a
    50257-row embedding, would be baked into the program instead).
    """
    m, k = like.shape[-2:]
    row = jax.lax.broadcasted_iota(jnp.uint32, (m, k), 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, (m, k), 1)
    h = row * jnp.uint32(0x9E3779B1) + col * jnp.uint32(0x85EBCA77)
    h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
    h = h ^ (h >> 13)
    # Uniform in [-1/2, 1/2): variance 1/12, so columns of norm ~1 after √(12/m).
    x = (h.astype(jnp.float32) * 2.0**-32 - 0.5) * math.sqrt(12.0 / m)
    x = x.astype(like.dtype)
    return _sharding.reshard_like(jnp.broadcast_to(x, like.shape), _sharding.explicit_spec(like))


#: Matrices with fewer rows than this many times their columns (wide ones included) get a
#: Householder QR: fill columns projected into a complement of few dimensions can be too
#: ill-conditioned for one Gram pass. The optimizer's sketches have ≥ 4 rows per column
#: at the defaults (``rank=32``, ``min_dim_size_to_factor=128``).
_MIN_ROWS_PER_COLUMN = 2

#: Below this eigenvalue of the second Gram matrix (whose largest is ~1) a direction holds
#: no more of the input than rounding and is replaced by a fill column.
_NULL_EIGENVALUE = 1e-6


def _orthonormalize_tall(ys: list[jax.Array]) -> list[jax.Array]:
    """Orthonormal bases of tall matrices of one width k, without a conditional.

    Three Gram (Löwdin) passes ``Q = Z W Λ^{-1/2}`` from the k×k eigendecompositions
    ``ZᵀZ = W Λ Wᵀ``, each one batched over all matrices:

    1. on ``y`` scaled to a unit peak, with the eigenvalues shifted by ``eps · λ_max``:
       ``Z₁ = y W (Λ + s)^{-1/2}`` spans exactly what ``y`` spans, and every direction of
       ``y`` above ~``√s`` comes out with norm ~1, the weaker ones scaled up by ``1/√s``;
    2. on ``Z₁``, unshifted: directions whose eigenvalue is below
       :data:`_NULL_EIGENVALUE` hold nothing but rounding (``y`` is rank-deficient there)
       and become fixed pseudo-random columns projected off the others;
    3. on that well-conditioned matrix, which restores orthogonality to rounding level.

    A well-conditioned ``y`` gets an orthonormal basis of exactly its span, as two passes
    give; an ill-conditioned (tested to condition 1e12) or rank-deficient one keeps its span
    to ~1e-6, completed by the fill directions, as a Householder QR would complete it with
    directions of its own. Two limits: a sketch whose span holds fill columns themselves
    (which would take a sketch built from this hash) gets a basis that is not orthonormal in
    those directions; subnormal entries count as zero (XLA flushes them), so a sketch
    entirely below ~1e-38 in float32 gets the fill directions. A NaN or infinite entry
    makes its matrix's basis NaN.
    """
    eps = float(jnp.finfo(ys[0].dtype).eps)
    tiny = float(jnp.finfo(ys[0].dtype).tiny)
    scaled = [_unit_peak(y) for y in ys]
    lam, w = _gram_eigh(scaled)
    shift = jnp.maximum(eps * lam[:, -1:], tiny)
    first = _times(scaled, w * jax.lax.rsqrt(jnp.maximum(lam, 0.0) + shift)[:, None, :])
    lam, w = _gram_eigh(first)
    kept = lam > _NULL_EIGENVALUE
    inverse_root = jnp.where(kept, jax.lax.rsqrt(jnp.maximum(lam, _NULL_EIGENVALUE)), 0.0)
    second = _times(first, w * inverse_root[:, None, :])
    filled = []
    for q, keep in zip(second, unstack(kept[:, None, :], second), strict=True):
        # One projection: the third pass needs the fill columns independent of q's, not
        # orthogonal to them.
        fill = _fill_columns(q)
        fill = fill - q @ _sharding.matmul(q.mT, fill)
        filled.append(jnp.where(keep, q, fill))
    return _lowdin_pass(filled)[0]


def _lowdin_pass(ys: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    """One Gram (Löwdin) pass ``y W Λ^{-1/2}`` for every ``y``, the eigenvalues floored at
    ``eps · λ_max``. Returns the new matrices and the eigenvalues (one row per matrix)."""
    lam, w = _gram_eigh(ys)
    info = jnp.finfo(ys[0].dtype)
    floor = jnp.maximum(float(info.eps) * lam[:, -1:], float(info.tiny))
    return _times(ys, w * jax.lax.rsqrt(jnp.maximum(lam, floor))[:, None, :]), lam


#: The second pass's Gram eigenvalues of an accurate basis lie near 1; outside these bounds
#: the first pass lost directions to rounding (condition beyond ~1e3–1e4 in float32, rank
#: deficiency) and :func:`_orthonormalize_tall_checked` takes the three passes instead.
_ACCURATE_EIGENVALUES = (0.05, 20.0)


def _orthonormalize_tall_checked(ys: list[jax.Array]) -> list[jax.Array]:
    """Orthonormal bases of tall matrices of one width k, the CPU path: two unshifted
    Löwdin passes (the eigenvalue analogue of CholeskyQR2), and, through ``lax.cond`` only
    when a basis is not accurate (eigenvalues of the second Gram matrix outside
    :data:`_ACCURATE_EIGENVALUES`, a zero or non-finite input, a Gram matrix that under- or
    overflows), :func:`_orthonormalize_tall` for the matrices that need it. The others keep
    their two-pass basis, so a matrix's result does not depend on its group.

    The fallback is the conditional-free passes rather than a Householder QR: LAPACK's QR
    of an m×k matrix is slow here (see the module's note), and a leaf whose momentum is
    zero or rank-deficient (a parameter the loss does not use) takes the fallback every
    step. The sketches are not first scaled to a unit peak: on the 2-core CPU of
    docs/performance.md that scaling alone cost ~7 ms per default update at 28.4M
    parameters (~120 more kernels), and the inputs it protects take the fallback here.
    """
    first, lam_first = _lowdin_pass(ys)
    second, lam_second = _lowdin_pass(first)
    low, high = _ACCURATE_EIGENVALUES
    finite = jnp.concatenate([jnp.isfinite(q).all(axis=(-2, -1)).reshape(-1) for q in second])
    accurate = finite & (lam_first[:, -1] > 0) & (lam_second[:, 0] > low)
    accurate = accurate & (lam_second[:, -1] < high)

    def fallback():
        keep = unstack(accurate[:, None, None], second)
        pairs = zip(keep, second, _orthonormalize_tall(ys), strict=True)
        return [jnp.where(k, q, completed) for k, q, completed in pairs]

    return jax.lax.cond(jnp.all(accurate), lambda: second, fallback)


def group_by_width(ys: list[jax.Array]) -> dict[tuple, list[int]]:
    """Indices of ``ys`` grouped by width and dtype: the matrices whose k×k work batches."""
    groups: dict[tuple, list[int]] = {}
    for i, y in enumerate(ys):
        groups.setdefault((y.shape[-1], jnp.dtype(y.dtype)), []).append(i)
    return groups


def _orthonormalize_tall_stacked(ys: list[jax.Array]) -> list[jax.Array]:
    """:func:`_orthonormalize_tall` with the equally shaped matrices of ``ys`` stacked, so
    that each pass runs one product per shape rather than one per matrix (a model with one
    leaf per layer: one per weight kind, not per layer and kind). The stacks copy thin
    matrices only (m×k, not m×n); each matrix's basis is the one it gets alone."""
    by_rows: dict[int, list[int]] = {}
    for i, y in enumerate(ys):
        by_rows.setdefault(y.shape[-2], []).append(i)
    members = list(by_rows.values())
    stacks = [flat_stack([ys[i] for i in m]) if len(m) > 1 else ys[m[0]] for m in members]
    out: list[jax.Array] = list(ys)
    for m, q in zip(members, _orthonormalize_tall(stacks), strict=True):
        parts = unstack(q, [ys[i] for i in m]) if len(m) > 1 else [q]
        for i, part in zip(m, parts, strict=True):
            out[i] = part
    return out


@full_precision
def orthonormalize_many(ys: list[jax.Array]) -> list[jax.Array]:
    """:func:`orthonormalize` of several matrices at once.

    Tall matrices of the same width share their small linear algebra: one batched ``eigh``
    per Gram pass for all of them, instead of one per matrix (on a GPU every small
    ``eigh`` is a library call: an H100 spent ~30 ms of a 35 ms UMTAM step in 64 separate
    32×32 ``eigh`` and 16 SVDs; on a CPU each one is a separate, mostly serial task). Off
    CPU no step depends on the data through a conditional, and equally shaped matrices
    are also stacked for their thin products. Results are those of
    :func:`orthonormalize` applied to each matrix.
    """
    out: list[jax.Array | None] = [None] * len(ys)
    tall = []
    for i, y in enumerate(ys):
        if y.shape[-2] < _MIN_ROWS_PER_COLUMN * y.shape[-1]:
            out[i] = _householder(y)
        else:
            tall.append(i)
    for index in group_by_width([ys[i] for i in tall]).values():
        index = [tall[j] for j in index]
        group = [ys[i] for i in index]
        if any(_sharding.explicit_spec(y) is not None for y in group):
            qs = _orthonormalize_tall(group)
        else:
            qs = jax.lax.platform_dependent(
                group, cpu=_orthonormalize_tall_checked, default=_orthonormalize_tall_stacked
            )
        for i, q in zip(index, qs, strict=True):
            out[i] = q
    return typing.cast(list[jax.Array], out)  # every index is filled above


def orthonormalize(y: jax.Array) -> jax.Array:
    """An orthonormal basis of the column space of ``y`` (m×k; k columns when k ≤ m).

    For a tall ``y`` (2k rows or more), three Gram-matrix (Löwdin) passes,
    ``Q = Z W Λ^{-1/2}`` from the k×k eigendecomposition ``ZᵀZ = W Λ Wᵀ`` (the eigenvalue
    analogue of CholeskyQR; see :func:`_orthonormalize_tall`): thin matmuls and three k×k
    ``eigh``, no LAPACK call of size m and no conditional, for any input: ill-conditioned,
    rank-deficient and zero ones get a basis holding their span, completed by fixed fill
    directions. On CPU two unshifted passes, and the three where those are not accurate
    (:func:`_orthonormalize_tall_checked`). A wide ``y`` (k > m) gets its Householder QR
    (m columns), and so does one with fewer than 2k rows (k columns). Either way
    decompositions built on it agree with the Householder-based ones up to rounding.
    """
    return orthonormalize_many([y])[0]
