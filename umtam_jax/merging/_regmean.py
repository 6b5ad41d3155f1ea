"""RegMean: merging linear layers by their inputs' Gram matrices.

RegMean (Jin et al. 2023) merges each linear layer ``y = x W`` (Flax layout: ``W`` is
``(d_in, d_out)``) so that the merged layer's outputs stay closest, in least squares, to
every expert's outputs on that expert's own inputs ``X_i``::

    W* = argmin_W Σ_i ‖X_i W − X_i W_i‖²  =  (Σ_i G_i)⁻¹ Σ_i G_i W_i,   G_i = X_iᵀ X_i.

The Gram matrices ``G_i`` are the only statistics of the data that merging needs (they do
not reveal the examples). Their off-diagonal entries are shrunk, ``G̃_i = α G_i +
(1 − α) diag(G_i)``, which regularises the solve and interpolates between the exact
solution (``α = 1``) and a per-input-feature weighted average (``α = 0``). Leaves without a
Gram (biases, norms, embeddings) are averaged. :func:`umtam_jax.merging.input_grams`
collects the Grams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax import _pytrees
from umtam_jax._precision import at_least_float32
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._registry import WEIGHTS, Param

_HIGHEST = jax.lax.Precision.HIGHEST


def regmean(
    base: Any,
    experts: Sequence[Any],
    grams: Sequence[Any],
    *,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
) -> Any:
    """RegMean: each linear layer's least-squares merge given its inputs' Gram matrices.

    For every leaf ``W`` of shape ``(..., d_in, d_out)`` with Grams ``G_i`` of shape
    ``(..., d_in, d_in)`` (leading axes: stacked layers, e.g. a scanned model)::

        G̃_i = α G_i + (1 − α) diag(G_i)
        W*  = (Σ_i c_i G̃_i)⁻¹ Σ_i c_i G̃_i W_i

    solved with ``jnp.linalg.solve`` in float32 at least (16-bit leaves are computed in
    float32 and cast back). ``c_i`` are the expert weights (default 1); a weight scales an
    expert's Gram, as if it had seen ``c_i`` times the data. Leaves without Grams get the
    weighted average ``Σ c_i W_i / Σ c_i``. An input feature that is zero in every
    expert's data (a zero diagonal entry of ``Σ c_i G̃_i``) leaves its row of ``W``
    undetermined; that row gets the weighted average too. With ``α = 1`` the Grams must be
    invertible together (fewer examples than ``d_in`` are not enough); any ``α < 1`` makes
    them so when every feature is seen.

    RegMean needs no base: with ``base=None`` the experts are merged directly; with a base
    the same solution is computed on task vectors, ``w0 + (Σ c G̃)⁻¹ Σ c G̃ (W_i − w0)``
    (identical in exact arithmetic, better conditioned in floating point), and the result
    takes the base's structure and dtypes.

    Args:
      base: the shared initial parameters, or ``None``.
      experts: a sequence of parameter pytrees with a common structure, shapes and dtypes.
      grams: one pytree per expert holding the Gram matrix ``X_iᵀ X_i`` of a leaf's
        inputs at that leaf's path (shape ``kernel.shape[:-1] + (d_in,)``; for a kernel
        with three or more axes whose first axes are its inputs, a ``DenseGeneral``
        kernel such as an attention projection's, ``(F, F)`` with ``F`` their product,
        the kernel then merged as one ``(F, ·)`` matrix) and ``None`` (or nothing) at the
        other paths, e.g. from :func:`input_grams`. Every expert must give Grams for the
        same leaves.
      alpha: the factor ``α`` in [0, 1] on the Grams' off-diagonal entries (FusionBench's
        ``reduce_non_diagonal_ratio``).
      weights: one non-negative weight per expert, with a positive sum (default 1.0 each).

    Returns:
      The merged parameters, a pytree like the base (the first expert when ``base=None``).

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path and the expert
        (``grams[1]['layer']['kernel']: expected shape (4, 4), got (5, 5)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([[1.0], [0.0]])}, {"w": jnp.array([[0.0], [1.0]])}]
      >>> grams = [{"w": jnp.diag(jnp.array([3.0, 0.0]))}, {"w": jnp.diag(jnp.array([1.0, 2.0]))}]
      >>> merging.regmean(None, experts, grams)["w"].tolist()  # row 1: feature 1 only in expert 1
      [[0.75], [1.0]]

    References:
      Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of
      Language Models", ICLR 2023, arXiv:2212.09849.
    """
    return pipeline.merge(REGMEAN, base, experts, grams, alpha=alpha, weights=weights)


# --------------------------------------------------------------------------- validation


def gram_leaves(tree: Any, prepared: V.Prepared, what: str) -> list[jax.Array | None]:
    """One expert's Grams, aligned with the base's leaves (None where a leaf has none).

    Raises:
      ValueError / TypeError: a Gram at a path the base lacks, not a floating array, of
        the wrong shape or not finite; messages name ``what`` and the leaf path.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_pytrees.is_none_or_variable)
    index = {path: j for j, path in enumerate(prepared.paths)}
    out: list[Any] = [None] * len(prepared.paths)
    for keypath, x in flat:
        x = _pytrees.unwrap(x)
        if x is None:
            continue
        path = jax.tree_util.keystr(keypath)
        if path not in index:
            raise ValueError(f"{what}{path}: the base has no leaf {path} for this Gram")
        if not V.is_array(x):
            raise TypeError(f"{what}{path} is a {type(x).__name__}, not an array")
        V.float_dtype(x.dtype, path, what)
        w = prepared.base[index[path]]
        if w.ndim < 2:
            raise ValueError(
                f"{what}{path}: a Gram needs a kernel of shape (..., d_in, d_out), but the "
                f"leaf has shape {tuple(w.shape)}"
            )
        expected = (*w.shape[:-1], w.shape[-2])
        if tuple(x.shape) != expected and general_rows(w.shape, x.shape) is None:
            general = ""
            if w.ndim > 2:
                sizes = sorted({math.prod(w.shape[:r]) for r in range(1, w.ndim)})
                general = f", or (F, F) for F in {sizes} (its first axes as its inputs)"
            raise ValueError(
                f"{what}{path}: expected shape {expected} (the inputs' Gram of a kernel of "
                f"shape {tuple(w.shape)}, one per matrix of its last two axes){general}, got "
                f"{tuple(x.shape)}"
            )
        out[index[path]] = V.as_array(x)
    V.check_finite(
        [(f"{what}{p}", g) for p, g in zip(prepared.paths, out, strict=True) if g is not None]
    )
    return out


def general_rows(kernel: tuple[int, ...], gram: tuple[int, ...]) -> int | None:
    """The number of leading axes of a kernel with three or more axes that are the inputs
    of its ``(F, F)`` Gram (a ``DenseGeneral`` kernel ``(*in, *out)``, e.g. an attention
    projection's), the fewest that multiply to ``F``; None for any other Gram."""
    if len(kernel) < 3 or len(gram) != 2 or gram[0] != gram[1]:
        return None
    return next((r for r in range(1, len(kernel)) if math.prod(kernel[:r]) == gram[0]), None)


def _check(call: pipeline.Call) -> None:
    """Every expert has Grams at the same leaves; concrete weights are usable."""
    assert call.extras is not None  # plan requires RegMean's grams
    first = call.extras[0]
    for i, leaves in enumerate(call.extras[1:], start=1):
        for path, g0, g in zip(call.prepared.paths, first, leaves, strict=True):
            if (g0 is None) != (g is None):
                given, lacking = (0, i) if g is None else (i, 0)
                raise ValueError(
                    f"grams[{lacking}]{path} is missing while grams[{given}]{path} is given: "
                    "every expert needs a Gram at the same leaves"
                )
            if g is not None and tuple(g.shape) != tuple(g0.shape):
                raise ValueError(
                    f"grams[{i}]{path} has shape {tuple(g.shape)} but grams[0]{path} has "
                    f"{tuple(g0.shape)}: every expert's Gram of a leaf has one form"
                )
    V.check_convex_weights(call.options["weights"])
    _check_diagonals(call)


def _check_diagonals(call: pipeline.Call) -> None:
    """A concrete Gram with a negative diagonal entry is no ``Xᵀ X`` (whose diagonal holds
    sums of squares): its solve would be meaningless, so it is refused, naming it."""
    assert call.extras is not None  # plan requires RegMean's grams
    diagonals = [
        (f"grams[{i}]{path}'s diagonal", jnp.diagonal(g, axis1=-2, axis2=-1))
        for i, leaves in enumerate(call.extras)
        for path, g in zip(call.prepared.paths, leaves, strict=True)
        if g is not None
    ]
    V.check_non_negative(diagonals, "a Gram matrix Xᵀ X has none below 0 (sums of squares)")


# --------------------------------------------------------------------------- kernel


def _normal_equations(base, ws, grams, weights, alpha):
    """``w0``, the weighted mean task vector, and the system ``lhs · Δ = rhs`` of a leaf
    with Grams (traced helper)."""
    dt = at_least_float32(base.dtype)
    if grams[0] is not None:
        dt = jnp.promote_types(dt, grams[0].dtype)
    w0 = base.astype(dt)
    c = [jnp.asarray(ci, dt) for ci in weights]
    deltas = [w.astype(dt) - w0 for w in ws]
    mean = sum(ci * d for ci, d in zip(c, deltas, strict=True)) / sum(c)
    if grams[0] is None:
        return w0, mean, None, None
    n = base.shape[-2]
    shrink = alpha + (1 - alpha) * jnp.eye(n, dtype=dt)  # α off the diagonal, 1 on it
    tilde = [ci * g.astype(dt) * shrink for ci, g in zip(c, grams, strict=True)]
    lhs = sum(tilde)
    rhs = sum(jnp.matmul(g, d, precision=_HIGHEST) for g, d in zip(tilde, deltas, strict=True))
    # A feature no expert saw has a zero row and column in every (PSD) Gram: its row of the
    # solution is free, so it is pinned to the weighted average (1 on the diagonal).
    unseen = jnp.diagonal(lhs, axis1=-2, axis2=-1) == 0
    lhs = lhs + jnp.eye(n, dtype=dt) * unseen[..., None, :]
    return w0, mean, lhs, jnp.where(unseen[..., :, None], mean, rhs)


@jax.jit
def _regmean_leaf(base, ws, grams, weights, alpha):
    w0, mean, lhs, rhs = _normal_equations(base, ws, grams, weights, alpha)
    if lhs is None or lhs.shape[-1] == 0:  # no Grams, or no input features: nothing to solve
        return (w0 + mean).astype(base.dtype)
    lu, pivots = jax.scipy.linalg.lu_factor(lhs)
    delta = jax.scipy.linalg.lu_solve((lu, pivots), rhs)
    # A sum singular to working precision (fewer examples than features with alpha = 1)
    # leaves a pivot at rounding level, and a finite but meaningless solution: NaN, so the
    # merge's finiteness check names the leaf and explains (_explain).
    u = jnp.abs(jnp.diagonal(lu, axis1=-2, axis2=-1))
    eps = jnp.finfo(lhs.dtype).eps
    singular = ~(u.min(-1) > lhs.shape[-1] * eps * u.max(-1))
    delta = jnp.where(singular[..., None, None], jnp.nan, delta)
    return (w0 + delta).astype(base.dtype)


@jax.jit
def _finite_system(base, ws, grams, weights, alpha):
    _, _, lhs, rhs = _normal_equations(base, ws, grams, weights, alpha)
    return jnp.isfinite(lhs).all() & jnp.isfinite(rhs).all()


def _explain(call: pipeline.Call, j: int) -> str | None:
    """A leaf with Grams whose system is finite but whose solution is not: the summed
    Gram is singular (with alpha=1, fewer examples than input features)."""
    assert call.extras is not None  # plan requires RegMean's grams
    grams = [g[j] for g in call.extras]
    if grams[0] is None:
        return None
    ws, alpha = [w[j] for w in call.prepared.experts], call.options["alpha"]
    if not _finite_system(call.prepared.base[j], ws, grams, call.options["weights"], alpha):
        return None  # the sums overflowed
    fix = (
        "use alpha < 1 (the default 0.9), which shrinks the Grams' off-diagonal entries and "
        "makes the sum invertible when every input feature is seen"
        if float(alpha) == 1
        else "each Gram must be positive semi-definite (X_iᵀ X_i)"
    )
    return (
        f"its summed Gram matrix Σ c_i G̃_i is singular (not invertible) with alpha={alpha}, "
        f"so the least-squares merge has no unique solution: {fix}"
    )


def _regmean_kernel(opts, b, ws, masks, scores, grams):
    def solve(b, ws, grams):
        return _regmean_leaf(b, ws, grams, opts["weights"], opts["alpha"])

    rows = None if grams[0] is None else general_rows(b.shape, grams[0].shape)
    if rows is None:
        return solve(b, ws, grams)
    return pipeline.in_view(solve, b.shape, pipeline.matrix_of(b.shape, rows))(b, ws, grams)


REGMEAN = R.register(
    R.Method(
        "regmean",
        regmean,
        "least-squares merge of linear layers (Σ G̃)⁻¹ Σ G̃ W from their inputs' Grams",
        (
            Param("alpha", "number", "factor on the Grams' off-diagonal entries", low=0, high=1),
            WEIGHTS,
        ),
        _regmean_kernel,
        extra="grams",
        base_optional=True,
        check=_check,
        explain=_explain,
    )
)
