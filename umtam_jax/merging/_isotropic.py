"""Isotropic merging: Iso-C and Iso-CTS, per matrix of each leaf.

The summed task vectors' singular vectors with a flat (isotropic) spectrum, and with
Iso-CTS each task's own top directions outside the common subspace. They follow the
matrix, non-matrix-leaf and numerics rules of :mod:`._subspace` (shared with TSV-Merge).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax._precision import full_precision
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import compute_dtype
from umtam_jax.merging._registry import SCALING, Param
from umtam_jax.merging._subspace import (
    _deltas,
    _finish,
    _frobenius_sum,
    _mean_leaf,
    _numerical_zeros,
    _polar,
    _static_fraction,
    _swap,
    _tasks_side_by_side,
    _top,
)
from umtam_jax.optimizer._layout import RowAxesFn


def iso_c(
    base: Any, experts: Sequence[Any], *, scaling: float = 1.0, scope: str | RowAxesFn = "tensor"
) -> Any:
    """Iso-C: the summed task vectors with a flat (isotropic) spectrum, per matrix.

    For each matrix, the task arithmetic sum ``Δ_TA = Σ_t Δ_t = U Σ Vᵀ`` keeps its
    singular vectors and every singular value is replaced by their mean
    ``σ̄ = (1/r) Σ_i σ_i`` (``r = min(m, n)``)::

        Δ = σ̄ U Vᵀ,   merged = w0 + scaling · Δ

    so every direction of the common subspace gets the same weight (``‖Δ‖_F = √r · σ̄``
    when ``Δ_TA`` has full rank). Directions with a zero singular value are dropped
    (FusionBench keeps the SVD's arbitrary null-space vectors with weight σ̄; see
    :mod:`umtam_jax.merging._subspace`). Other leaves: ``w0 + scaling · mean_t Δ_t``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      scaling: factor α on the merged task vector (FusionBench's ``scaling_factor``; the
        paper selects it on validation data, FusionBench's examples use 1.5).
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
      >>> experts = [{"w": jnp.array([[3., 0.], [0., 0.]])}, {"w": jnp.array([[0., 0.], [0., 1.]])}]
      >>> merging.iso_c(base, experts)["w"].round(5).tolist()
      [[2.0, 0.0], [0.0, 2.0]]

    References:
      Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces", ICML 2025, arXiv:2502.04959; FusionBench ``ISO_C_Merge``.
    """
    return pipeline.merge(ISO_C, base, experts, None, scaling=scaling, scope=scope)


@full_precision
@jax.jit
def _iso_c_leaf(base: jax.Array, ws: list[jax.Array], scaling: Any) -> jax.Array:
    if base.size == 0:
        return base
    if base.ndim < 2:
        return _mean_leaf(base, ws, scaling)
    dt = compute_dtype(base)
    deltas = _deltas(base, ws, dt)
    u, s, vh = jnp.linalg.svd(jnp.sum(deltas, 0), full_matrices=False)
    keep = ~_numerical_zeros(s, deltas.shape, _frobenius_sum(deltas))
    mean = jnp.mean(jnp.where(keep, s, 0), -1)[:, None, None]
    delta = mean * ((u * keep[:, None, :]) @ vh)
    return _finish(base, delta, scaling, dt)


# --------------------------------------------------------------------------- Iso-CTS


def iso_cts(
    base: Any,
    experts: Sequence[Any],
    *,
    scaling: float = 1.0,
    common_space_fraction: float = 0.8,
    layout: str = "in_out",
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Iso-CTS: Iso-C on a common subspace plus each task's own top directions, per matrix.

    For each matrix in the paper's ``(d_out, d_in)`` orientation (``r = min(m, n)``, ``T``
    experts), the common subspace is the top ``c`` singular vectors of
    ``Δ_TA = Σ_t Δ_t = U Σ Vᵀ``, and each task adds its top ``s`` directions outside it::

        s = round((r − ⌊r · common_space_fraction⌋) / T)   (less 1 if T·s > r),   c = r − T·s
        Δ̂_t = Δ_t − U_c U_cᵀ Δ_t = Û_t Σ̂_t V̂_tᵀ
        U* = ⊥[Û_1[:, :s] … Û_T[:, :s]  U_c],   V* likewise with V̂_t, V_c
        Δ = σ̄ U* V*ᵀ,   merged = w0 + scaling · Δ

    where ``⊥`` orthogonalises (the polar factor, as TSV-Merge) and ``σ̄`` is the mean of
    the ``r`` kept singular values ``Σ_c`` and ``Σ̂_t[:s]``. ``round`` is Python's (halves
    to even) as in FusionBench. ``common_space_fraction=1`` is Iso-C. Other leaves:
    ``w0 + scaling · mean_t Δ_t``. Unlike TSV-Merge and Iso-C the result depends on which
    axis is the layer's output, the side the common subspace is projected out of: set
    ``layout`` to the matrices' layout.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      scaling: factor α on the merged task vector (FusionBench's ``scaling_factor``; the
        paper selects it on validation data, FusionBench's examples use 1.5).
      common_space_fraction: fraction in [0, 1] of each matrix's rank given to the common
        subspace (before rounding the task-specific part to a multiple of ``T``; a Python
        number: it sets shapes). FusionBench's default, 0.8.
      layout: the matrices' last two axes: ``"in_out"`` (Flax/JAX kernels, ``(d_in,
        d_out)``) or ``"out_in"`` (PyTorch/safetensors weights, ``(d_out, d_in)``).
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
      >>> experts = [{"w": jnp.array([[3., 0.], [0., 0.]])}, {"w": jnp.array([[0., 0.], [0., 1.]])}]
      >>> merging.iso_cts(base, experts, common_space_fraction=0.0)["w"].round(5).tolist()
      [[2.0, 0.0], [0.0, 2.0]]

    References:
      Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces", ICML 2025, arXiv:2502.04959; FusionBench ``ISO_CTS_Merge``.
    """
    return pipeline.merge(
        ISO_CTS,
        base,
        experts,
        None,
        scaling=scaling,
        common_space_fraction=common_space_fraction,
        layout=layout,
        scope=scope,
    )


def _iso_cts_split(fraction: float, r: int, t: int) -> tuple[int, int]:
    """FusionBench's common size ``c`` and per-task size ``s`` (``c + T·s = r``)."""
    specific = round((r - int(r * fraction)) / t) * t
    if specific > r:  # FusionBench's common size would be negative (fraction near 0)
        specific -= t
    return r - specific, specific // t


def _iso_cts_kernel(opts, b, ws, masks, scores, extras):
    # Static sizes, not the fraction: fractions giving one split share a compilation.
    split = (0, 0)
    if b.ndim >= 2:
        split = _iso_cts_split(opts["common_space_fraction"], min(b.shape[-2:]), len(ws))
    common, specific = split
    return _iso_cts_leaf(b, ws, opts["scaling"], common, specific, layout=opts["layout"])


@full_precision
@functools.partial(jax.jit, static_argnames=("common", "specific", "layout"))
def _iso_cts_leaf(base, ws, scaling, common: int, specific: int, layout: str) -> jax.Array:
    """One leaf of :func:`iso_cts`: ``common`` shared and ``specific`` directions per task
    (:func:`_iso_cts_split`)."""
    if base.size == 0:
        return base
    if base.ndim < 2:
        return _mean_leaf(base, ws, scaling)
    dt = compute_dtype(base)
    deltas = _deltas(base, ws, dt)
    if layout == "in_out":  # the paper's orientation: rows are the layer's outputs
        deltas = _swap(deltas)
    uc, sc, vhc = _top(jnp.sum(deltas, 0), common, _frobenius_sum(deltas))
    if specific > 0:  # each task's top directions outside the common subspace
        # The common basis comes from the SVD of the sum, exact to that SVD's error:
        # a task inside the common subspace leaves a residual of that size, noise.
        residual = deltas - uc @ (_swap(uc) @ deltas)
        own = _top(residual, specific, max(deltas.shape[-2:]) * _frobenius_sum(deltas))
        u, sv, vh = _tasks_side_by_side(*own)
        uc, sc, vhc = (
            jnp.concatenate(x, a) for x, a in [((u, uc), -1), ((sv, sc), -1), ((vh, vhc), -2)]
        )
    delta = jnp.mean(sc, -1)[:, None, None] * (_polar(uc) @ _polar(vhc))
    if layout == "in_out":
        delta = _swap(delta)
    return _finish(base, delta, scaling, dt)


# --------------------------------------------------------------------------- registry


ISO_C = R.register(
    R.Method(
        "iso_c",
        iso_c,
        "per matrix, the summed task vectors' singular vectors with their mean singular value",
        (SCALING, R.SLICES),
        lambda opts, b, ws, masks, scores, extras: _iso_c_leaf(b, ws, opts["scaling"]),
        matrices=True,
    )
)
ISO_CTS = R.register(
    R.Method(
        "iso_cts",
        iso_cts,
        "Iso-C on the sum's top directions plus each task's top directions outside them",
        (
            SCALING,
            Param(
                "common_space_fraction",
                "number",
                "fraction of each matrix's rank given to the common subspace",
                low=0,
                high=1,
            ),
            R.LAYOUT,
            R.SLICES,
        ),
        _iso_cts_kernel,
        matrices=True,
        check=_static_fraction("common_space_fraction"),
    )
)
