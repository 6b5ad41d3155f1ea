"""DELLA's magnitude-ranked random drop before task arithmetic, as mergekit's ``della``.

:func:`della` and :func:`della_linear` (DELLA, arXiv:2406.11617) drop entries at random with
keep probabilities ranked by magnitude and rescale the rest; then mergekit's generalized
task arithmetic (:mod:`._gta`) runs, with TIES's sign consensus (``della``) or without
(``della_linear``). Semantics, names and defaults follow mergekit 0.1.x (``sparsify.py``,
``registry.py``): its ``lambda`` is ``scaling``, a model's ``weight`` is ``weights`` and its
``rescale`` (L1 norm) is ``l1_rescale``. All is per tensor (leaf), so the out-of-core engine
gives the same result; 16-bit inputs are computed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _gta as G
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._registry import DENSITY, SCALING, WEIGHTS, Param
from umtam_jax.optimizer._layout import RowAxesFn


def _ranks(x: jax.Array) -> jax.Array:
    """Ranks ``0 … m − 1`` of ascending values along axis 1 (equal values by index)."""
    rows = jnp.moveaxis(x, 1, -1)
    flat = rows.reshape(-1, rows.shape[-1])
    order = jnp.argsort(flat, axis=1, stable=True)
    slots = jnp.zeros(flat.shape, jnp.int32).at[jnp.arange(flat.shape[0])[:, None], order]
    rank = slots.set(jnp.arange(flat.shape[1], dtype=jnp.int32)[None, :], unique_indices=True)
    return jnp.moveaxis(rank.reshape(rows.shape), -1, 1)


def della(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    epsilon: float = 0.15,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
    normalize: bool = True,
    layout: str = "in_out",
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES's sign consensus.

    ``Δ_τ = w_τ − w0`` is ranked by ``|Δ|`` among the weights into each output unit, in
    ascending order, equal magnitudes by index: ranks ``r = 0 … m − 1`` over the ``m``
    inputs. That is along axis ``-2`` of a Flax kernel (``layout="in_out"``, ``(..., d_in,
    d_out)``) and along axis 1 of a PyTorch weight (``layout="out_in"``, ``(d_out, d_in,
    ...)``, mergekit's ranking); a vector is ranked whole. Entry ``i`` is kept with probability
    ``p_i = density − ε + 2ε · r_i / (m − 1)`` (``density`` if ``m = 1``, where mergekit
    raises): where ``u_i < p_i``, ``u = uniform(leaf_key, shape, float32)``, ``leaf_key =
    fold_in(fold_in(key, expert_index), crc32(keystr(leaf path)))`` as in :func:`dare`.
    Kept entries are divided by ``p_i`` (``rescale``, the paper), or the kept vector is
    rescaled to the L1 norm of ``Δ_τ`` (``l1_rescale``, mergekit ≥ 0.1's ``rescale: true``;
    takes precedence). At ``density ≥ 1`` nothing is dropped. Then as :func:`dare_ties`:
    ``vote = sign(Σ_τ weight_τ Δ̃_τ)``, agreeing entries summed, divided by their summed
    weights with ``normalize`` (mergekit's default: true); ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: mean keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key.
      epsilon: ``ε ≥ 0``, half the spread of the keep probabilities; each ``density < 1``
        needs ``density ± ε`` in (0, 1).
      scaling: factor on the merged task vector (mergekit's ``lambda``).
      weights: one weight per expert (default 1.0 each).
      rescale: divide kept entries by their keep probability.
      l1_rescale: rescale to the unmasked L1 norm instead (mergekit ≥ 0.1).
      normalize: divide by the summed weights of the agreeing experts.
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights, as mergekit ranks them).
      scope: ``"tensor"``, or ``"layer"`` / a layout such as ``umtam_jax.scanned("blocks")``:
        each slice over the batch axes ranked and drawn as a tensor of its own (with a
        layout naming it, a stacked ``(L, d)`` bias per layer), slice i with
        ``fold_in(leaf_key, i)``.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options (``density ± ε`` outside (0, 1));
        messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([2., 3.])}]
      >>> merging.della(base, experts, density=1.0, key=jax.random.key(0))["w"].tolist()
      [1.5, 3.0]

    References:
      Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
      Magnitude-Based Sampling", arXiv:2406.11617; mergekit ``della``.
    """
    return pipeline.merge_arguments(DELLA, locals())


def della_linear(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    epsilon: float = 0.15,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
    layout: str = "in_out",
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """DELLA's MagPrune and rescale, then task arithmetic (mergekit's ``della_linear``).

    Task vectors are dropped and rescaled as in :func:`della` (the same probabilities and
    draws), then ``w0 + scaling · Σ_τ weight_τ Δ̃_τ`` (mergekit's ``normalize: false``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: mean keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key.
      epsilon: ``ε ≥ 0``; each ``density < 1`` needs ``density ± ε`` in (0, 1).
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      rescale: divide kept entries by their keep probability.
      l1_rescale: rescale to the unmasked L1 norm instead (mergekit ≥ 0.1).
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights, as mergekit ranks them).
      scope: ``"tensor"``, or ``"layer"`` / a layout such as ``umtam_jax.scanned("blocks")``:
        each slice over the batch axes ranked and drawn as a tensor of its own (with a
        layout naming it, a stacked ``(L, d)`` bias per layer), slice i with
        ``fold_in(leaf_key, i)``.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base, expert = {"w": jnp.zeros(1000)}, {"w": jnp.ones(1000)}
      >>> out = merging.della_linear(base, [expert], density=0.5, key=jax.random.key(0),
      ...                            l1_rescale=True)
      >>> round(float(out["w"].sum()), 3)
      1000.0

    References:
      Deep et al., arXiv:2406.11617; mergekit ``della_linear``.
    """
    return pipeline.merge_arguments(DELLA_LINEAR, locals())


@functools.partial(jax.jit, static_argnames="layout")
def _magprune(base, w, key, low, spread, layout):
    """DELLA's keep mask and probabilities ``low + spread · r / (m − 1)`` (one leaf)."""
    dt = G.compute_dtype(base)
    mag = jnp.abs(w.astype(dt) - base.astype(dt))
    if mag.ndim < 2:
        rows = mag.reshape(1, -1)
    else:  # the inputs of each output unit along axis 1
        rows = mag if layout == "out_in" else jnp.moveaxis(mag, -2, 1)
    m = rows.shape[1]
    norm = _ranks(rows).astype(dt) / (m - 1) if m > 1 else jnp.full(rows.shape, 0.5, dt)
    if mag.ndim >= 2 and layout == "in_out":
        norm = jnp.moveaxis(norm, 1, -2)
    p = (low + norm * spread).reshape(base.shape).astype(dt)
    return jax.random.uniform(key, base.shape, jnp.float32) < p, p


def _della_check(call: pipeline.Call) -> None:
    """Checks ``density ± ε`` in (0, 1) and hands each leaf's keys to the kernel."""
    opts = call.options
    eps = opts["epsilon"]
    for i, d in enumerate(opts["density"]):
        if not isinstance(eps, jax.core.Tracer) and d < 1 and not (d - eps > 0 and d + eps < 1):
            raise ValueError(
                "epsilon must be chosen such that density ± epsilon lies in (0, 1); got "
                f"density[{i}] = {d} and epsilon {eps}"
            )
    # The registry's only per-leaf random step is the Bernoulli one: the kernel gets each
    # expert's key for its leaf as the call's (otherwise unused) extras.
    keys = [jax.random.fold_in(opts["key"], t) for t in range(len(call.prepared.experts))]
    call.extras = [[jax.random.fold_in(k, V.leaf_seed(p)) for p in call.prepared.paths]
                   for k in keys]  # fmt: skip


def _della_kernel(consensus: bool):
    def kernel(opts, b, ws, masks, scores, keys):
        masks, probs, eps = [], [], opts["epsilon"]
        for w, d, k in zip(ws, opts["density"], keys, strict=True):
            m, p = (
                (jnp.ones(b.shape, bool), 1.0)
                if d >= 1
                else _magprune(b, w, k, d - eps, 2 * eps, opts["layout"])
            )
            masks.append(m)
            probs.append(p)
        normalize = opts.get("normalize", False)
        return G.gta(b, ws, masks, opts["weights"], opts["scaling"], probs,
                    G.dare_rescale(opts), consensus, normalize)  # fmt: skip

    return kernel


# --------------------------------------------------------------------------- registry

_DELLA = (
    DENSITY,
    G.KEY,
    Param("epsilon", "number", "half the spread of the keep probabilities", low=0.0),
    SCALING,
    WEIGHTS,
    Param("rescale", "bool", "divide kept entries by their keep probability"),
    G.L1_RESCALE,
)

DELLA = R.register(R.Method(
    "della", della, "random drop, keep probabilities ranked by |Δ|, rescale, sign consensus",
    (*_DELLA, G.NORMALIZE, R.LAYOUT, R.SLICES), _della_kernel(True), check=_della_check,
))  # fmt: skip
DELLA_LINEAR = R.register(R.Method(
    "della_linear", della_linear, "DELLA's random drop and rescale, then task arithmetic",
    (*_DELLA, R.LAYOUT, R.SLICES), _della_kernel(False), check=_della_check,
))  # fmt: skip
