"""mergekit's generalized task arithmetic: task arithmetic, TIES, DARE and DARE-TIES.

All four (docs/algorithm.md §5) configure one per-leaf kernel, :func:`._gta.gta`: sparsify
each task vector (top-density magnitudes or a Bernoulli draw), rescale it, optionally keep
the entries agreeing with the elected sign, and add ``scaling`` times the weighted sum to
``w0``. They follow mergekit 0.1.x (``merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``); differences are listed in each docstring.

References:
  Task arithmetic, arXiv:2212.04089; TIES, arXiv:2306.01708; DARE, arXiv:2311.03099.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from umtam_jax.merging import _gta as G
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._registry import DENSITY, SCALING, SCOPE, WEIGHTS
from umtam_jax.optimizer._layout import RowAxesFn


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
    return pipeline.merge(TASK_ARITHMETIC, base, experts, None, scaling=scaling, weights=weights)


def ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """TIES merging with mergekit's ``ties`` semantics (docs/algorithm.md §5.2).

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
      scope: where the keep count is exact: ``"tensor"``, ``"layer"`` (each slice of the
        first axis of a leaf with three or more), ``"global"``, or a layout callable
        such as ``umtam_jax.scanned("blocks")`` (each slice over its batch axes).

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
    return pipeline.merge(
        TIES, base, experts, None, density=density, scaling=scaling, weights=weights, scope=scope
    )


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
    return pipeline.merge(
        DARE,
        base,
        experts,
        None,
        density=density,
        key=key,
        scaling=scaling,
        weights=weights,
        rescale=rescale,
        l1_rescale=l1_rescale,
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
    return pipeline.merge(
        DARE_TIES,
        base,
        experts,
        None,
        density=density,
        key=key,
        scaling=scaling,
        weights=weights,
        rescale=rescale,
        l1_rescale=l1_rescale,
        normalize=normalize,
    )


TASK_ARITHMETIC = R.register(
    R.Method(
        "task_arithmetic",
        task_arithmetic,
        "w0 + scaling · Σ weight · (w − w0)",
        (SCALING, WEIGHTS),
        G.gta_kernel(G.NO_RESCALE, False, False),
    )
)
TIES = R.register(
    R.Method(
        "ties",
        ties,
        "trim to the top-density |Δ|, elect signs, average the agreeing entries",
        (DENSITY, SCALING, WEIGHTS, SCOPE),
        G.gta_kernel(G.NO_RESCALE, True, True),
        importance=G.magnitude,
        sparsify="topk",
    )
)
DARE = R.register(
    R.Method(
        "dare",
        dare,
        "random drop with keep probability density, rescale, then task arithmetic",
        (DENSITY, G.KEY, SCALING, WEIGHTS, G.RESCALE, G.L1_RESCALE),
        G.gta_kernel(G.dare_rescale, False, False),
        sparsify="bernoulli",
    )
)
DARE_TIES = R.register(
    R.Method(
        "dare_ties",
        dare_ties,
        "DARE's random drop and rescale, then TIES's sign consensus",
        (
            DENSITY,
            G.KEY,
            SCALING,
            WEIGHTS,
            G.RESCALE,
            G.L1_RESCALE,
            G.NORMALIZE,
        ),
        G.gta_kernel(G.dare_rescale, True, lambda opts: opts["normalize"]),
        sparsify="bernoulli",
    )
)
