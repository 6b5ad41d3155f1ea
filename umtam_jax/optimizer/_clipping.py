"""Per-leaf gradient norms, clipping (step 1), the adaptive ε_t (step 7) and the saliency's
average (step 9), safe from overflow: any finite gradient gives a finite norm, a finite
clipped gradient and a finite saliency.

Two ways to the same sums, chosen per platform by :func:`_per_platform`:

- on CPU the squares are summed directly, and only when ``‖G‖²`` overflows is the gradient
  rescaled by ``max|G|`` and the sums taken again (a ``lax.cond``: the extra passes run
  only on overflow);
- elsewhere (GPU, TPU, and arrays sharded over Explicit mesh axes) one pass computes each
  sum as ``scale² · ssq`` (:func:`_square_sum_parts`), which cannot overflow. There a
  conditional costs a device-to-host synchronisation, and computing both ways and
  selecting would read the gradient twice more. (XLA:CPU does not vectorise that
  reduction: on CPU it takes ~5× the time of the direct sums, hence the two ways.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._config import Config


def _per_platform(like: jax.Array, cpu: Callable[[], Any], one_pass: Callable[[], Any]):
    """``cpu()`` on CPU, ``one_pass()`` on other platforms and for a ``like`` (the leaf)
    sharded over Explicit mesh axes."""
    if _sharding.explicit_spec(like) is not None:
        return one_pass()
    return jax.lax.platform_dependent(cpu=cpu, default=one_pass)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _square_sum_parts(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(scale, ssq)`` with ``Σ x² = scale² · ssq`` over ``axes``, in one pass that cannot
    overflow: ``scale = max|x|`` and ``ssq = Σ (x / scale)²`` (both 0 where every entry is).

    A variadic reduction whose partial results ``(s, q)`` combine as LAPACK's ``nrm2``
    accumulates: ``s = max(s₁, s₂)``, ``q = q₁ (s₁/s)² + q₂ (s₂/s)²``. XLA partitions it
    like any reduction (partial results per shard, then combined): no shard gathers ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.optimizer._clipping import _square_sum_parts
      >>> scale, ssq = _square_sum_parts(jnp.array([3e30, 4e30]), (0,))
      >>> print(f"{float(scale):.0e} {float(ssq):.4f}")  # (3/4)² + 1
      4e+30 1.5625
    """

    def combine(a, b):
        (s1, q1), (s2, q2) = a, b
        s = jnp.maximum(s1, s2)
        safe = jnp.where(s > 0, s, 1.0)
        return s, q1 * jnp.square(s1 / safe) + q2 * jnp.square(s2 / safe)

    zero = jnp.zeros((), x.dtype)
    return jax.lax.reduce((jnp.abs(x), jnp.ones_like(x)), (zero, zero), combine, axes)


@_square_sum_parts.defjvp
def _square_sum_parts_jvp(axes, primals, tangents):
    """Derivatives of ``(scale, ssq)`` from ordinary reductions (JAX cannot differentiate a
    variadic ``lax.reduce``): ``dscale`` is ``max|x|``'s, and ``dssq = 2 Σ (x/s)(dx/s) −
    2 ssq · dscale / s``, formed from ratios so it cannot overflow either."""
    (x,), (dx,) = primals, tangents
    scale, ssq = _square_sum_parts(x, axes)
    _, dscale = jax.jvp(lambda v: jnp.max(jnp.abs(v), axis=axes, initial=0.0), (x,), (dx,))
    s = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), axes)
    dssq = 2 * jnp.sum((x / s) * (dx / s), axis=axes) - 2 * ssq * dscale / jnp.squeeze(s, axes)
    return (scale, ssq), (dscale, jnp.where(scale > 0, dssq, 0.0))


def _over(x: jax.Array, peak: jax.Array) -> jax.Array:
    """``x / peak`` for a positive ``peak``, as two exact multiplications by powers of two
    and a division by the mantissa of ``peak`` (in [0.5, 1)).

    XLA may compute a division as a product with the reciprocal (it does for vmapped
    leaves), and ``1 / peak`` is subnormal, flushed to 0, once ``peak ≳ 8.5e37`` in
    float32. Each factor is at least about ``1 / √peak``, a normal number in any float
    dtype.
    """
    mantissa, exponent = jnp.frexp(peak)
    low = exponent // 2
    one = jnp.ones((), x.dtype)
    return (x * jnp.ldexp(one, -low)) * jnp.ldexp(one, low - exponent) / mantissa


def shares(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """``x / sum(x)`` over ``axis`` (kept) for a non-negative ``x``, without overflow.

    Where the sum passes 2**100 (or overflows), ``x`` is first scaled by 2**-64 (exact), so
    that the sum is finite and far below float32's largest: a product with ``1 / sum(x)``,
    which XLA may compute for the division, flushes to 0 once the sum passes about 8.5e37.
    Elsewhere the shares are ``x / sum(x)`` as written (entries near the smallest normal
    included). The scale is a select on data, not a branch. An all-zero ``x`` (statistics
    of a second moment that is exactly 0, which the optimizer itself never stores) has
    zero shares, not 0 / 0.
    """
    total = jnp.sum(x, axis=axis, keepdims=True)
    scaled = x * jnp.where(total < 2.0**100, 1.0, 2.0**-64).astype(x.dtype)
    scaled_total = jnp.sum(scaled, axis=axis, keepdims=True)
    return scaled / jnp.where(scaled_total > 0, scaled_total, 1)


def _divided_by_peak(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(peak, x / peak)`` with ``peak = max|x|`` (1 for an all-zero ``x``): the rescaling
    after which squares and their sums cannot overflow."""
    peak = jnp.max(jnp.abs(x), initial=0.0)  # initial: a zero-size leaf has peak 0
    peak = jnp.where(peak > 0, peak, 1.0)
    return peak, _over(x, peak)


def _norm(x: jax.Array) -> jax.Array:
    """Frobenius norm that does not overflow while the norm itself is representable."""

    def cpu():
        norm = jnp.sqrt(jnp.sum(jnp.square(x)))

        def rescaled():
            peak, unit_x = _divided_by_peak(x)
            return peak * jnp.sqrt(jnp.sum(jnp.square(unit_x)))

        return jax.lax.cond(jnp.isfinite(norm), lambda: norm, rescaled)

    def one_pass():
        scale, ssq = _square_sum_parts(x, tuple(range(x.ndim)))
        return scale * jnp.sqrt(ssq)

    return _per_platform(x, cpu, one_pass)


def _half_clip_scale(cfg: Config, peak: jax.Array, unit: jax.Array | float = 1.0) -> jax.Array:
    """``√s`` for the clipping factor ``s = min(1, τ / ‖G‖)`` with ``‖G‖ = peak · unit``.

    ``s`` itself underflows (to a subnormal, flushed to 0 on CPU) once ‖G‖ ≳ 1e38 τ in
    float32, and ``peak · unit`` overflows beyond 3.4e38; ``√s`` stays representable for
    any finite gradient. Consumers apply it twice, ``(x · √s) · √s``, or split it across a
    product's two sides.
    """
    dtype = jnp.result_type(peak)
    if cfg.clip_threshold is None:
        return jnp.ones((), dtype)
    root = jnp.sqrt(jnp.maximum(peak, jnp.finfo(dtype).tiny)) * jnp.sqrt(unit)
    return jnp.minimum(1.0, jnp.sqrt(jnp.asarray(cfg.clip_threshold, dtype)) / root).astype(dtype)


def _clip_from_peak(cfg: Config, peak: jax.Array, unit: jax.Array):
    """The clipping of a gradient with ``‖G‖ = peak · unit`` (``unit = ‖G / peak‖``), for
    the overflow paths: ``(√s, s · peak)``. ``s · peak = min(peak, τ / unit)`` is formed
    without ``s``, which may underflow; the clipped norm is ``unit · s · peak``."""
    clipped_peak = peak
    if cfg.clip_threshold is not None:
        clipped_peak = jnp.minimum(peak, cfg.clip_threshold / unit)
    return _half_clip_scale(cfg, peak, unit), clipped_peak


def clip(g: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Per-leaf Frobenius clipping (step 1). Returns the clipped gradient and its norm.

    When ‖g‖² overflows, the norm is taken as ``max|g| · ‖g / max|g|‖``, and the factor is
    applied as :func:`_half_clip_scale` describes, so that any finite gradient gives a
    finite clipped one.
    """
    if cfg.clip_threshold is None:
        return g, _norm(g)

    def from_parts(peak, unit):
        half, clipped_peak = _clip_from_peak(cfg, peak, unit)
        return half, unit * clipped_peak

    def cpu():
        sum_sq = jnp.sum(jnp.square(g))

        def direct():
            norm = jnp.sqrt(sum_sq)
            half = _half_clip_scale(cfg, norm)
            return half, (norm * half) * half

        def rescaled():
            peak, unit_g = _divided_by_peak(g)
            return from_parts(peak, jnp.sqrt(jnp.sum(jnp.square(unit_g))))

        return jax.lax.cond(jnp.isfinite(sum_sq), direct, rescaled)

    def one_pass():
        scale, ssq = _square_sum_parts(g, tuple(range(g.ndim)))
        return from_parts(scale, jnp.sqrt(ssq))

    half, norm = _per_platform(g, cpu, one_pass)
    return (g * half) * half, norm


def clipped_square_sums(g: jax.Array, cfg: Config, row_axes: int = 1, weight: Any = 1.0):
    """Step 1 and the sums of step 5 from one pass over the unclipped ``g`` (m×n, or laid
    out as ``rows + cols`` with ``row_axes`` row axes).

    Returns ``(rows, cols, norm, half)``: ``half`` the square root of the clipping factor
    (:func:`_half_clip_scale`; the clipped gradient is ``(g · half) · half``), ``rows`` and
    ``cols`` the row/column sums of the clipped gradient squared times ``weight`` (step 5's
    ``1 − b2``, applied before the scale comes back, so that a weighted sum that is
    representable is finite even where the sum itself would overflow), shaped ``rows`` and
    ``cols`` (sums over the column axes and over the row axes), and ``norm`` its Frobenius
    norm. The clipped gradient itself is never formed: its consumers take ``g`` and
    ``half``. On CPU the sums are recomputed from ``g / max|g|`` when ``‖g‖²`` overflows;
    elsewhere they come from :func:`_square_sum_parts`, two reductions in all.
    """
    over_rows, over_cols = tuple(range(row_axes)), tuple(range(row_axes, g.ndim))
    row_sum = functools.partial(jnp.sum, axis=over_cols)
    col_sum = functools.partial(jnp.sum, axis=over_rows)

    def clipped(rows_u, cols_u, peak, unit):
        """The sums of the clipped gradient ``(g / peak) · clipped_peak`` from those of
        ``g / peak``: no square of an unclipped entry is formed."""
        half, clipped_peak = _clip_from_peak(cfg, peak, unit)
        # Times a twice, not a²: a² may overflow where the product does not (and XLA
        # rewrites a square of a product with a constant into a product of squares).
        a = clipped_peak * jnp.sqrt(weight)
        return (rows_u * a) * a, (cols_u * a) * a, unit * clipped_peak, half

    def cpu():
        # Two reductions, each squaring in its own fusion: a shared G² would be written out
        # and read twice (measured 4–9× slower than the two fused reductions on CPU); the
        # barrier keeps XLA from merging the two squares.
        rows = row_sum(jnp.square(g))
        cols = col_sum(jnp.square(jax.lax.optimization_barrier(g)))
        # ‖G‖² from the row sums (an m-vector); without the barrier XLA rewrites the nested
        # sum into a third reduction of G² and materialises G² again.
        sum_sq = jnp.sum(jax.lax.optimization_barrier(rows))

        def direct():
            norm = jnp.sqrt(sum_sq)
            half = _half_clip_scale(cfg, norm)

            def weighted(x):  # weight · x · s², as four representable factors of s
                return ((((x * half) * half) * half) * half) * weight

            return weighted(rows), weighted(cols), (norm * half) * half, half

        def rescaled():
            peak, unit_g = _divided_by_peak(g)
            unit_sq = jnp.square(unit_g)
            rows_u = row_sum(unit_sq)
            return clipped(rows_u, col_sum(unit_sq), peak, jnp.sqrt(jnp.sum(rows_u)))

        return jax.lax.cond(jnp.isfinite(sum_sq), direct, rescaled)

    def one_pass():
        row_scale, row_ssq = _square_sum_parts(g, over_cols)
        col_scale, col_ssq = _square_sum_parts(g, over_rows)
        peak = jnp.max(row_scale, initial=0.0)
        peak = jnp.where(peak > 0, peak, 1.0)
        rows_u = row_ssq * jnp.square(_over(row_scale, peak))  # Σ_j (g_ij / peak)², ≤ n
        cols_u = col_ssq * jnp.square(_over(col_scale, peak))
        return clipped(rows_u, cols_u, peak, jnp.sqrt(jnp.sum(rows_u)))

    return _per_platform(g, cpu, one_pass)


def adaptive_eps(cfg: Config, g_norm: jax.Array, w: jax.Array) -> jax.Array:
    """Step 7: ``ε_t = eps · max(1, ‖G‖/‖W‖)``, with the ratio taken as 1 where ‖W‖ = 0.

    On CPU the full read of ``W`` is skipped when a prefix of its entries already proves
    ``‖W‖ ≥ ‖G‖`` (then ``ε_t = eps`` exactly): with clipping (‖G‖ ≤ τ) that holds for any
    trained or initialised weight matrix, and it saves one of the few m×n passes of a
    step. Elsewhere the full norm is read (a conditional there costs a synchronisation).
    """

    def full():
        w_norm = _norm(w)
        ratio = jnp.where(w_norm > 0, g_norm / jnp.where(w_norm > 0, w_norm, 1.0), 1.0)
        return cfg.eps * jnp.maximum(1.0, ratio)

    if w.ndim == 0 or _sharding.explicit_spec(w) is not None:
        return full()

    def certified_first():
        head = w[: -(-w.shape[0] // _NORM_PREFIX)]  # leading rows: a contiguous prefix
        # ‖head‖ ≤ ‖W‖, so ‖G‖ ≤ ‖head‖ gives ratio ≤ 1 (NaN compares false: full path).
        certified = jnp.isfinite(g_norm) & (jnp.sqrt(jnp.sum(jnp.square(head))) >= g_norm)
        eps = jnp.asarray(cfg.eps, g_norm.dtype)
        return jax.lax.cond(certified, lambda: eps, lambda: full().astype(eps.dtype))

    return jax.lax.platform_dependent(cpu=certified_first, default=full)


_NORM_PREFIX = 8
""":func:`adaptive_eps` first reads the leading 1/_NORM_PREFIX of the rows of ``W``."""


def saturated_ema(decay: float, average: jax.Array, fresh: jax.Array) -> jax.Array:
    """``decay · average + (1 − decay) · fresh``, saturated at the largest float of both
    dtypes (as R, C and v are), in ``average``'s dtype: where R and C saturate,
    ``(W − W0)² · sqrt(R_i C_j)`` passes it for any ``|W − W0| > 1``, and the saliency
    stays finite instead of becoming inf (also when kept in bfloat16 or float16)."""
    top = min(float(jnp.finfo(fresh.dtype).max), float(jnp.finfo(average.dtype).max))
    fresh = jnp.minimum(fresh, top)
    new = jnp.minimum(decay * average.astype(fresh.dtype) + (1 - decay) * fresh, top)
    return new.astype(average.dtype)
