"""Subspace merges: TSV-Merge (Task Singular Vectors) and isotropic merging (Iso-C, Iso-CTS).

Each works on the singular value decompositions of the task vectors ``Δ_t = w_t − w0``,
one matrix at a time, and follows the authors' code as FusionBench packages it
(``fusion_bench/method/task_singular_vector``, ``fusion_bench/method/isotropic_merging``);
differences are listed in each docstring. Shared rules:

- *Matrices*: every leaf with two or more axes is a stack of matrices over its last two
  axes, each merged on its own (a 2-D kernel is one matrix; a scanned ``(L, m, n)`` leaf
  L of them; a convolution kernel ``(kh, kw, d_in, d_out)`` kh·kw of them; embedding
  tables too), except the 3-axis kernels of Flax attention projections, each one matrix
  as PyTorch stores it: ``query``/``key``/``value`` ``(in, heads, head_dim)`` as
  ``(in, heads · head_dim)``, ``out`` ``(heads, head_dim, out)`` as
  ``(heads · head_dim, out)`` (``umtam_jax.optimizer._attention.attention_rows``; per layer
  of a scanned model with ``scope=umtam_jax.scanned(...)``), and a query/key/value
  ``(heads, head_dim)`` bias, one vector. FusionBench merges 2-D
  tensors only, averaging the rest and the keys in its ``exclude_keys`` (which has no
  counterpart here). The SVD is taken of the matrix as
  stored; TSV-Merge and Iso-C are invariant under transposing it, Iso-CTS takes the layout
  as a parameter. A stack whose layer axis is not first (MaxText's ``[d_in, L, d_out]``)
  is merged per matrix of its last two axes like any other leaf, which is not per layer:
  ``scope=umtam_jax.scanned("blocks", axis=1)`` merges each layer as a leaf of its own.
- *Other leaves* (biases, norms, scalars): ``w0 + scaling · (1/T) Σ_t Δ_t``, the mean task
  vector, as FusionBench and the authors' code do.
- *Numerics*: computed in float32 at least (16-bit inputs cast back), per leaf and
  jit-compatible (``scaling`` may be traced; the fractions, which set shapes, may not).
  Singular values ``≤ ε · (max(m, n) · σ₁ + ρ)`` count as zero and their directions are
  dropped (ε the machine epsilon of the compute dtype, σ₁ the largest singular value of
  the matrix decomposed, ρ the scale of the rounding that formed it: ``Σ_t ‖Δ_t‖_F`` for
  the sum of the task vectors, ``max(m, n) · Σ_t ‖Δ_t‖_F`` for a task vector less its
  common part (the error of the common basis, from the SVD of the sum), 0 for a task
  vector itself): a rank-deficient input then has a deterministic result instead
  of arbitrary null-space vectors. The first term is NumPy's ``matrix_rank`` tolerance,
  so a direction is only dropped where the SVD cannot tell it from zero.
  Orthogonalisation is the polar factor ``P Qᵀ`` of ``X = P S Qᵀ`` over the directions
  with ``s > max(shape) · ε · s_max``, i.e. ``X ((XᵀX)⁺)^{1/2}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax._precision import full_precision
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import compute_dtype, scaled_norm, sum_terms
from umtam_jax.merging._interpolation import _traced
from umtam_jax.merging._registry import SCALING, Param
from umtam_jax.optimizer._layout import RowAxesFn


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _deltas(base: jax.Array, ws: list[jax.Array], dt: jnp.dtype) -> jax.Array:
    """The task vectors as one stack of matrices ``(T, B, m, n)`` (a leaf with ≥ 2 axes)."""
    b = base.astype(dt).reshape((-1, *base.shape[-2:]))
    return jnp.stack([w.astype(dt).reshape(b.shape) - b for w in ws])


def _finish(base: jax.Array, delta: jax.Array, scaling: Any, dt: jnp.dtype) -> jax.Array:
    """``w0 + scaling · Δ`` in the base's shape and dtype."""
    out = base.astype(dt) + jnp.asarray(scaling, dt) * delta.reshape(base.shape)
    return out.astype(base.dtype)


def _mean_leaf(base: jax.Array, ws: list[jax.Array], scaling: Any) -> jax.Array:
    """A non-matrix leaf: ``w0 + scaling · (1/T) Σ_t Δ_t``."""
    dt = compute_dtype(base)
    b = base.astype(dt)
    return _finish(base, sum_terms([w.astype(dt) - b for w in ws]) / len(ws), scaling, dt)


def _frobenius_sum(deltas: jax.Array) -> jax.Array:
    """``Σ_t ‖Δ_t‖_F`` per matrix ``(B,)``: the scale of the rounding of ``Σ_t Δ_t``
    (norms that do not overflow for float32 entries beyond ~1e19)."""
    return jnp.sum(scaled_norm(deltas, axis=(-2, -1)), 0)


def _numerical_zeros(s: jax.Array, shape: tuple[int, ...], rounding: Any) -> jax.Array:
    """Which singular values ``s (…, B, r)`` (descending) of matrices of ``shape`` are
    zero to working precision: at most ``ε · (max(m, n) · σ₁ + rounding)``, the SVD's own
    error (NumPy's ``matrix_rank`` tolerance) plus that of forming the matrix (``rounding``
    per matrix, ``(…, B)``: ``Σ_t ‖Δ_t‖_F`` for a sum of task vectors, 0 for an input)."""
    eps = jnp.finfo(s.dtype).eps
    cutoff = eps * (max(shape[-2:]) * s[..., 0] + rounding)
    return s <= cutoff[..., None]


def _polar(x: jax.Array) -> jax.Array:
    """The polar factor ``P Qᵀ`` of ``x = P S Qᵀ`` over its nonzero singular values."""
    p, s, qh = jnp.linalg.svd(x, full_matrices=False)
    keep = ~_numerical_zeros(s, x.shape, 0.0)
    return (p * keep[..., None, :]) @ qh


def _top(d: jax.Array, k: int, rounding: Any = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top ``k`` singular triplets of each matrix ``(..., B, m, n)``, zero-valued ones
    (:func:`_numerical_zeros`, with ``rounding``) set to zero: ``U (..., B, m, k)``,
    ``σ (..., B, k)``, ``Vᵀ (..., B, k, n)``."""
    u, s, vh = jnp.linalg.svd(d, full_matrices=False)
    keep = ~_numerical_zeros(s, d.shape, rounding)[..., :k]
    u, vh = u[..., :k] * keep[..., None, :], vh[..., :k, :] * keep[..., None]
    return u, jnp.where(keep, s[..., :k], 0), vh


def _tasks_side_by_side(u, s, vh):
    """Per-task triplets ``(T, B, …)`` concatenated along the rank: ``[U_1 … U_T]``."""
    t, b, m, k = u.shape
    u = jnp.moveaxis(u, 0, -2).reshape(b, m, t * k)
    s = jnp.moveaxis(s, 0, -2).reshape(b, t * k)
    return u, s, vh.swapaxes(0, 1).reshape(b, t * k, -1)


# --------------------------------------------------------------------------- TSV-Merge


def tsv_merge(
    base: Any,
    experts: Sequence[Any],
    *,
    scaling: float = 1.0,
    rank_fraction: float = 1.0,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """TSV-Merge: each task's top singular vectors, decorrelated across tasks, per matrix.

    For each matrix (``r = min(m, n)``, ``T`` experts), each task vector is truncated to
    its top ``k = max(1, ⌊r · rank_fraction / T⌋)`` singular triplets,
    ``Δ_t ≈ U_t Σ_t V_tᵀ``; they are concatenated, ``U = [U_1 … U_T]``,
    ``Σ = diag(Σ_1 … Σ_T)``, ``V = [V_1 … V_T]``, and the singular vectors of different
    tasks decorrelated by whitening (the paper's orthogonal Procrustes step)::

        U⊥ = U (UᵀU)^{-1/2} = P_U Q_Uᵀ,   V⊥ = V (VᵀV)^{-1/2} = P_V Q_Vᵀ
        Δ = U⊥ Σ V⊥ᵀ,   merged = w0 + scaling · Δ

    with ``U = P_U S_U Q_Uᵀ`` the SVD (likewise ``V``). Task vectors whose singular
    subspaces are already orthogonal across tasks are merged as the sum of their rank-k
    truncations; one expert at ``rank_fraction=1`` is task arithmetic. Other leaves:
    ``w0 + scaling · mean_t Δ_t``. The paper and FusionBench use ``k = ⌊r/T⌋`` (here
    ``rank_fraction=1``), which is 0 when ``T > r`` (FusionBench's merge of such a matrix
    is then 0; here each task keeps one direction).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      scaling: factor α on the merged task vector (FusionBench's ``alpha``; the paper
        finds 1.0 needs no tuning).
      rank_fraction: fraction in (0, 1] of each matrix's rank shared by the tasks (a
        Python number: it sets shapes).
      scope: ``"tensor"`` (each leaf's stack of matrices over its last two axes) or
        ``"layer"`` / a layout such as ``umtam_jax.scanned("blocks", axis=1)``: each slice
        over the batch axes merged as a tensor of its own (a ``[d_in, L, d_out]`` stack
        as its L matrices).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs (messages name the leaf path) or options.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> experts = [{"w": jnp.array([[2., 0.], [0., 0.]])}, {"w": jnp.array([[0., 0.], [0., 3.]])}]
      >>> merging.tsv_merge(base, experts)["w"].round(5).tolist()
      [[2.0, 0.0], [0.0, 3.0]]

    References:
      Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
      Merging", CVPR 2025, arXiv:2412.00081; FusionBench ``TaskSingularVectorMerging``.
    """
    return pipeline.merge(
        TSV_MERGE, base, experts, None, scaling=scaling, rank_fraction=rank_fraction, scope=scope
    )


def tsv_rank(r: int, rank_fraction: float, t: int) -> int:
    """Each task's kept rank ``max(1, ⌊r · rank_fraction / T⌋)``, the product rounded to 9
    decimals before the floor, so that a fraction written in decimal counts as itself
    (``0.6``, whose binary value is just below it: r = 10, T = 3 keep 2, not 1) and
    ``⌊r/T⌋`` is exact (FusionBench's ``int(r * (1 / T))`` loses one at r = 98, T = 49).

    Example:
      >>> from umtam_jax.merging._subspace import tsv_rank
      >>> tsv_rank(10, 0.6, 3), tsv_rank(98, 1.0, 49), tsv_rank(4, 1.0, 9)
      (2, 2, 1)
    """
    return max(1, math.floor(round(r * rank_fraction / t, 9)))


@full_precision
@functools.partial(jax.jit, static_argnames="k")
def _tsv_leaf(base: jax.Array, ws: list[jax.Array], scaling: Any, k: int):
    """One leaf of :func:`tsv_merge`, ``k`` directions per task (:func:`_tsv_kernel`)."""
    if base.size == 0:
        return base
    if base.ndim < 2:
        return _mean_leaf(base, ws, scaling)
    dt = compute_dtype(base)
    deltas = _deltas(base, ws, dt)
    u, s, vh = _tasks_side_by_side(*_top(deltas, k))
    return _finish(base, (_polar(u) * s[:, None, :]) @ _polar(vh), scaling, dt)


# --------------------------------------------------------------------------- registry


def _tsv_kernel(opts, b, ws, masks, scores, extras):
    # The static rank, not the fraction: fractions giving one rank share a compilation.
    k = tsv_rank(min(b.shape[-2:]), opts["rank_fraction"], len(ws)) if b.ndim >= 2 else 0
    return _tsv_leaf(b, ws, opts["scaling"], k=k)


def _static_fraction(name: str):
    def check(call: pipeline.Call) -> None:
        value = call.options[name]
        if _traced(value):
            raise TypeError(f"{name} must be a Python number, not traced: it sets shapes")
        call.options[name] = float(value)

    return check


TSV_MERGE = R.register(
    R.Method(
        "tsv_merge",
        tsv_merge,
        "per matrix, each task vector's top singular vectors (rank/T each), "
        "orthogonalised across tasks (TSV-Merge)",
        (
            SCALING,
            Param(
                "rank_fraction",
                "number",
                "fraction of each matrix's rank the tasks share (k = rank·fraction/T each)",
                low=0,
                high=1,
                low_open=True,
            ),
            R.SLICES,
        ),
        _tsv_kernel,
        matrices=True,
        check=_static_fraction("rank_fraction"),
    )
)
