"""Fisher-weighted averaging and a post-hoc diagonal Fisher estimate (docs/algorithm.md §5.4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax._precision import at_least_float32
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._registry import WEIGHTS, Param


def fisher(
    base: Any,
    experts: Sequence[Any],
    fishers: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    fisher_floor: float = 1e-20,
) -> Any:
    """Fisher-weighted averaging: ``Σ_τ c_τ F_τ θ_τ / Σ_τ c_τ F_τ`` elementwise.

    ``F_τ`` is the expert's diagonal Fisher, floored at ``fisher_floor`` (so entries where
    every Fisher is 0 fall back to the ``c``-weighted average; Matena & Raffel's code
    floors only the target model's Fisher and normalises each by its L2 norm, see
    ``docs/algorithm.md`` §5.4), and ``c_τ`` are the optional expert weights (their
    ``λ_i``, non-negative with a positive sum). When
    ``base`` is given the same average is computed on task vectors,
    ``w0 + Σ c F Δ / Σ c F`` (identical in exact arithmetic, better conditioned in floating
    point), and entries whose denominator is 0 (possible only with ``fisher_floor=0``) keep
    the base value; with ``base=None`` they are 0.

    Args:
      base: the shared initial parameters, or ``None`` to average the experts directly.
      experts: a sequence of parameter pytrees with a common structure, shapes and dtypes.
      fishers: one params-shaped pytree of non-negative diagonal Fisher values per expert
        (any floating dtype), e.g. from :func:`diagonal_fisher`.
      weights: one weight per expert (default 1.0 each).
      fisher_floor: lower bound applied to every Fisher value.

    Returns:
      The merged parameters, a pytree like the experts.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([1., 1.])}, {"w": jnp.array([4., 4.])}]
      >>> fishers = [{"w": jnp.array([2., 0.])}, {"w": jnp.array([1., 0.])}]
      >>> merging.fisher(None, experts, fishers)["w"].tolist()
      [2.0, 2.5]

    References:
      Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832.
    """
    return pipeline.merge(
        FISHER, base, experts, fishers, weights=weights, fisher_floor=fisher_floor
    )


def _check_fisher(call: pipeline.Call) -> None:
    """Non-negative weights with a positive sum, Fishers and floor: a Fisher is a mean of
    squares, and the average divides by ``Σ c F``."""
    V.check_convex_weights(call.options["weights"])
    floor = call.options["fisher_floor"]
    if not isinstance(floor, jax.core.Tracer) and float(floor) < 0:
        raise ValueError(f"fisher_floor must be ≥ 0, got {float(floor)}")
    assert call.extras is not None  # plan requires the Fishers
    named = [
        (f"fishers[{i}]{path}", f)
        for i, leaves in enumerate(call.extras)
        for path, f in zip(call.prepared.paths, leaves, strict=True)
    ]
    V.check_non_negative(named, "a diagonal Fisher is a mean of squares, never negative")


@jax.jit
def _fisher_leaf(base, ws, fishers, weights, fisher_floor):
    dt = at_least_float32(base.dtype)
    w0 = base.astype(dt)
    coef = [
        jnp.asarray(c, dt) * jnp.maximum(f.astype(dt), fisher_floor)
        for c, f in zip(weights, fishers, strict=True)
    ]
    num = sum(c * (w.astype(dt) - w0) for c, w in zip(coef, ws, strict=True))
    den = sum(coef)
    delta = jnp.where(den == 0, 0, num / jnp.where(den == 0, 1, den))
    return (w0 + delta).astype(base.dtype)


FISHER = R.register(
    R.Method(
        "fisher",
        fisher,
        "Fisher-weighted average Σ c F w / Σ c F of the experts",
        (WEIGHTS, Param("fisher_floor", "number", "lower bound on every Fisher value")),
        lambda opts, b, ws, masks, scores, fishers: _fisher_leaf(
            b, ws, fishers, opts["weights"], opts["fisher_floor"]
        ),
        extra="fishers",
        base_optional=True,
        check=_check_fisher,
    )
)


def diagonal_fisher(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    *,
    per_example: bool = True,
) -> Any:
    """A post-hoc empirical diagonal Fisher: the mean squared gradient of the loss.

    This is the extra pass over data that Fisher merging needs and UMTAM avoids (its
    optimizer already holds second moments). With ``per_example=True`` (default) every
    example's gradient is computed separately (``jax.vmap`` over the leading axis of each
    batch; ``loss_fn`` then sees batches of one example) and
    ``F = (1/N) Σ_n (∇ loss(params, x_n))²`` over all ``N`` examples: the empirical Fisher
    with the data's own labels. With ``per_example=False`` it is the mean over batches of
    the squared mini-batch gradient, ``(1/B) Σ_b (∇ loss(params, batch_b))²`` (cheaper,
    and smaller by about the batch size for independent examples). To estimate the true
    Fisher as Matena & Raffel do, make ``loss_fn`` the negative log-likelihood of labels
    sampled from the model.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (mean loss over the batch).
      params: the parameters at which the Fisher is estimated.
      batches: an iterable of batch pytrees whose leaves share a leading example axis.
      per_example: per-example (True) or per-batch (False) squared gradients.

    Returns:
      A params-shaped pytree of float32 (float64 for float64 params) Fisher values.

    Raises:
      ValueError: if ``batches`` is empty, or a batch's squared gradient is not finite
        (naming the leaf and the batch).
      TypeError: ``per_example`` is not a bool.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> loss = lambda p, b: jnp.mean((b["x"] * p["w"] - b["y"]) ** 2)
      >>> batches = [{"x": jnp.array([1., 2.]), "y": jnp.array([0., 0.])}]
      >>> merging.diagonal_fisher(loss, {"w": jnp.array(1.0)}, batches)["w"].tolist()
      34.0

    References:
      Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832.
    """
    grad = jax.grad(loss_fn)

    def as_float(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        return x.astype(at_least_float32(x.dtype))

    @jax.jit
    def batch_sq(p: Any, batch: Any) -> tuple[Any, jax.Array, jax.Array]:
        if per_example:
            one = lambda ex: grad(p, jax.tree.map(lambda x: x[None], ex))  # noqa: E731
            g = jax.vmap(one)(batch)
            sq = jax.tree.map(lambda x: jnp.sum(jnp.square(as_float(x)), axis=0), g)
            n = jax.tree.leaves(batch)[0].shape[0]
        else:
            g = grad(p, batch)
            sq = jax.tree.map(lambda x: jnp.square(as_float(x)), g)
            n = 1
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(sq)]))
        return sq, jnp.asarray(n, jnp.float32), finite

    if not isinstance(per_example, bool):
        raise TypeError(f"per_example must be True or False, got {per_example!r}")
    total, count = None, 0.0
    for index, batch in enumerate(batches):
        sq, n, finite = batch_sq(params, batch)
        if not finite:
            bad = next(p for p, x in jax.tree_util.tree_leaves_with_path(sq)
                       if not jnp.all(jnp.isfinite(x)))  # fmt: skip
            raise ValueError(
                f"the squared gradient at {jax.tree_util.keystr(bad)} is not finite for "
                f"batch {index}: the loss or its gradient is NaN or infinite there, or the "
                "gradient's square overflows"
            )
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        count += float(n)
    if total is None:
        raise ValueError("batches is empty: the Fisher needs at least one batch")
    return jax.tree.map(lambda x: x / count, total)
