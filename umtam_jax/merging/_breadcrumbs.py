"""Model Breadcrumbs before task arithmetic, as mergekit's ``breadcrumbs`` methods.

:func:`breadcrumbs` and :func:`breadcrumbs_ties` (Model Breadcrumbs, arXiv:2312.06795) keep
a window of each task vector's magnitudes, dropping the largest outliers and the smallest
entries; then mergekit's generalized task arithmetic (:mod:`._gta`) runs, with or
without TIES's sign consensus. Semantics, names and defaults follow mergekit 0.1.x
(``sparsify.py``, ``registry.py``): its ``lambda`` is ``scaling``, a model's ``weight`` is
``weights`` and its ``rescale`` (L1 norm) is ``l1_rescale``. All is per tensor (leaf), so
the out-of-core engine gives the same result; 16-bit inputs are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _gta as G
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._registry import DENSITY, SCALING, SLICES, WEIGHTS, Param
from umtam_jax.merging._select import _topk_mask as topk
from umtam_jax.optimizer._layout import RowAxesFn


def _static(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float (mark it static under jit)")
    return float(value)


def breadcrumbs(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    gamma: float = 0.01,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    l1_rescale: bool = False,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Model Breadcrumbs: drop each task vector's largest outliers and smallest entries.

    Per tensor of ``N`` entries, ``Δ_τ = w_τ − w0`` is ranked by ``|Δ|`` (equal magnitudes:
    the lower flat index ranks higher). With ``n_keep = int(density · N)``, ``n_top =
    int(gamma · N)`` and ``n_bot = max(0, N − n_keep − n_top)``, the entries of ascending
    rank ``n_bot … n_bot + n_keep − 1`` are kept: the ``n_top`` largest are dropped (fewer
    when needed to keep ``n_keep``; no ``max(1, ·)`` as in TIES), the rest set to 0; at
    ``density ≥ 1`` nothing is; with ``int(gamma · N) = 0`` nothing is dropped from the
    top and ``n_keep`` entries are kept, as in mergekit. ``l1_rescale`` rescales the
    kept vector to the L1 norm of ``Δ_τ`` (skipped when either is below 1e-7). Result
    ``w0 + scaling · Σ_τ weight_τ Δ̃_τ``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] kept, or one per expert.
      gamma: fraction in [0, 1] of the largest magnitudes dropped (static).
      scaling: factor on the merged task vector (mergekit's ``lambda``).
      weights: one weight per expert (default 1.0 each).
      l1_rescale: mergekit's ``rescale: true``.
      scope: ``"tensor"``, ``"layer"`` (each slice of the first axis of a leaf with three
        or more merged as a tensor of its own) or a layout callable such as
        ``umtam_jax.scanned("blocks")`` (each slice over its batch axes): a scanned
        model then merges as its unrolled twin.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(5)}
      >>> experts = [{"w": jnp.array([5., -1., 2., 0.5, -3.])}]
      >>> merging.breadcrumbs(base, experts, density=0.4, gamma=0.2)["w"].tolist()
      [0.0, 0.0, 2.0, 0.0, -3.0]

    References:
      Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
      Masks", arXiv:2312.06795; mergekit ``breadcrumbs``.
    """
    return pipeline.merge_arguments(BREADCRUMBS, locals())


def breadcrumbs_ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    gamma: float = 0.01,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    l1_rescale: bool = False,
    normalize: bool = False,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Model Breadcrumbs, then TIES's sign consensus (mergekit's ``breadcrumbs_ties``).

    Task vectors are sparsified as in :func:`breadcrumbs`; ``vote = sign(Σ_τ weight_τ Δ̃_τ)``
    (0 votes +1); entries whose ``sign(weight_τ Δ̃_τ)`` equals the vote are summed (zeros
    never do), divided by their summed weights (0 → 1) only with ``normalize`` (mergekit's
    default: false, unlike ``ties``). Result ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] kept, or one per expert.
      gamma: fraction in [0, 1] of the largest magnitudes dropped (static).
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      l1_rescale: mergekit's ``rescale: true``.
      normalize: divide by the summed weights of the agreeing experts.
      scope: ``"tensor"``, ``"layer"`` or a layout callable, as in :func:`breadcrumbs`.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([2., 3.])}]
      >>> merging.breadcrumbs_ties(base, experts, density=1.0)["w"].tolist()
      [3.0, 3.0]

    References:
      Davari & Belilovsky, arXiv:2312.06795; TIES, arXiv:2306.01708; mergekit
      ``breadcrumbs_ties``.
    """
    return pipeline.merge_arguments(BREADCRUMBS_TIES, locals())


@jax.jit
def _window(base: jax.Array, w: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """Keeps the entries of descending ``|w − base|`` rank in ``[lo, hi)``."""
    dt = G.compute_dtype(base)
    mag = jnp.abs(w.astype(dt) - base.astype(dt))
    return topk(mag, hi) & ~topk(mag, lo)


def _breadcrumbs_kernel(consensus: bool):
    def kernel(opts, b, ws, masks, scores, extras):
        gamma, n, masks = _static("gamma", opts["gamma"]), b.size, []
        for w, d in zip(ws, opts["density"], strict=True):
            if d >= 1:  # mergekit returns the task vector unchanged
                masks.append(jnp.ones(b.shape, bool))
                continue
            n_keep, n_top = int(d * n), int(gamma * n)
            hi = n - max(0, n - n_keep - n_top)
            masks.append(_window(b, w, hi - n_keep, hi))
        rescale = G.L1 if opts["l1_rescale"] else G.NO_RESCALE
        normalize = opts.get("normalize", False)
        return G.gta(b, ws, masks, opts["weights"], opts["scaling"], opts["density"],
                    rescale, consensus, normalize)  # fmt: skip

    return kernel


def _check_gamma(call: pipeline.Call) -> None:
    _static("gamma", call.options["gamma"])


# --------------------------------------------------------------------------- registry

_GAMMA = Param("gamma", "number", "fraction of the largest |Δ| dropped", low=0.0, high=1.0)
_BC = (DENSITY, _GAMMA, SCALING, WEIGHTS, G.L1_RESCALE)

BREADCRUMBS = R.register(R.Method(
    "breadcrumbs", breadcrumbs, "keep the density of |Δ| below the top gamma, then sum",
    (*_BC, SLICES), _breadcrumbs_kernel(False), check=_check_gamma,
))  # fmt: skip
BREADCRUMBS_TIES = R.register(R.Method(
    "breadcrumbs_ties", breadcrumbs_ties, "Model Breadcrumbs' drop, then TIES's sign consensus",
    (*_BC, G.NORMALIZE, SLICES), _breadcrumbs_kernel(True), check=_check_gamma,
))  # fmt: skip
