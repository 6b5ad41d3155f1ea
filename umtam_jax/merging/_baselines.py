"""Baseline merges with semantics pinned to the reference toolkits (SPEC §5).

``task_arithmetic``, ``ties``, ``dare`` and ``dare_ties`` follow mergekit 0.1.x's
generalized task arithmetic (``mergekit/merge_methods/generalized_task_arithmetic.py`` and
``mergekit/sparsify.py``); differences are listed in each docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import keep_masks
from umtam_jax.merging._umtam import _importance
from umtam_jax.optimizer._statistics import curvature as _curvature

SCOPES = ("tensor", "global")

# mergekit's guard in its L1 rescale (``rescaled_masked_tensor``): tiny norms skip rescaling.
_L1_EPS = 1e-7


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def _check_float(prepared: V.Prepared) -> None:
    for path, b in zip(prepared.paths, prepared.base, strict=True):
        V.float_dtype(b.dtype, path, "base")


def _sum(terms: list[jax.Array]) -> jax.Array:
    return sum(terms[1:], terms[0])


# Rescale modes of _gta (traced, so switching them does not recompile).
_NO_RESCALE, _INVERSE, _L1 = 0, 1, 2


@jax.jit
def _gta(
    base: jax.Array,
    ws: list[jax.Array],
    masks: list[jax.Array] | None,
    weights: list[Any],
    scaling: Any,
    densities: list[Any],
    rescale: Any,
    consensus: Any,
    normalize: Any,
) -> jax.Array:
    """mergekit's generalized task arithmetic for one leaf.

    Compiled once per leaf shape, dtype and number of experts (``masks=None`` aside); the
    options are traced. ``masks`` sparsify the task vectors (``None``: keep all);
    ``rescale`` is ``_NO_RESCALE``, ``_INVERSE`` (divide by the density) or ``_L1`` (match
    the unmasked L1 norm, skipped when either norm is below 1e-7); ``consensus`` is
    mergekit's ``get_mask(method="sum")``: keep entries whose sign matches that of the sum
    of the weighted deltas (a zero sum votes +1, zeros never match); ``normalize`` divides
    by the summed weights of the kept experts (0 → 1).
    """
    dt = _compute_dtype(base)
    b = base.astype(dt)
    deltas = []
    for t, w in enumerate(ws):
        d = w.astype(dt) - b
        if masks is not None:
            kept = jnp.where(masks[t], d, 0)
            before, after = jnp.sum(jnp.abs(d)), jnp.sum(jnp.abs(kept))
            ok = (before >= _L1_EPS) & (after >= _L1_EPS)
            l1 = jnp.where(ok, kept * (before / jnp.where(ok, after, 1)), kept)
            inverse = kept / jnp.asarray(densities[t], dt)
            d = jnp.where(rescale == _L1, l1, jnp.where(rescale == _INVERSE, inverse, kept))
        deltas.append(d)
    wts = [jnp.asarray(w, dt) for w in weights]
    weighted = [w * d for w, d in zip(wts, deltas, strict=True)]
    vote = jnp.where(_sum(weighted) >= 0, 1, -1)
    keep = [(jnp.sign(x) == vote) | jnp.logical_not(consensus) for x in weighted]
    mixed = _sum([jnp.where(m, x, 0) for m, x in zip(keep, weighted, strict=True)])
    divisor = _sum([jnp.where(m, w, 0) for m, w in zip(keep, wts, strict=True)])
    mixed = jnp.where(normalize, mixed / jnp.where(divisor == 0, 1, divisor), mixed)
    return (b + scaling * mixed).astype(base.dtype)


@jax.jit
def _abs_delta(base: jax.Array, w: jax.Array) -> jax.Array:
    dt = _compute_dtype(base)
    return jnp.abs(w.astype(dt) - base.astype(dt))


def task_arithmetic(
    base: Any,
    experts: Sequence[Any],
    *,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Any:
    """Task arithmetic: ``w0 + scaling · Σ_τ weight_τ (w_τ − w0)``.

    Matches mergekit's ``task_arithmetic`` (``normalize: false``) with ``lambda = scaling``.
    The paper's "Linear" baseline is ``scaling = 1/K``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      scaling: factor on the summed task vectors.
      weights: one weight per expert (default 1.0 each).

    Returns:
      The merged parameters, a pytree like ``base`` (16-bit floats are computed in float32
      and cast back).

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., 2.])}, {"w": jnp.array([3., 0.])}]
      >>> merging.task_arithmetic(base, experts, scaling=0.5)["w"].tolist()
      [2.0, 1.0]

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", arXiv:2212.04089.
    """
    V.check_finite_scalars(scaling=scaling)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    weights = V.check_weights(weights, k)
    _check_float(prepared)
    out = [
        _gta(
            b,
            [e[j] for e in prepared.experts],
            None,
            weights,
            scaling,
            [1.0] * k,
            rescale=_NO_RESCALE,
            consensus=False,
            normalize=False,
        )
        for j, b in enumerate(prepared.base)
    ]
    return V.rebuild(prepared, out)


def ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    scope: str = "tensor",
) -> Any:
    """TIES merging with mergekit's ``ties`` semantics (SPEC §5).

    1. Trim: each task vector ``Δ_τ = w_τ − w0`` keeps its ``max(1, int(density · N))``
       largest-magnitude entries (per tensor, or over the whole expert with
       ``scope="global"`` as in the TIES paper), the rest set to 0 (no rescaling).
    2. Elect: ``vote = sign(Σ_τ weight_τ Δ̂_τ)``, a zero sum voting +1 (mergekit's
       ``consensus_method: sum``).
    3. Disjoint merge: entries whose ``sign(weight_τ Δ̂_τ)`` equals the vote are kept (zeros
       never count); ``merged = Σ kept weight_τ Δ̂_τ / Σ kept weight_τ``, a zero divisor
       replaced by 1 (mergekit's ``normalize: true``).
    4. ``w0 + scaling · merged`` (mergekit's ``lambda``).

    Equal magnitudes are trimmed deterministically (lower flat index kept first); mergekit
    uses an unstable ``argsort``. ``int8_mask`` in mergekit only changes the mask's dtype.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] of entries each task vector keeps, or one per expert.
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      scope: ``"tensor"`` or ``"global"``, where the keep count is exact.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., -2., 0.5])}, {"w": jnp.array([3., 1., 0.])}]
      >>> merging.ties(base, experts, density=1.0)["w"].tolist()
      [2.0, -2.0, 0.5]

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
      arXiv:2306.01708; mergekit (arcee-ai/mergekit) ``ties`` method.
    """
    V.check_option("scope", scope, SCOPES)
    V.check_finite_scalars(scaling=scaling)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    weights = V.check_weights(weights, k)
    densities = V.check_densities(density, k)
    _check_float(prepared)
    masks = [
        keep_masks([_abs_delta(b, w) for b, w in zip(prepared.base, e, strict=True)], d, scope)
        for e, d in zip(prepared.experts, densities, strict=True)
    ]
    out = [
        _gta(
            b,
            [e[j] for e in prepared.experts],
            [m[j] for m in masks],
            weights,
            scaling,
            densities,
            rescale=_NO_RESCALE,
            consensus=True,
            normalize=True,
        )
        for j, b in enumerate(prepared.base)
    ]
    return V.rebuild(prepared, out)


def _dare_masks(prepared: V.Prepared, densities: list[float], key: jax.Array) -> list:
    """Bernoulli keep masks from ``fold_in(fold_in(key, expert), crc32(leaf path))``."""
    out = []
    for t, p_keep in enumerate(densities):
        expert_key = jax.random.fold_in(key, t)
        row = []
        for path, b in zip(prepared.paths, prepared.base, strict=True):
            if p_keep >= 1.0:  # mergekit returns the tensor unchanged at density >= 1
                row.append(jnp.ones(b.shape, bool))
            else:
                leaf_key = jax.random.fold_in(expert_key, V.leaf_seed(path))
                row.append(jax.random.bernoulli(leaf_key, p_keep, b.shape))
        out.append(row)
    return out


def _dare_merge(
    prepared, densities, key, weights, scaling, rescale, l1_rescale, consensus, normalize
):
    _check_float(prepared)
    masks = _dare_masks(prepared, densities, key)
    mode = _L1 if l1_rescale else (_INVERSE if rescale else _NO_RESCALE)
    out = [
        _gta(
            b,
            [e[j] for e in prepared.experts],
            [m[j] for m in masks],
            weights,
            scaling,
            densities,
            rescale=mode,
            consensus=bool(consensus),
            normalize=bool(normalize),
        )
        for j, b in enumerate(prepared.base)
    ]
    return V.rebuild(prepared, out)


def _check_key(key: Any) -> jax.Array:
    if key is None:
        raise TypeError("a PRNG key is required (e.g. key=jax.random.key(0))")
    return key


def dare(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
) -> Any:
    """DARE (drop and rescale) followed by task arithmetic (mergekit's ``dare_linear``).

    Each entry of each task vector is kept with probability ``density`` (dropped with
    ``p = 1 − density``); kept entries are rescaled by ``1 / (1 − p)`` (``rescale=True``,
    the DARE paper and mergekit < 0.1) or, with ``l1_rescale=True``, the kept vector is
    rescaled to the L1 norm of the unmasked one (mergekit ≥ 0.1's ``rescale: true``; skipped
    when either norm is below 1e-7). ``l1_rescale`` takes precedence over ``rescale``.
    Then ``w0 + scaling · Σ_τ weight_τ Δ̃_τ`` (mergekit's ``normalize: false``). At
    ``density = 1`` nothing is dropped.

    The random masks are drawn from ``fold_in(fold_in(key, expert_index),
    crc32(leaf_path))``: reproducible for a given key, and the same whether a tree is merged
    whole or one leaf at a time.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key.
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      rescale: rescale kept entries by ``1 / density``.
      l1_rescale: rescale to the original L1 norm instead (mergekit ≥ 0.1).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(1000)}
      >>> experts = [{"w": jnp.ones(1000)}]
      >>> out = merging.dare(base, experts, density=0.5, key=jax.random.key(0))
      >>> sorted(set(out["w"].tolist()))
      [0.0, 2.0]

    References:
      Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
      Models as a Free Lunch", arXiv:2311.03099; mergekit ``dare_linear``.
    """
    V.check_finite_scalars(scaling=scaling)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    weights = V.check_weights(weights, k)
    densities = V.check_densities(density, k)
    key = _check_key(key)
    return _dare_merge(
        prepared, densities, key, weights, scaling, rescale, l1_rescale, False, False
    )


def dare_ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
    normalize: bool = False,
) -> Any:
    """DARE-TIES: DARE's random drop and rescale, then TIES's sign consensus.

    Task vectors are dropped and rescaled as in :func:`dare`; then, as in :func:`ties`,
    ``vote = sign(Σ_τ weight_τ Δ̃_τ)`` (0 votes +1), entries whose ``sign(weight_τ Δ̃_τ)``
    matches are summed, ``merged = Σ kept weight_τ Δ̃_τ``, divided by ``Σ kept weight_τ``
    (0 → 1) only with ``normalize=True``. mergekit's ``dare_ties`` defaults to
    ``normalize: false``, and so does this function. Result ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key (same per-leaf derivation as :func:`dare`).
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      rescale: rescale kept entries by ``1 / density``.
      l1_rescale: rescale to the original L1 norm instead (mergekit ≥ 0.1).
      normalize: divide by the summed weights of the agreeing experts.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([2., 3.])}]
      >>> merging.dare_ties(base, experts, density=1.0, key=jax.random.key(0))["w"].tolist()
      [3.0, 3.0]

    References:
      Yu et al., arXiv:2311.03099 (DARE); Yadav et al., arXiv:2306.01708 (TIES);
      mergekit ``dare_ties``.
    """
    V.check_finite_scalars(scaling=scaling)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    weights = V.check_weights(weights, k)
    densities = V.check_densities(density, k)
    key = _check_key(key)
    return _dare_merge(
        prepared, densities, key, weights, scaling, rescale, l1_rescale, True, normalize
    )


def _curvature_leaves(x: Any, prepared: V.Prepared, what: str) -> list[jax.Array]:
    kind, leaves = V.arrays_or_statistics(x, prepared, what)
    return leaves if kind == "arrays" else [_curvature(n) for n in leaves]


def ota(
    base: Any,
    experts: Sequence[Any],
    curvatures: Sequence[Any],
    *,
    power: float = 0.5,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
) -> Any:
    """Curvature-weighted averaging of task vectors in the style of OTA merging.

    ``w0 + scaling · Σ_τ c_τ v_τ^power Δ_τ / Σ_τ c_τ v_τ^power`` elementwise, with ``v_τ`` the
    expert's second-moment (curvature) estimate and ``c_τ`` the optional expert weights;
    where the denominator is 0 the base value is kept. ``power = 0.5`` weights by Adam's
    preconditioner denominator ``sqrt(v)``, as OTA does; ``power = 1`` is Fisher merging
    with ``v`` as the diagonal Fisher.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      curvatures: one per expert: either a params-shaped pytree of non-negative curvature
        arrays (e.g. Adam's ``nu``), or UMTAM statistics / optimizer state, whose
        curvature ``Ŝ = R Cᵀ / sum(R)`` (dense leaves: ``v``) is used.
      power: exponent ``p`` on the curvature; with ``p < 0`` every curvature entry must
        be positive.
      weights: one weight per expert (default 1.0 each).
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs (a negative curvature entry, or a zero one
        with ``power < 0``, included); messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., 1.])}, {"w": jnp.array([4., 4.])}]
      >>> curv = [{"w": jnp.array([9., 1.])}, {"w": jnp.array([1., 1.])}]
      >>> merging.ota(base, experts, curv)["w"].tolist()
      [1.75, 2.5]

    References:
      Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed Model
      Merging" (OTA merging), arXiv:2509.11167.
    """
    V.check_finite_scalars(power=power, scaling=scaling)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    curvatures = V.check_sequence(curvatures, "curvatures")
    V.check_count(curvatures, k, "curvature pytrees")
    weights = V.check_weights(weights, k)
    curv = [_curvature_leaves(c, prepared, f"curvatures[{i}]") for i, c in enumerate(curvatures)]
    _check_curvature_domain(curv, prepared.paths, power)
    _check_float(prepared)
    out = [
        _ota_leaf(
            b, [e[j] for e in prepared.experts], [c[j] for c in curv], weights, power, scaling
        )
        for j, b in enumerate(prepared.base)
    ]
    return V.rebuild(prepared, out)


def _check_curvature_domain(curv: list[list[jax.Array]], paths: list[str], power: Any) -> None:
    """OTA's ``v^power`` is defined for ``v ≥ 0`` (``v > 0`` when ``power < 0``); checked
    outside ``jax.jit`` (one reduction per leaf), as the finite check is."""
    flat = [
        (i, path, c) for i, leaves in enumerate(curv) for path, c in zip(paths, leaves, strict=True)
    ]
    if any(isinstance(c, jax.core.Tracer) for _, _, c in flat):
        return
    strict = not isinstance(power, jax.core.Tracer) and float(power) < 0
    lows = jax.device_get([jnp.min(c, initial=jnp.inf) for _, _, c in flat])
    for (i, path, _), low in zip(flat, lows, strict=True):
        if low < 0 or (strict and low == 0):
            bound = "> 0 when power < 0" if strict else "≥ 0"
            raise ValueError(
                f"curvatures[{i}]{path} has an entry {float(low)}: OTA needs curvatures {bound} "
                "(v^power is not a real number otherwise)"
            )


@jax.jit
def _ota_leaf(base, ws, curv, weights, power, scaling):
    dt = _compute_dtype(base)
    b = base.astype(dt)
    coef = [jnp.asarray(w, dt) * c.astype(dt) ** power for w, c in zip(weights, curv, strict=True)]
    num = _sum([c * (w.astype(dt) - b) for c, w in zip(coef, ws, strict=True)])
    den = _sum(coef)
    delta = jnp.where(den == 0, 0, num / jnp.where(den == 0, 1, den))
    return (b + scaling * delta).astype(base.dtype)


def prune(
    base: Any,
    expert: Any,
    scores: Any = None,
    *,
    density: float,
    scope: str = "tensor",
) -> Any:
    """Keeps the top-``density`` task-vector entries of one expert, reverting the rest.

    Entry ``i`` keeps the expert's value when its score is among the
    ``max(1, int(density · N))`` largest (per tensor, or over the whole expert with
    ``scope="global"``; equal scores go to the lower flat index), else takes the base's.
    Kept values are the expert's exactly (no rescaling, no dtype round trip).

    Args:
      base: the initial parameters ``w0``.
      expert: the fine-tuned parameters, with the base's structure, shapes and dtypes.
      scores: a params-shaped pytree of scores; or the expert's UMTAM statistics /
        optimizer state, whose saliency ``S`` is used (SPEC §3; computed from the expert,
        the base, ``R`` and ``C`` when not tracked); or ``None`` for magnitude pruning by
        ``|w − w0|``.
      density: fraction in (0, 1] of entries to keep.
      scope: ``"tensor"`` or ``"global"``.

    Returns:
      The pruned parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(4)}
      >>> expert = {"w": jnp.array([1., -3., 2., 0.5])}
      >>> merging.prune(base, expert, density=0.5)["w"].tolist()
      [0.0, -3.0, 2.0, 0.0]

    References:
      UMTAM, arXiv:2512.17109, Sec. 4.2 (curvature-aware vs magnitude pruning);
      TIES-Merging's trim step, arXiv:2306.01708.
    """
    V.check_option("scope", scope, SCOPES)
    prepared = V.prepare(base, [expert], what="expert")
    (d,) = V.check_densities(density, 1)
    w = prepared.experts[0]
    _check_float(prepared)
    if scores is None:
        s = [_abs_delta(b, x) for b, x in zip(prepared.base, w, strict=True)]
    else:
        kind, s = V.arrays_or_statistics(scores, prepared, "scores")
        if kind == "statistics":
            s = [_importance(b, x, n, True) for b, x, n in zip(prepared.base, w, s, strict=True)]
    masks = keep_masks(s, d, scope)
    out = [_select(m, x, b) for m, x, b in zip(masks, w, prepared.base, strict=True)]
    return V.rebuild(prepared, out)


@jax.jit
def _select(mask: jax.Array, x: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(mask, x, b)
