"""Spherical means of K experts with mergekit's semantics: Multi-SLERP and the Karcher mean.

Both treat each tensor, flattened, as a vector: a norm times a direction on the unit
sphere. They average the directions on the sphere and scale the result by an average of
the norms. Multi-SLERP takes one step in the tangent space at the weighted mean direction,
on the task vectors ``w − w0`` when a base is given; the Karcher mean iterates to the
Riemannian center of mass of the experts themselves (it has no base role).

Each follows the method of the same name in mergekit 0.1.5 (``mergekit/merge_methods/``),
with its parameter names and defaults; differences are listed in each docstring. Every
merge works on one tensor (leaf) at a time, so the out-of-core engine and ``umtam-merge``
run them too. Inputs in 16-bit floats are computed in float32 and the result cast back
(mergekit computes these in the inputs' own dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._gta import compute_dtype, scaled_norm, sum_terms
from umtam_jax.merging._interpolation import _check_weight_sum, _traced
from umtam_jax.merging._registry import WEIGHTS, Param


def multislerp(
    base: Any,
    experts: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Any:
    """Weighted spherical barycenter of K experts (tangent-space interpolation), per tensor.

    With a base the task vectors ``x_τ = w_τ − w0`` (flattened per tensor) are merged and
    the base added back; without one (``base=None``) the experts themselves. With weights
    ``c`` (divided by ``Σ c`` when ``normalize_weights``), ``u_τ = x_τ / (‖x_τ‖ + eps)``,
    ``m = Σ c_τ u_τ / ‖Σ c_τ u_τ‖``, the tangent vector ``g = Σ c_τ (u_τ − ⟨u_τ, m⟩ m)``
    and ``γ = ‖g‖ + eps``::

        multislerp = (cos γ · m + sin γ / γ · g) · Σ_τ c_τ ‖x_τ‖   (+ w0)

    One expert is returned unchanged. A tensor no expert moved (every ``x_τ = 0``, e.g. a
    frozen layer, or an empty tensor) comes back as it is (mergekit raises there). Where
    ``‖Σ c_τ u_τ‖ < eps`` otherwise (antipodal vectors with balancing weights) two experts
    fall back to ``c₁x₁ + c₂x₂ (+ w0)``, and more raise ValueError, as in mergekit.
    mergekit requires every model's ``weight``; here they default to 1.0 each.

    Args:
      base: the base parameters ``w0``, or None.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      weights: one weight per expert (mergekit's per-model ``weight``).
      normalize_weights: divide the weights by their sum.
      eps: the stabilizing constant above (≥ 0).

    Returns:
      The merged parameters, a pytree like the experts.

    Raises:
      ValueError / TypeError: invalid inputs (messages name the leaf path); weights summing
        to 0 with ``normalize_weights``; a tensor whose weighted mean direction vanishes
        with three or more experts.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([2., 0.])}, {"w": jnp.array([0., 2.])}]
      >>> out = merging.multislerp(None, experts)
      >>> [round(x, 5) for x in out["w"].tolist()]
      [1.41421, 1.41421]

    References:
      C. Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea);
      Buss & Fillmore, "Spherical Averages and Applications to Spherical Splines and
      Interpolation", ACM TOG 2001; mergekit ``multislerp``.
    """
    return pipeline.merge(
        MULTISLERP,
        base,
        experts,
        None,
        weights=weights,
        normalize_weights=normalize_weights,
        eps=eps,
    )


def _multislerp_terms(base, ws, weights, normalize_weights, eps):
    dt = compute_dtype(base)
    b = base.astype(dt).reshape(-1)
    xs = [w.astype(dt).reshape(-1) - b for w in ws]
    c = [jnp.asarray(w, dt) for w in weights]
    total = sum_terms(c)
    c = [jnp.where(normalize_weights, ci / jnp.where(normalize_weights, total, 1), ci) for ci in c]
    eps = jnp.asarray(eps, dt)
    norms = [scaled_norm(x) for x in xs]
    # An expert that did not move the tensor has no direction: its unit is 0 (x / eps
    # with eps > 0; not 0 / 0 with eps = 0).
    units = [
        jnp.where(n + eps == 0, 0, x / jnp.where(n + eps == 0, 1, n + eps))
        for x, n in zip(xs, norms, strict=True)
    ]
    mean = sum_terms([ci * u for ci, u in zip(c, units, strict=True)])
    mean_norm = scaled_norm(mean)
    return dt, b, xs, c, eps, norms, units, mean, mean_norm


def _unmoved_and_degenerate(norms, mean_norm, eps) -> tuple[jax.Array, jax.Array]:
    """Whether no expert moved the tensor (every ``x_τ = 0``; an empty tensor too), and
    whether, otherwise, the weighted mean direction vanishes."""
    unmoved = jnp.all(jnp.stack(norms) == 0)
    return unmoved, _vanishes(mean_norm, eps) & ~unmoved


def _vanishes(x: jax.Array, eps: jax.Array) -> jax.Array:
    """Below ``eps`` (a tolerance), or 0: a tolerance of 0 divides by no zero."""
    return (x < eps) | (x == 0)


@jax.jit
def _multislerp_degenerate(base, ws, weights, normalize_weights, eps) -> jax.Array:
    *_, eps, norms, _, _, mean_norm = _multislerp_terms(base, ws, weights, normalize_weights, eps)
    return _unmoved_and_degenerate(norms, mean_norm, eps)[1]


@jax.jit
def _multislerp_leaf(base, ws, weights, normalize_weights, eps) -> jax.Array:
    if len(ws) == 1:
        return ws[0]
    terms = _multislerp_terms(base, ws, weights, normalize_weights, eps)
    dt, b, xs, c, eps, norms, units, mean, mean_norm = terms
    unmoved, degenerate = _unmoved_and_degenerate(norms, mean_norm, eps)
    mean = mean / jnp.where(_vanishes(mean_norm, eps), 1, mean_norm)
    g = sum_terms([ci * (u - jnp.sum(u * mean) * mean) for ci, u in zip(c, units, strict=True)])
    gamma = scaled_norm(g) + eps
    sinc = jnp.where(gamma == 0, 1, jnp.sin(gamma) / jnp.where(gamma == 0, 1, gamma))
    out = mean * jnp.cos(gamma) + g * sinc  # sin γ / γ → 1 (g = 0 with eps = 0)
    out = out * sum_terms([n * ci for n, ci in zip(norms, c, strict=True)])
    fallback = c[0] * xs[0] + c[1] * xs[1] if len(ws) == 2 else jnp.full_like(out, jnp.nan)
    out = jnp.where(unmoved, 0, jnp.where(degenerate, fallback, out))
    return (out + b).reshape(base.shape).astype(base.dtype)


def _check_multislerp(call: pipeline.Call) -> None:
    _check_weight_sum(call, "normalize_weights")
    opts, p = call.options, call.prepared
    if len(p.experts) < 3:
        return
    w, nw, eps = opts["weights"], opts["normalize_weights"], opts["eps"]
    columns = [[ws[j] for ws in p.experts] for j in range(len(p.base))]
    flags = V.read_concrete(
        [*p.base, *(x for ws in p.experts for x in ws), eps, *w],
        lambda: [
            _multislerp_degenerate(b, col, w, nw, eps)
            for b, col in zip(p.base, columns, strict=True)
        ],
    )
    for path, bad in zip(p.paths, flags or [], strict=False):
        if bad:
            raise ValueError(
                f"multislerp: at {path} the weighted sum of the experts' unit vectors is 0 "
                "(antipodal experts whose weights balance out); change the weights"
            )


# --------------------------------------------------------------------------- karcher


def karcher(base: Any, experts: Sequence[Any], *, max_iter: int = 10, tol: float = 1e-5) -> Any:
    """The Karcher (Riemannian) mean of the experts' directions, scaled by their mean norm.

    Per tensor, flattened: ``n_τ = ‖w_τ‖``, ``u_τ = w_τ / n_τ``; experts with ``n_τ ≤ tol``
    are left out of the direction (all of them: the result is 0). Starting from the
    normalized mean of the kept ``u_τ`` (the first kept ``u_τ`` if that mean's norm is
    below ``tol``), each of at most ``max_iter`` steps computes, with equal weights
    ``α = 1/K'`` over the ``K'`` kept experts and ``θ_τ = arccos⟨m, u_τ⟩``::

        g = Σ_{θ_τ ≥ tol} α · θ_τ / sin θ_τ · (u_τ − cos θ_τ · m)

    stops when ``‖g‖ < tol``, else ``m ← cos‖g‖ · m + sin‖g‖ · g/‖g‖`` (renormalized when
    its norm exceeds ``tol``). The result is ``(1/K) Σ_τ n_τ · m`` (every expert's norm).
    One expert is returned unchanged. mergekit's ``karcher`` has no base role: ``base`` is
    only checked and may be None (in a mergekit configuration a given ``base_model`` is
    one more input; list it among ``experts`` for that).

    Args:
      base: parameters with the experts' structure, or None (not used otherwise).
      experts: a sequence of parameter pytrees with a common structure, shapes and dtypes.
      max_iter: the most iterations (an integer ≥ 0).
      tol: the tolerance above (≥ 0).

    Returns:
      The merged parameters, a pytree like the experts.

    Raises:
      ValueError / TypeError: invalid inputs (messages name the leaf path), or
        ``max_iter`` not a non-negative integer.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([2., 0.])}, {"w": jnp.array([0., 4.])}]
      >>> [round(x, 5) for x in merging.karcher(None, experts)["w"].tolist()]
      [2.12132, 2.12132]

    References:
      Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl.
      Math. 30 (1977); mergekit ``karcher`` (which cites arXiv:2603.04972).
    """
    return pipeline.merge(KARCHER, base, experts, None, max_iter=max_iter, tol=tol)


@jax.jit
def _karcher_leaf(ws: list[jax.Array], max_iter: Any, tol: Any) -> jax.Array:
    if len(ws) == 1:
        return ws[0]
    dt, k = compute_dtype(ws[0]), len(ws)
    tol = jnp.asarray(tol, dt)
    xs = [w.astype(dt).reshape(-1) for w in ws]
    norms = [scaled_norm(x) for x in xs]
    units = [
        jnp.where(n == 0, 0, x / jnp.where(n == 0, 1, n)) for x, n in zip(xs, norms, strict=True)
    ]
    kept = [n > tol for n in norms]
    alpha = [jnp.where(v, jnp.asarray(1 / k, dt), 0) for v in kept]
    total = sum_terms(alpha)
    alpha = [a / jnp.where(total == 0, 1, total) for a in alpha]
    mean = sum_terms([a * u for a, u in zip(alpha, units, strict=True)])
    first = units[-1]
    for v, u in zip(kept[::-1], units[::-1], strict=True):
        first = jnp.where(v, u, first)

    norm = scaled_norm(mean)
    small = _vanishes(norm, tol)
    mean = jnp.where(small, first, mean / jnp.where(small, 1, norm))

    def step(carry):
        i, _, m = carry
        terms = []
        for a, u, v in zip(alpha, units, kept, strict=True):
            dot = jnp.clip(jnp.dot(m, u), -1, 1)
            theta = jnp.arccos(dot)
            use = v & (theta >= tol)
            ratio = jnp.where(theta > 0, theta / jnp.where(use & (theta > 0), jnp.sin(theta), 1), 1)
            terms.append(jnp.where(use, a * ratio * (u - dot * m), 0))
        g = sum_terms(terms)
        gn = scaled_norm(g)
        stop = _vanishes(gn, tol)
        new = jnp.cos(gn) * m + jnp.sin(gn) * (g / jnp.where(stop, 1, gn))
        nn = scaled_norm(new)
        new = jnp.where(nn > tol, new / jnp.where(nn > tol, nn, 1), new)
        return i + 1, stop, jnp.where(stop, m, new)

    init = (jnp.asarray(0, jnp.int32), jnp.asarray(False), mean)
    cond = lambda c: (c[0] < max_iter) & ~c[1]  # noqa: E731
    _, _, mean = jax.lax.while_loop(cond, step, init)
    scale = sum_terms([n / k for n in norms])
    out = jnp.where(total == 0, 0, scale * mean)
    return out.reshape(ws[0].shape).astype(ws[0].dtype)


def _check_karcher(call: pipeline.Call) -> None:
    n = call.options["max_iter"]
    if isinstance(n, bool) or (not _traced(n) and float(n) != int(n)):
        raise TypeError(f"max_iter must be a non-negative integer, got {n!r}")


# --------------------------------------------------------------------------- registry

MULTISLERP = R.register(
    R.Method(
        "multislerp",
        multislerp,
        "weighted spherical barycenter of the experts (or their task vectors), per tensor",
        (
            WEIGHTS,
            Param("normalize_weights", "bool", "divide the weights by their sum"),
            Param("eps", "number", "stabilizing constant of the norms", low=0),
        ),
        lambda opts, b, ws, masks, scores, extras: _multislerp_leaf(
            b, ws, opts["weights"], opts["normalize_weights"], opts["eps"]
        ),
        base_optional=True,
        check=_check_multislerp,
    )
)
KARCHER = R.register(
    R.Method(
        "karcher",
        karcher,
        "Karcher mean of the experts' directions times their mean norm (base not used)",
        (
            Param("max_iter", "number", "the most iterations (an integer)", low=0),
            Param("tol", "number", "tolerance on norms, angles and the step", low=0),
        ),
        lambda opts, b, ws, masks, scores, extras: _karcher_leaf(ws, opts["max_iter"], opts["tol"]),
        base_optional=True,
        check=_check_karcher,
    )
)
