"""mergekit's generalized task arithmetic as one per-leaf kernel, :func:`gta`, and the
pieces the merging methods build from it: rescale modes, the registry kernel, the
magnitude importance, shared parameters, dtype helpers and an overflow-safe norm.

Each method of :mod:`._baselines` (task arithmetic, TIES, DARE, DARE-TIES) and of
:mod:`._task_masks`, :mod:`._della`, :mod:`._breadcrumbs` is a configuration of
:func:`gta`: sparsify each task vector, rescale it, optionally keep the entries agreeing
with the elected sign, and add ``scaling`` times the weighted sum to ``w0``, as mergekit
0.1.x does (``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``).

References:
  Task arithmetic, arXiv:2212.04089; TIES, arXiv:2306.01708; DARE, arXiv:2311.03099.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax._precision import at_least_float32
from umtam_jax.merging._registry import Param

# mergekit's guard in its L1 rescale (``rescaled_masked_tensor``): tiny norms skip rescaling.
L1_EPS = 1e-7


def compute_dtype(x: jax.Array) -> jnp.dtype:
    return at_least_float32(x.dtype)


def sum_terms(terms: list[jax.Array]) -> jax.Array:
    return sum(terms[1:], terms[0])


def power_of_two_peak(x: jax.Array, axis: Any = None) -> jax.Array:
    """The power of two at or below ``max|x|`` along ``axis`` (kept as size-1 axes; 1
    where ``x`` is all zeros), without gradient, its exponent kept where it and its
    reciprocal are normal numbers (float32: 2**-126 to 2**126; XLA divides by
    multiplying with the reciprocal, and flushes subnormals to zero). Dividing by it is
    exact (short of underflow), brings every entry within (-4, 4) and leaves ratios,
    signs and comparisons as they were, so squares and products of the scaled values
    cannot overflow."""
    return power_of_two_below(jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0))


def power_of_two_below(peak: jax.Array) -> jax.Array:
    """Elementwise, the scale :func:`power_of_two_peak` gives a peak magnitude ``peak``
    (1 where it is 0)."""
    _, exponent = jnp.frexp(jnp.where(peak > 0, peak, 1))
    info = jnp.finfo(peak.dtype)
    exponent = jnp.clip(exponent - 1, info.minexp, info.maxexp - 2)
    return jax.lax.stop_gradient(jnp.ldexp(jnp.ones_like(peak), exponent))


def scaled_norm(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``‖x‖₂`` along ``axis`` (all axes by default) that does not overflow while the norm
    is representable (``jnp.linalg.norm`` is ``inf`` for float32 entries beyond ~1e19),
    equal to it bit for bit otherwise, and with a zero gradient at ``x = 0`` (where
    ``jnp.linalg.norm``'s is NaN, which a ``jnp.where`` choosing another branch would still
    carry into ``jax.grad``).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging._gta import scaled_norm
      >>> x = jnp.array([3e30, 4e30])
      >>> float(scaled_norm(x)), float(jnp.linalg.norm(x))
      (4.9999999241216036e+30, inf)
    """
    scale = power_of_two_peak(x, axis)
    square = jnp.sum(jnp.square(x / scale), axis=axis, keepdims=True)
    positive = square > 0
    norm = scale * jnp.where(positive, jnp.sqrt(jnp.where(positive, square, 1)), 0)
    return norm if keepdims else jnp.squeeze(norm, axis=axis)


# Rescale modes of gta (static: a traced mode computed every mode's temporaries).
NO_RESCALE, INVERSE, L1 = 0, 1, 2


@functools.partial(jax.jit, static_argnames=("rescale", "consensus", "normalize"))
def gta(
    base: jax.Array,
    ws: list[jax.Array],
    masks: list[jax.Array] | None,
    weights: list[Any],
    scaling: Any,
    densities: list[Any],
    rescale: int,
    consensus: bool,
    normalize: bool,
) -> jax.Array:
    """mergekit's generalized task arithmetic for one leaf.

    Compiled once per leaf shape, dtype, number of experts and mode (``masks=None``
    aside); weights, scaling and densities are traced, the modes static (a traced mode
    computed every mode's temporaries: three leaves' worth more memory). ``masks``
    sparsify the task vectors (``None``: keep all); ``rescale`` is ``NO_RESCALE``,
    ``INVERSE`` (divide by the density) or ``L1`` (match the unmasked L1 norm, skipped
    when either norm is below 1e-7); ``consensus`` is mergekit's
    ``get_mask(method="sum")``: keep entries whose sign matches that of the sum of the
    weighted deltas (a zero sum votes +1, zeros never match); ``normalize`` divides
    by the summed weights of the kept experts (0 → 1).
    """
    dt = compute_dtype(base)
    b = base.astype(dt)
    deltas = []
    for t, w in enumerate(ws):
        d = w.astype(dt) - b
        if masks is not None:
            kept = jnp.where(masks[t], d, 0)
            if rescale == L1:
                before, after = jnp.sum(jnp.abs(d)), jnp.sum(jnp.abs(kept))
                ok = (before >= L1_EPS) & (after >= L1_EPS)
                kept = jnp.where(ok, kept * (before / jnp.where(ok, after, 1)), kept)
            elif rescale == INVERSE:
                # Dropped entries stay 0 even where the density rounds to 0 in ``dt``.
                kept = jnp.where(masks[t], d / jnp.asarray(densities[t], dt), 0)
            d = kept
        deltas.append(d)
    wts = [jnp.asarray(w, dt) for w in weights]
    weighted = [w * d for w, d in zip(wts, deltas, strict=True)]
    if consensus:
        vote = jnp.where(sum_terms(weighted) >= 0, 1, -1)
        keep = [jnp.sign(x) == vote for x in weighted]
    else:
        keep = [jnp.ones((), bool)] * len(weighted)
    mixed = sum_terms([jnp.where(m, x, 0) for m, x in zip(keep, weighted, strict=True)])
    if normalize:
        divisor = sum_terms([jnp.where(m, w, 0) for m, w in zip(keep, wts, strict=True)])
        mixed = mixed / jnp.where(divisor == 0, 1, divisor)
    return (b + scaling * mixed).astype(base.dtype)


@jax.jit
def abs_delta(base: jax.Array, w: jax.Array) -> jax.Array:
    dt = compute_dtype(base)
    return jnp.abs(w.astype(dt) - base.astype(dt))


def magnitude(opts: Any, b: jax.Array, w: jax.Array, x: Any) -> jax.Array:
    return abs_delta(b, w)


def gta_kernel(rescale: Any, consensus: Any, normalize: Any):
    """A ``gta`` configuration as a registry kernel; each of ``rescale``, ``consensus``,
    ``normalize`` is a value or a function of the options."""

    def value(x: Any, opts: Any) -> Any:
        return x(opts) if callable(x) else x

    def kernel(opts, b, ws, masks, scores, extras):
        k = len(ws)
        return gta(
            b,
            ws,
            masks,
            opts["weights"],
            opts["scaling"],
            opts.get("density", [1.0] * k),
            rescale=value(rescale, opts),
            consensus=value(consensus, opts),
            normalize=value(normalize, opts),
        )

    return kernel


def dare_rescale(opts: Any) -> int:
    return L1 if opts["l1_rescale"] else (INVERSE if opts["rescale"] else NO_RESCALE)


KEY = Param("key", "key", "JAX PRNG key of the random drop (the CLI derives it from 'seed')")
RESCALE = Param("rescale", "bool", "rescale kept entries by 1 / density")
NORMALIZE = Param("normalize", "bool", "divide by the summed weights of agreeing experts")
L1_RESCALE = Param("l1_rescale", "bool", "rescale to the unmasked L1 norm (mergekit >= 0.1)")
