"""mergekit's SCE and RAM merges: each entry weighted by what the experts do there jointly.

- :func:`sce`: Select the entries whose task vectors vary most across the experts,
  Calculate per-expert weights from their mean squares, Erase the entries against the
  elected sign.
- :func:`ram`, :func:`ramplus_tl`: Reinforced Agent Merging keeps entries that one expert
  changes and averages those several change; RAM+ amplifies each expert's unique entries.

Semantics, parameter names and defaults follow mergekit 0.1.x (``merge_methods/sce.py``,
``ram.py``); mergekit's take no ``lambda``, here ``scaling`` (default 1). Everything
is computed per tensor (leaf), so a tree merged whole or leaf by leaf (the out-of-core
engine) gives the same result; 16-bit inputs are computed in float32.

References:
  Wan et al., FuseChat (SCE), arXiv:2408.07990; Reinforced Agent Merging (RAM, RAM+),
  arXiv:2601.13572.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import compute_dtype
from umtam_jax.merging._registry import SCALING, SLICES, Param
from umtam_jax.merging._select import _topk_mask as topk
from umtam_jax.optimizer._layout import RowAxesFn

# --------------------------------------------------------------------------- SCE


def sce(
    base: Any,
    experts: Sequence[Any],
    *,
    select_topk: float = 1.0,
    scaling: float = 1.0,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """SCE: select by variance, calculate weights, erase minority signs (mergekit's ``sce``).

    Per tensor, with ``Δ_τ = w_τ − w0``:

    1. Select (``select_topk < 1``): ``v = Var_τ(Δ_τ)`` (population variance over the
       experts); the ``k = ⌊n_nz · select_topk⌋`` entries of largest ``v`` (``n_nz``: the
       nonzero ``v``; the product in float32 as in mergekit; equal ``v``: lower index) are
       kept in every ``Δ_τ``, the others set to 0.
    2. Calculate: ``c_τ = mean(Δ_τ²)`` over the tensor, divided by ``Σ c`` (``1/K`` each
       when ``|Σ c| < 1e-6``, which small task vectors fall under).
    3. Erase: ``m_τ = [sign(Δ_τ) = vote]``, ``vote = sign(Σ_τ Δ_τ)`` (0 votes +1).
    4. ``w0 + scaling · Σ_τ c_τ m_τ Δ_τ / max(Σ_τ c_τ m_τ, 1e-6)``.

    mergekit's ``sce`` takes no model weights, densities or ``lambda`` (``scaling = 1``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      select_topk: fraction in [0, 1] of the nonzero-variance entries kept (1: all).
      scaling: factor on the merged task vector.
      scope: ``"tensor"``, ``"layer"`` (each slice of the first axis of a leaf with three
        or more merged as a tensor of its own: its selection and weights ``c_τ``) or a
        layout callable such as ``umtam_jax.scanned("blocks")`` (each slice over its batch
        axes): a scanned model then merges as its unrolled twin.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([3., 1.])}]
      >>> [round(x, 4) for x in merging.sce(base, experts)["w"].tolist()]  # c = 1/6, 5/6
      [2.6667, 1.0]

    References:
      Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (SCE), arXiv:2408.07990;
      mergekit ``sce``.
    """
    return pipeline.merge_arguments(SCE, locals())


@jax.jit
def _sce_leaf(base, ws, select_topk, scaling):
    dt = compute_dtype(base)
    b = base.astype(dt)
    tv = jnp.stack([w.astype(dt) - b for w in ws])
    # The variance of the differences to the first expert: the same, but exactly 0 where
    # every expert agrees (jnp.var of equal values is not, for 3, 5, 6 or 7 experts).
    var = jnp.var(tv - tv[0], axis=0)
    nonzero = jnp.count_nonzero(var).astype(jnp.float32)
    k = jnp.floor(nonzero * jnp.asarray(select_topk, jnp.float32)).astype(jnp.int32)
    tv = jnp.where(jnp.where(select_topk < 1, topk(var, k), True), tv, 0)
    erase = jnp.sign(tv) == jnp.where(jnp.sum(tv, axis=0) >= 0, 1, -1)
    c = jnp.mean(tv.reshape(len(ws), -1) ** 2, axis=1)
    small = jnp.abs(jnp.sum(c)) < 1e-6
    c = jnp.where(small, 1.0 / len(ws), c / jnp.where(small, 1, jnp.sum(c)))
    c = jnp.where(erase, c.reshape((-1,) + (1,) * base.ndim), 0)
    merged = jnp.sum(tv * c, axis=0) / jnp.maximum(jnp.sum(c, axis=0), 1e-6)
    return (b + scaling * merged).astype(base.dtype)


# --------------------------------------------------------------------------- RAM


def ram(base: Any, experts: Sequence[Any], *, epsilon: float = 1e-5, scaling: float = 1.0) -> Any:
    """RAM: entries one expert changes are kept, those several change averaged.

    Per entry, the experts with ``|Δ_τ| > ε`` contribute: one contributor's ``Δ_τ`` is
    taken as it is, several contributors' are averaged, none gives 0 (mergekit's ``ram``).
    Result ``w0 + scaling · merged`` (mergekit has no ``lambda``: ``scaling = 1``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      epsilon: ``ε ≥ 0``, the magnitude a change must exceed to count.
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 2., 0.])}, {"w": jnp.array([0., 4., 0.])}]
      >>> merging.ram(base, experts)["w"].tolist()
      [1.0, 3.0, 0.0]

    References:
      "Reinforced Agent Merging" (RAM), arXiv:2601.13572; mergekit ``ram``.
    """
    return pipeline.merge_arguments(RAM, locals())


def ramplus_tl(
    base: Any,
    experts: Sequence[Any],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    scaling: float = 1.0,
) -> Any:
    """RAM+ (tensor-local): :func:`ram` with each expert's unique entries amplified.

    Per tensor, expert ``τ``'s entries with ``|Δ_τ| > ε`` are counted where it is the only
    such expert (``u_τ``) and where others are too (``s_τ``); its unique entries are
    multiplied by ``λ_τ = 1 + r · clip(s_τ / max(u_τ, ε), 0, α)``, shared entries averaged
    as in :func:`ram` (mergekit's ``ramplus_tl``). Result ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      r: gain of the amplification.
      alpha: the cap ``α`` on the overlap ratio.
      epsilon: ``ε ≥ 0``, the magnitude a change must exceed to count.
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 2., 0.])}, {"w": jnp.array([0., 4., 0.])}]
      >>> [round(x, 4) for x in merging.ramplus_tl(base, experts, r=0.5)["w"].tolist()]
      [1.1, 3.0, 0.0]

    References:
      "Reinforced Agent Merging" (RAM+), arXiv:2601.13572; mergekit ``ramplus_tl``.
    """
    return pipeline.merge_arguments(RAMPLUS_TL, locals())


@jax.jit
def _ram_leaf(base, ws, epsilon, r, alpha, plus, scaling):
    dt = compute_dtype(base)
    b = base.astype(dt)
    tv = jnp.stack([w.astype(dt) - b for w in ws])
    counted = jnp.abs(tv) > epsilon
    count = jnp.sum(counted, axis=0)
    unique, shared = counted & (count == 1), counted & (count > 1)
    u = jnp.sum(unique.reshape(len(ws), -1), axis=1).astype(dt)
    s = jnp.sum(shared.reshape(len(ws), -1), axis=1).astype(dt)
    gain = jnp.where(plus, 1 + r * jnp.clip(s / jnp.maximum(u, epsilon), 0, alpha), 1)
    gain = gain.reshape((-1,) + (1,) * base.ndim)
    mixed = jnp.where(unique, tv * gain, 0) + jnp.where(shared, tv / jnp.maximum(count, 1), 0)
    return (b + scaling * jnp.sum(mixed, axis=0)).astype(base.dtype)


# --------------------------------------------------------------------------- registry

_RAM_EPSILON = Param("epsilon", "number", "magnitude a change must exceed to count", low=0.0)

SCE = R.register(R.Method(
    "sce", sce, "keep top-variance entries, weight experts by mean Δ², erase minority signs",
    (Param("select_topk", "number", "fraction kept by variance", low=0.0, high=1.0), SCALING,
     SLICES),
    lambda opts, b, ws, *_: _sce_leaf(b, ws, opts["select_topk"], opts["scaling"]),
))  # fmt: skip
RAM = R.register(R.Method(
    "ram", ram, "entries one expert changes kept, entries several change averaged",
    (_RAM_EPSILON, SCALING),
    lambda opts, b, ws, *_: _ram_leaf(b, ws, opts["epsilon"], 0.0, 0.0, False, opts["scaling"]),
))  # fmt: skip
RAMPLUS_TL = R.register(R.Method(
    "ramplus_tl", ramplus_tl, "RAM, each expert's unique entries scaled up by its overlap",
    (Param("r", "number", "gain on unique entries"),
     Param("alpha", "number", "cap on the overlap ratio"), _RAM_EPSILON, SCALING),
    lambda o, b, ws, *_: _ram_leaf(b, ws, o["epsilon"], o["r"], o["alpha"], True, o["scaling"]),
))  # fmt: skip
