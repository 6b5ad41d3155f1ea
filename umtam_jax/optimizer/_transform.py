"""UMTAM (Algorithm 1) as Optax gradient transformations."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._layout import Layout as _Layout
from umtam_jax.optimizer._layout import RowAxesFn, default_row_axes
from umtam_jax.optimizer._layout import layout as _layout_of
from umtam_jax.optimizer._lowrank import (
    SVD_METHODS,
    Decomposition,
    LowRankPlusDense,
    exact_svd,
    full_precision,
    matmul_any,
    subspace_svd_many,
)
from umtam_jax.optimizer._state import (
    DenseLeafState,
    FactoredLeafState,
    ScaleByUmtamState,
    as_leaf_state,
    is_leaf_state,
)


@dataclasses.dataclass(frozen=True)
class _Config:
    rank: int
    b1: float
    b2: float
    eps: float
    error_decay: float
    clip_threshold: float | None
    saliency_decay: float
    svd_method: str
    svd_every: int
    oversampling: int
    power_iterations: int
    min_dim_size_to_factor: int
    row_axes: RowAxesFn
    bias_correction: bool
    track_saliency: bool
    buffer_dtype: Any
    adaptive_rank: bool
    max_rank: int
    min_rank: int
    rank_step: int
    rank_update_every: int
    rank_grow_threshold: float
    rank_shrink_threshold: float
    seed: int
    group_leaves: bool = False


STATIC_HYPERPARAMS = (
    "rank",
    "svd_every",
    "min_dim_size_to_factor",
    "oversampling",
    "power_iterations",
    "max_rank",
    "min_rank",
    "rank_step",
    "rank_update_every",
    "seed",
    "row_axes",
    "group_leaves",
    "error_decay",
)
"""Arguments that fix array shapes or control flow (integers, the ``row_axes`` callable, and
``error_decay``, whose value 0 drops the m×n momentum buffer from the state): pass
``optax.inject_hyperparams(umtam, static_args=STATIC_HYPERPARAMS)``."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _concrete(value: Any) -> float | None:
    """The value of a hyper-parameter, or ``None`` when it is traced (inject_hyperparams)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_range(name: str, value: Any, low: float, high: float, high_open: bool) -> None:
    v = _concrete(value)
    if v is None:
        return
    ok = low <= v < high if high_open else low <= v <= high
    bracket = ")" if high_open else "]"
    _check(ok, f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def _validate(cfg: _Config) -> None:
    for name in STATIC_HYPERPARAMS:
        if name in ("row_axes", "error_decay"):
            continue
        value = getattr(cfg, name)
        if name == "group_leaves":
            if not isinstance(value, bool):
                raise TypeError(f"group_leaves must be True or False, got {value!r}")
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(
                f"{name} must be a Python int (it fixes array shapes), got {value!r}; with "
                "optax.inject_hyperparams pass static_args=umtam_jax.STATIC_HYPERPARAMS"
            )
    _check(cfg.rank >= 1, f"rank must be ≥ 1, got {cfg.rank!r}")
    for name in ("b1", "b2", "saliency_decay"):
        _check_range(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
    _check_range("error_decay", cfg.error_decay, 0.0, 1.0, high_open=False)
    eps = _concrete(cfg.eps)
    _check(
        eps is None or (eps > 0.0 and math.isfinite(eps)),
        f"eps must be finite and > 0, got {cfg.eps!r}",
    )
    clip = None if cfg.clip_threshold is None else _concrete(cfg.clip_threshold)
    _check(
        clip is None or (clip > 0.0 and math.isfinite(clip)),
        f"clip_threshold must be finite and > 0, or None, got {cfg.clip_threshold!r}",
    )
    if cfg.buffer_dtype is not None and not jnp.issubdtype(cfg.buffer_dtype, jnp.floating):
        raise TypeError(
            f"buffer_dtype must be a floating-point dtype (e.g. jnp.bfloat16), got "
            f"{cfg.buffer_dtype}: an integer buffer would silently zero the momentum and "
            "saliency"
        )
    _check(
        cfg.svd_method in SVD_METHODS,
        f"unknown svd_method {cfg.svd_method!r}; expected one of {SVD_METHODS}",
    )
    _check(cfg.svd_every >= 1, f"svd_every must be ≥ 1, got {cfg.svd_every!r}")
    _check(cfg.oversampling >= 0, f"oversampling must be ≥ 0, got {cfg.oversampling!r}")
    _check(cfg.power_iterations >= 0, f"power_iterations must be ≥ 0, got {cfg.power_iterations!r}")
    _check(
        cfg.min_dim_size_to_factor >= 1,
        f"min_dim_size_to_factor must be ≥ 1, got {cfg.min_dim_size_to_factor!r}",
    )
    if cfg.adaptive_rank:
        _check(
            1 <= cfg.min_rank <= cfg.rank <= cfg.max_rank,
            "adaptive rank needs 1 ≤ min_rank ≤ rank ≤ max_rank, got "
            f"min_rank={cfg.min_rank}, rank={cfg.rank}, max_rank={cfg.max_rank}",
        )
        _check(cfg.rank_step >= 1, f"rank_step must be ≥ 1, got {cfg.rank_step!r}")
        _check(
            isinstance(cfg.rank_update_every, int) and cfg.rank_update_every >= 1,
            f"rank_update_every must be ≥ 1, got {cfg.rank_update_every!r}",
        )
        _check(
            cfg.rank_grow_threshold > 1.0,
            f"rank_grow_threshold must be > 1, got {cfg.rank_grow_threshold!r}",
        )
        _check(
            0.0 < cfg.rank_shrink_threshold < 1.0,
            f"rank_shrink_threshold must be in (0, 1), got {cfg.rank_shrink_threshold!r}",
        )


# ----------------------------------------------------------------------------- layout


def _layout(cfg: _Config, path: tuple[Any, ...], shape: tuple[int, ...]) -> _Layout:
    max_rank = cfg.max_rank if cfg.adaptive_rank else cfg.rank
    return _layout_of(cfg.row_axes, cfg.min_dim_size_to_factor, max_rank, path, shape)


def _is_static_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0


def _compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- init


def _init_leaf(cfg: _Config, layout: _Layout, param: jax.Array, key: jax.Array):
    dtype = _compute_dtype(param.dtype)
    buffer_dtype = cfg.buffer_dtype or dtype
    # A copy, not the params buffer itself: a training step may donate params and state.
    initial = jnp.array(param, copy=True) if cfg.track_saliency else None
    # State arrays live where the parameter lives, partitioned like its axes.
    spec = _sharding.partition_of(param) or (None,) * param.ndim
    saliency = jnp.zeros_like(param, buffer_dtype) if cfg.track_saliency else None
    if layout.row_axes is None:
        return DenseLeafState(
            mu=jnp.zeros_like(param, dtype),
            nu=jnp.full_like(param, cfg.eps, dtype),
            saliency=saliency,
            initial=initial,
        )
    nb, r = layout.batch_axes, layout.buffer_rank
    k = nb + layout.row_axes  # batch and row axes: the leading axes of u and row
    batch = param.shape[:nb]
    rows_shape, cols_shape = param.shape[:k], batch + param.shape[k:]
    rows_spec, cols_spec = spec[:k], spec[:nb] + spec[k:]
    key_u, key_v = jax.random.split(key)
    # Algorithm 1, line 3: U ~ N(0, 1/√(m r)), V ~ N(0, 1/√(n r)), read as standard deviations.
    u = jax.random.normal(key_u, rows_shape + (r,), dtype) / math.sqrt(layout.rows * r)
    v = jax.random.normal(key_v, cols_shape + (r,), dtype) / math.sqrt(layout.cols * r)
    place = lambda x, axes: _sharding.place_like(x, param, axes)  # noqa: E731
    u, v = place(u, rows_spec + (None,)), place(v, cols_spec + (None,))
    sigma = jnp.broadcast_to(cfg.eps * jnp.eye(r, dtype=dtype), batch + (r, r))
    sigma = place(sigma, spec[:nb] + (None, None)) if nb else sigma
    dense_momentum = None
    if not _is_static_zero(cfg.error_decay):
        # M̃_0 = U_0 Σ_0 V_0ᵀ + E_0 with E_0 = 0 (see FactoredLeafState.dense_momentum),
        # contracted over r only, so that it is computed sharded like the parameter.
        expanded = _expand(cfg.eps * u, v, nb)
        dense_momentum = place(expanded.astype(buffer_dtype), spec)
    rank = None
    if cfg.adaptive_rank:
        rank = jnp.full(batch, min(cfg.rank, r), jnp.int32)
    return FactoredLeafState(
        u=u,
        sigma=sigma,
        v=v,
        dense_momentum=dense_momentum,
        row=place(jnp.full(rows_shape, cfg.eps, dtype), rows_spec),
        col=place(jnp.full(cols_shape, cfg.eps, dtype), cols_spec),
        saliency=saliency,
        initial=initial,
        rank=rank,
    )


def _expand(u: jax.Array, v: jax.Array, batch_axes: int) -> jax.Array:
    """``Σ_k u[..., k] v[..., k]`` laid out as ``batch + rows + cols``: the product
    ``U Vᵀ`` of every matrix, contracted over r only (no reshape of sharded axes)."""
    if batch_axes == 0:
        return jnp.tensordot(u, v, axes=((u.ndim - 1,), (v.ndim - 1,)))
    letters = iter("abcdefghijklmnopqrstuvwxy")
    batch = "".join(next(letters) for _ in range(batch_axes))
    rows = "".join(next(letters) for _ in range(u.ndim - 1 - batch_axes))
    cols = "".join(next(letters) for _ in range(v.ndim - 1 - batch_axes))
    return jnp.einsum(f"{batch}{rows}z,{batch}{cols}z->{batch}{rows}{cols}", u, v)


# ----------------------------------------------------------------------------- update


def _outer(row: jax.Array, col: jax.Array) -> jax.Array:
    """``row colᵀ`` by broadcasting (keeps both vectors' shardings)."""
    return row[:, None] * col[None, :]


def _unless_overflow(
    ok: jax.Array, direct: Callable[[], Any], rescaled: Callable[[], Any], like: jax.Array
):
    """``direct()`` where ``ok``, else ``rescaled()`` (the overflow-safe recomputation).

    On CPU a ``lax.cond``, so the extra passes of ``rescaled`` run only on overflow. On
    other platforms both are computed and selected: there a conditional costs a
    device-to-host synchronisation (measured ~0.8 ms each on an H100, one per leaf per
    guard), far more than the extra memory-bound passes. ``like`` is the leaf's array:
    under Explicit sharding the selection is always used, with the predicate placed like
    each result (a ``lax.cond`` mapped over a batch of matrices becomes a select whose
    predicate JAX leaves unsharded).
    """

    def select():
        def pick(a, b):
            which = ok
            spec = _sharding.explicit_spec(a)
            if spec is not None and a.ndim:
                which = _sharding.reshard_like(jnp.broadcast_to(ok, a.shape), spec)
            return jnp.where(which, a, b)

        return jax.tree.map(pick, direct(), rescaled())

    if _sharding.explicit_spec(like) is not None:
        return select()
    return jax.lax.platform_dependent(
        cpu=lambda: jax.lax.cond(ok, direct, rescaled), default=select
    )


def _divided_by_peak(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(peak, x / peak)`` with ``peak = max|x|`` (1 for an all-zero ``x``): the rescaling
    after which squares and their sums cannot overflow."""
    peak = jnp.max(jnp.abs(x), initial=0.0)  # initial: a zero-size leaf has peak 0
    peak = jnp.where(peak > 0, peak, 1.0)
    return peak, x / peak


def _norm(x: jax.Array) -> jax.Array:
    """Frobenius norm that does not overflow: rescales by max|x| only when ‖x‖² overflows."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x)))

    def rescaled():
        peak, unit_x = _divided_by_peak(x)
        return peak * jnp.sqrt(jnp.sum(jnp.square(unit_x)))

    return _unless_overflow(jnp.isfinite(norm), lambda: norm, rescaled, x)


def _half_clip_scale(cfg: _Config, peak: jax.Array, unit: jax.Array | float = 1.0) -> jax.Array:
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


def _clip_from_peak(cfg: _Config, peak: jax.Array, unit: jax.Array):
    """The clipping of a gradient with ``‖G‖ = peak · unit`` (``unit = ‖G / peak‖``), for
    the overflow paths: ``(√s, s · peak)``. ``s · peak = min(peak, τ / unit)`` is formed
    without ``s``, which may underflow; the clipped norm is ``unit · s · peak``."""
    clipped_peak = peak
    if cfg.clip_threshold is not None:
        clipped_peak = jnp.minimum(peak, cfg.clip_threshold / unit)
    return _half_clip_scale(cfg, peak, unit), clipped_peak


def _clip(g: jax.Array, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """Per-leaf Frobenius clipping (step 1). Returns the clipped gradient and its norm.

    When ‖g‖² overflows, the norm is taken of ``g / max|g|`` (as :func:`_norm`), and the
    factor is applied as :func:`_half_clip_scale` describes, so that any finite gradient
    gives a finite clipped one.
    """
    if cfg.clip_threshold is None:
        return g, _norm(g)
    sum_sq = jnp.sum(jnp.square(g))

    def direct():
        norm = jnp.sqrt(sum_sq)
        half = _half_clip_scale(cfg, norm)
        return half, (norm * half) * half

    def rescaled():
        peak, unit_g = _divided_by_peak(g)
        unit = jnp.sqrt(jnp.sum(jnp.square(unit_g)))
        half, clipped_peak = _clip_from_peak(cfg, peak, unit)
        return half, unit * clipped_peak

    half, norm = _unless_overflow(jnp.isfinite(sum_sq), direct, rescaled, g)
    return (g * half) * half, norm


def _adaptive_eps(cfg: _Config, g_norm: jax.Array, w: jax.Array) -> jax.Array:
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
""":func:`_adaptive_eps` first reads the leading 1/_NORM_PREFIX of the rows of ``W``."""


def _bias_corrections(cfg: _Config, count: jax.Array, dtype: Any) -> tuple[Any, Any]:
    if not cfg.bias_correction:
        return 1.0, 1.0
    t = count.astype(dtype)
    return 1.0 - cfg.b1**t, 1.0 - cfg.b2**t


def _update_dense(cfg, g, w, state: DenseLeafState, count):
    dtype = state.mu.dtype
    g, g_norm = _clip(g.astype(dtype), cfg)
    w = w.astype(dtype)
    eps_t = _adaptive_eps(cfg, g_norm, w)
    mu = cfg.b1 * state.mu + (1 - cfg.b1) * g
    nu = cfg.b2 * state.nu + (1 - cfg.b2) * jnp.square(g)
    c1, c2 = _bias_corrections(cfg, count, dtype)
    direction = (mu / c1) * jax.lax.rsqrt(nu / c2 + eps_t)
    saliency = None
    if state.saliency is not None:
        deviation = jnp.square(w - state.initial.astype(dtype))
        fresh = deviation * jnp.sqrt(nu)
        saliency = (cfg.saliency_decay * state.saliency + (1 - cfg.saliency_decay) * fresh).astype(
            state.saliency.dtype
        )
    return direction, state._replace(mu=mu, nu=nu, saliency=saliency)


def _active_mask(rank: jax.Array | None, size: int, dtype: Any) -> jax.Array | None:
    if rank is None:
        return None
    return (jnp.arange(size) < rank).astype(dtype)


COLD_START_POWER_ITERATIONS = 4
"""Extra power iterations of the first decomposition, whose warm start V0 is random."""


class _FactorRequest(NamedTuple):
    """What one factored leaf needs from step 3: its momentum and its previous factors."""

    operand: jax.Array | LowRankPlusDense  # M̃ (always materialised for the exact SVD)
    u: jax.Array
    v: jax.Array
    mask: jax.Array | None  # adaptive rank: active components
    key: jax.Array
    rank: int | None


def _decompose_all(cfg, requests: list[_FactorRequest], count) -> list[Decomposition]:
    """Step 3 for every factored leaf; the subspace method runs the leaves in lockstep."""
    if cfg.svd_method == "exact":
        return [exact_svd(req.operand, req.rank) for req in requests]

    def subspace(cold_start=None, power_iterations=cfg.power_iterations):
        return subspace_svd_many(
            [req.operand for req in requests],
            [req.v for req in requests],
            [req.rank for req in requests],
            oversampling=cfg.oversampling,
            power_iterations=power_iterations,
            keys=[req.key for req in requests],
            cold_start=cold_start,
        )

    # The first step's warm start V0 is random: COLD_START_POWER_ITERATIONS more iterations
    # then. Under jit they sit in a lax.cond around those iterations only: a conditional
    # around the whole decomposition is run by XLA:CPU as one serialised unit (10–15 ms per
    # step on the 28M-parameter benchmark). Called eagerly (concrete count), the whole
    # decomposition is one compiled conditional, so eager results equal jitted ones.
    try:
        int(count)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return subspace(cold_start=(count == 1, COLD_START_POWER_ITERATIONS))
    cold = cfg.power_iterations + COLD_START_POWER_ITERATIONS
    return jax.lax.cond(count == 1, lambda: subspace(power_iterations=cold), subspace)


def _diag(s: jax.Array) -> jax.Array:
    """``diag(s)``, also for a stack of vectors."""
    return jnp.vectorize(jnp.diag, signature="(r)->(r,r)")(s)


def _new_factors(cfg, requests: list[_FactorRequest], count) -> list[tuple]:
    """``(U, Σ, V, σ₁)`` of every factored leaf: a fresh decomposition (step 3) on refresh
    steps, else the fixed-basis projection ``Σ ← Uᵀ M̃ V`` of docs/algorithm.md §2.5.

    All leaves share the step count, so one ``lax.cond`` decides for all of them. A
    request may hold a stack of equally shaped leaves (leading axis), see
    :func:`_on_stack`.
    """

    def refresh():
        out = []
        for req, dec in zip(requests, _decompose_all(cfg, requests, count), strict=True):
            s = dec.s if req.mask is None else dec.s * req.mask
            # Keep the factors sharded like the parameter's rows / columns (Explicit meshes).
            new_u = _sharding.reshard_like(dec.u, _sharding.explicit_spec(req.u))
            new_v = _sharding.reshard_like(dec.v, _sharding.explicit_spec(req.v))
            out.append((new_u, _diag(s), new_v, dec.s[..., 0]))
        return out

    def project():
        out = []
        for req in requests:
            # docs/algorithm.md §2.5 / paper Eq. 34: keep U, V; Σ ← Uᵀ M̃ V.
            core = _sharding.matmul(req.u.mT, matmul_any(req.operand, req.v))
            if req.mask is not None:
                core = core * req.mask[..., :, None] * req.mask[..., None, :]
            top = jnp.linalg.norm(core, 2, axis=(-2, -1)) if cfg.adaptive_rank else core[..., 0, 0]
            out.append((req.u, core, req.v, top))
        return out

    if not requests:
        return []
    if cfg.svd_every == 1:
        return refresh()
    return jax.lax.cond((count - 1) % cfg.svd_every == 0, refresh, project)


def _stable_rank(frob_sq: jax.Array, top: jax.Array) -> jax.Array:
    """``‖M‖_F² / σ₁(M)²`` (Eq. 5/15: the paper's r_s and r_eff coincide; docs/algorithm.md
    §2.6)."""
    return frob_sq / jnp.maximum(jnp.square(top), jnp.finfo(frob_sq.dtype).tiny)


def _next_rank(cfg: _Config, rank: jax.Array, stable_rank: jax.Array, limit: int, count):
    """Eq. 16, applied every ``rank_update_every`` steps."""
    r = rank.astype(stable_rank.dtype)
    grow = (stable_rank > cfg.rank_grow_threshold * r) & (stable_rank > 0.9 * r)
    shrink = (stable_rank < cfg.rank_shrink_threshold * r) | (stable_rank < 0.5 * r)
    new = jnp.where(
        grow,
        jnp.minimum(rank + cfg.rank_step, limit),
        jnp.where(shrink, jnp.maximum(rank - cfg.rank_step, cfg.min_rank), rank),
    )
    return jnp.where(count % cfg.rank_update_every == 0, new, rank).astype(jnp.int32)


def _clipped_square_sums(g: jax.Array, cfg: _Config):
    """Step 1 and the sums of step 5 from one pass over the unclipped ``g`` (m×n).

    Returns ``(rows, cols, norm, half)``: ``half`` the square root of the clipping factor
    (:func:`_half_clip_scale`; the clipped gradient is ``(g · half) · half``), ``rows`` and
    ``cols`` the row/column sums of the clipped gradient squared and ``norm`` its Frobenius
    norm. The clipped gradient itself is never formed: its consumers take ``g`` and
    ``half``. When ``‖g‖²`` overflows, the sums are recomputed from ``g / max|g|``.
    """
    # Two reductions, each squaring in its own fusion: a shared G² would be written out and
    # read twice (measured 4–9× slower than the two fused reductions on CPU); the barrier
    # keeps XLA from merging the two squares.
    rows = jnp.sum(jnp.square(g), axis=1)
    cols = jnp.sum(jnp.square(jax.lax.optimization_barrier(g)), axis=0)
    # ‖G‖² from the row sums (an m-vector); without the barrier XLA rewrites the nested
    # sum into a third reduction of G² and materialises G² again.
    sum_sq = jnp.sum(jax.lax.optimization_barrier(rows))

    def direct():
        norm = jnp.sqrt(sum_sq)
        half = _half_clip_scale(cfg, norm)

        def times_scale_squared(x):  # x · s², as four representable factors
            return (((x * half) * half) * half) * half

        return times_scale_squared(rows), times_scale_squared(cols), (norm * half) * half, half

    def rescaled():
        peak, unit_g = _divided_by_peak(g)
        unit_sq = jnp.square(unit_g)
        rows_u, cols_u = jnp.sum(unit_sq, axis=1), jnp.sum(unit_sq, axis=0)
        unit = jnp.sqrt(jnp.sum(rows_u))
        # The clipped gradient is (g / peak) · clipped_peak.
        half, clipped_peak = _clip_from_peak(cfg, peak, unit)
        factor = jnp.square(clipped_peak)
        return rows_u * factor, cols_u * factor, unit * clipped_peak, half

    return _unless_overflow(jnp.isfinite(sum_sq), direct, rescaled, g)


class _FactoredCarry(NamedTuple):
    """What steps 5–9 of one factored leaf need from before step 3."""

    w: jax.Array
    state: FactoredLeafState
    m_tilde: jax.Array | None  # M̃ when materialised
    row_sq: jax.Array
    col_sq: jax.Array
    eps_t: jax.Array


def _factored_request(cfg, layout: _Layout, g, w, state: FactoredLeafState, count, key):
    """Steps 1–2 of one factored leaf: its :class:`_FactorRequest` for step 3 (computed for
    all leaves together by :func:`_new_factors`) and the :class:`_FactoredCarry` that
    :func:`_factored_finish` continues from.

    Work per step (r the rank, every product below is m×n×r unless noted): the momentum
    ``M̃ = γ M̃_prev + (b1 − γ) U Σ Vᵀ + (1 − b1) s G`` (s the clip factor, applied as two
    square roots: :func:`_half_clip_scale`) is materialised
    only when it is needed as a whole: to keep it in the state (γ > 0), for the exact SVD and
    for the adaptive rank's ‖M̃‖_F. With b1 = γ the old momentum is not expanded. Without
    the buffer (γ = 0) it stays a :class:`LowRankPlusDense` ``b1 U Σ Vᵀ + (1 − b1) s G``,
    and ``M̃ Ω``, ``Qᵀ M̃`` cost one product with G each. Per step: refresh: sketch (1),
    project (1), new momentum (1), plus one to build M̃ when γ > 0 and b1 ≠ γ; fixed basis
    (svd_every > 1): ``Uᵀ M̃ V`` (1) and the new momentum (1), plus the same build product.
    The decomposition and the outputs are then elementwise passes that XLA fuses.
    """
    dtype = state.sigma.dtype
    m, n, r = layout.rows, layout.cols, layout.buffer_rank
    g = _sharding.reshape(g.astype(dtype), (m, n))
    row_sq, col_sq, g_norm, half_scale = _clipped_square_sums(g, cfg)
    w = w.astype(dtype)
    eps_t = _adaptive_eps(cfg, g_norm, w)
    u, v = _sharding.reshape(state.u, (m, r)), _sharding.reshape(state.v, (n, r))
    sigma = state.sigma
    mask = _active_mask(state.rank, r, dtype)

    # Step 2: M̃ = b1 U Σ Vᵀ + (1 − b1) G̃ + γ E with G̃ = (G · half) · half. The state keeps
    # M̃_prev instead of E = M̃_prev − U Σ Vᵀ, so M̃ = γ M̃_prev + (b1 − γ) U Σ Vᵀ + (1 − b1) G̃:
    # with b1 = γ (the defaults) the old momentum is never expanded.
    g_coef = (1 - cfg.b1) * half_scale
    m_tilde = None
    if state.dense_momentum is not None or cfg.adaptive_rank or cfg.svd_method == "exact":
        m_tilde = (g * half_scale) * g_coef
        low_rank_coef = cfg.b1
        if state.dense_momentum is not None:
            previous = _sharding.reshape(state.dense_momentum.astype(dtype), (m, n))
            m_tilde = m_tilde + cfg.error_decay * previous
            low_rank_coef = cfg.b1 - cfg.error_decay
        if not _is_static_zero(low_rank_coef):
            m_tilde = m_tilde + (u @ (low_rank_coef * sigma)) @ v.T
        operand = m_tilde
    else:
        operand = LowRankPlusDense(g, g_coef, u @ (cfg.b1 * sigma), v, scale_out=half_scale)
    # The rank is static: the caller adds it (a stacked request comes out of jax.vmap).
    request = _FactorRequest(operand, u, v, mask, key, rank=None)
    return request, _FactoredCarry(w, state, m_tilde, row_sq, col_sq, eps_t)


def _factored_finish(cfg, layout: _Layout, carry: _FactoredCarry, factors, count):
    """Steps 4–9 of one factored leaf from its new factors ``(U, Σ, V, σ₁)``: returns
    ``(direction, new_state)``."""
    w, state, m_tilde, row_sq, col_sq, eps_t = carry
    new_u, new_sigma, new_v, top = factors
    dtype = state.sigma.dtype
    shape = w.shape
    m, n, r = layout.rows, layout.cols, layout.buffer_rank
    momentum = (new_u @ new_sigma) @ new_v.T

    # Steps 5–6: factored second moments and the preconditioner Ŝ = R Cᵀ / sum(R).
    row = cfg.b2 * _sharding.reshape(state.row, (m,)) + (1 - cfg.b2) * row_sq
    col = cfg.b2 * _sharding.reshape(state.col, (n,)) + (1 - cfg.b2) * col_sq
    c1, c2 = _bias_corrections(cfg, count, dtype)
    s_hat = _outer(row / jnp.sum(row), col) / c2
    # Step 8: D = (U Σ Vᵀ) ⊙ (Ŝ + ε_t)^(−1/2).
    direction = (momentum / c1) * jax.lax.rsqrt(s_hat + eps_t)

    saliency = None
    if state.saliency is not None:
        # Step 9: S ← α S + (1 − α) (W − W0)² ⊙ sqrt(R_i C_j).
        deviation = _sharding.reshape(jnp.square(w - state.initial.astype(dtype)), (m, n))
        fresh = deviation * _outer(jnp.sqrt(row), jnp.sqrt(col))  # R Cᵀ may overflow
        saliency = cfg.saliency_decay * _sharding.reshape(state.saliency.astype(dtype), (m, n))
        saliency = _sharding.reshape(saliency + (1 - cfg.saliency_decay) * fresh, shape)
        saliency = saliency.astype(state.saliency.dtype)

    dense_momentum = None
    if state.dense_momentum is not None:
        # Step 4, E ← M̃ − U Σ Vᵀ (also between refreshes, docs/algorithm.md §2.5), is kept implicit:
        # the state holds M̃ itself, and E = M̃ − U Σ Vᵀ with the new factors.
        dense_momentum = _sharding.reshape(m_tilde, shape).astype(state.dense_momentum.dtype)

    rank = state.rank
    if rank is not None:
        frob_sq = jnp.sum(jnp.square(m_tilde))
        rank = _next_rank(cfg, rank, _stable_rank(frob_sq, top), r, count)

    new_state = state._replace(
        u=_sharding.reshape(new_u, state.u.shape),
        sigma=new_sigma,
        v=_sharding.reshape(new_v, state.v.shape),
        dense_momentum=dense_momentum,
        row=_sharding.reshape(row, state.row.shape),
        col=_sharding.reshape(col, state.col.shape),
        saliency=saliency,
        rank=rank,
    )
    return _sharding.reshape(direction, shape), new_state


# ----------------------------------------------------------------------------- stacking


def _merge_batch(layout: _Layout, x: jax.Array) -> jax.Array:
    """A batched leaf's array with its leading batch axes merged into one."""
    return _sharding.reshape(
        x, (math.prod(x.shape[: layout.batch_axes]),) + x.shape[layout.batch_axes :]
    )


def _on_batch(layout: _Layout, fn: Callable[..., Any], args: tuple, count: jax.Array) -> Any:
    """``fn(g, w, state, count)`` mapped over the leading batch axes of a leaf."""
    batch = args[1].shape[: layout.batch_axes]
    flat = jax.tree.map(functools.partial(_merge_batch, layout), args)
    out = jax.vmap(fn, in_axes=(0, 0, 0, None))(*flat, count)
    return jax.tree.map(lambda x: _sharding.reshape(x, batch + x.shape[1:]), out)


def _stackable(cfg: _Config, layout: _Layout, g: jax.Array, w: jax.Array) -> bool:
    """Whether a leaf may join a stack of equally shaped leaves: not under Explicit
    sharding (stacks would need their own partition), not a leaf that is already a stack
    of matrices (batch axes), and factored leaves only with the subspace method (the
    exact SVD is the per-matrix reference)."""
    if _sharding.explicit_spec(g) is not None or _sharding.explicit_spec(w) is not None:
        return False
    if layout.batch_axes:
        return False
    return layout.row_axes is None or cfg.svd_method == "subspace"


def _stack_key(layout: _Layout, g: jax.Array, w: jax.Array, leaf_state: Any) -> tuple:
    """Leaves with equal keys are updated as one stack (see ``group_leaves``)."""
    arrays = tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(leaf_state))
    shapes = (g.shape, jnp.dtype(g.dtype), jnp.dtype(w.dtype))
    return (layout, shapes, jax.tree.structure(leaf_state), arrays)


def _on_stack(fn: Callable[..., Any], args: list[tuple]) -> Any:
    """``fn(*args[0])`` for one leaf; for several, ``fn`` mapped over their stack (each
    argument stacked along a new leading axis, results stacked likewise). Arguments that
    are the same object for every leaf (the step count) are passed unstacked."""
    if len(args) == 1:
        return fn(*args[0])
    shared = [all(a[j] is args[0][j] for a in args) for j in range(len(args[0]))]
    stacked = [
        args[0][j] if shared[j] else jax.tree.map(lambda *xs: jnp.stack(xs), *(a[j] for a in args))
        for j in range(len(args[0]))
    ]
    in_axes = [None if s else 0 for s in shared]
    return jax.vmap(fn, in_axes=in_axes)(*stacked)


def _unstacked(out: Any, size: int) -> list[Any]:
    """The per-leaf results of :func:`_on_stack` (``out`` itself for a single leaf)."""
    if size == 1:
        return [out]
    # Materialise the stack first: otherwise XLA fuses the whole stacked computation into
    # each member's slice and recomputes it per member (seen on an H100: 0.5 ms per m×n).
    out = jax.lax.optimization_barrier(out)
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(size)]


def scale_by_umtam(
    *,
    rank: int = 32,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    error_decay: float = 0.9,
    clip_threshold: float | None = 1.0,
    saliency_decay: float = 0.9,
    svd_method: Literal["exact", "subspace"] = "subspace",
    svd_every: int = 1,
    oversampling: int = 0,
    power_iterations: int = 0,
    min_dim_size_to_factor: int = 128,
    row_axes: RowAxesFn | None = None,
    bias_correction: bool = False,
    saliency: Literal["tracked", "final"] = "tracked",
    buffer_dtype: Any = None,
    adaptive_rank: bool = False,
    max_rank: int | None = None,
    min_rank: int = 1,
    rank_step: int = 4,
    rank_update_every: int = 100,
    rank_grow_threshold: float = 1.5,
    rank_shrink_threshold: float = 0.5,
    seed: int = 0,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    """Rescales gradients by UMTAM's low-rank, error-fed, factored-preconditioned momentum.

    For each matrix-like parameter (see ``row_axes``/``min_dim_size_to_factor``) and step t
    (docs/algorithm.md §2.2), with the clipped gradient G:

    1. ``M̃ = b1 U Σ Vᵀ + (1 − b1) G + γ E``; ``(U, Σ, V) = TruncatedSVD_r(M̃)``;
       ``E = M̃ − U Σ Vᵀ``.
    2. ``R ← b2 R + (1 − b2) rowsum(G²)``, ``C ← b2 C + (1 − b2) colsum(G²)``,
       ``Ŝ = R Cᵀ / sum(R)``, ``ε_t = eps · max(1, ‖G‖_F / ‖W‖_F)``.
    3. Output ``D = (U Σ Vᵀ) ⊙ (Ŝ + ε_t)^(−1/2)``.
    4. Saliency ``S ← α S + (1 − α)(W − W0)² ⊙ sqrt(R_i C_j)``.

    Other parameters (biases, norms, small matrices) use an Adam-like rule with the same
    hyper-parameters (docs/algorithm.md §2.4); ``bias_correction`` applies to both kinds.
    ``update`` needs ``params``.

    Args:
      rank: rank r of the momentum (clipped to ``min(m, n)`` per parameter).
      b1: momentum decay β1 in [0, 1).
      b2: second-moment decay β2 in [0, 1).
      eps: ε > 0, scaled per step into the adaptive ε_t.
      error_decay: error-feedback weight γ; ``0`` allocates no m×n momentum buffer at all
        (with γ > 0 the state keeps M̃, from which ``E = M̃ − U Σ Vᵀ``).
      clip_threshold: per-parameter Frobenius-norm clipping threshold τ (``None``: off).
      saliency_decay: saliency EMA decay α in [0, 1).
      svd_method: ``"exact"`` (full SVD, the reference) or ``"subspace"`` (warm-started
        randomized range finder reusing the previous V, two m×n×r matmuls).
      svd_every: a fresh decomposition every ``svd_every`` steps; in between the bases are
        kept and only the r×r core is re-projected (docs/algorithm.md §2.5).
      oversampling: extra random sketch columns for ``"subspace"``.
      power_iterations: extra power iterations for ``"subspace"``.
      min_dim_size_to_factor: factor a parameter only if both sides of its 2-D view are at
        least this large (as in ``optax.adafactor``).
      row_axes: ``(key_path, shape) -> k | MatrixAxes`` choosing the matrix view per
        parameter: ``k`` gives one ``(prod(shape[:k]), prod(shape[k:]))`` matrix;
        ``MatrixAxes(batch, rows)`` makes the leading ``batch`` axes a stack of
        independent matrices (layer-stacked models; see :func:`umtam_jax.scanned`), each
        with its own factors, second moments, clipping norm, ε_t, saliency and rank.
        Default :func:`default_row_axes` (fan-in × fan-out). Rows or columns of size 0
        make a parameter dense.
      bias_correction: divide the momentum by ``1 − b1^t`` and Ŝ (dense: v) by ``1 − b2^t``.
      saliency: ``"tracked"`` keeps W0 and S in the state; ``"final"`` keeps neither (merge
        code computes S once from the expert, the base and R, C).
      buffer_dtype: dtype of the m×n buffers (the momentum M̃ kept for error feedback, and
        S; default: the compute dtype).
      adaptive_rank: adapt the rank with Eq. 16 (buffers sized ``max_rank``).
      max_rank: buffer rank with adaptive rank (default ``2 * rank``).
      min_rank: lower bound of the adaptive rank.
      rank_step: Δr of Eq. 16.
      rank_update_every: T_adapt of Algorithm 1.
      rank_grow_threshold: α > 1 of Eq. 16.
      rank_shrink_threshold: β < 1 of Eq. 16.
      seed: seed of the random initial factors and of the oversampling columns.
      group_leaves: update parameters of equal shape (and equal state layout) as one
        stack, mapped with ``jax.vmap``: one kernel per operation for all of them instead
        of one per parameter, at the price of copying them into the stack and back.
        Results equal the per-parameter ones up to rounding. For GPUs and TPUs, where an
        update of many parameters is bound by kernel launches (an H100 ran the update
        1.16–1.53× faster on GPT-2-shaped models); not for CPUs, where the copies cost
        more than they save (3.5× slower). Off by default because the copies need memory:
        XLA plans 2–3.8× the parameter bytes more temporary memory for the update (GPT-2
        shapes, lean and default settings; per parameter ~1×). Parameters under Explicit
        sharding, and factored ones with ``svd_method="exact"``, are always updated one by
        one.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByUmtamState`.

    Example:
      >>> import jax.numpy as jnp, optax, umtam_jax
      >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
      >>> tx = umtam_jax.scale_by_umtam(rank=8)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full((256, 128), 0.1), "b": jnp.ones(128)}
      >>> updates, state = tx.update(grads, state, params)

    References:
      UMTAM, arXiv:2512.17109, Algorithm 1; Adafactor, arXiv:1804.04235.
    """
    if saliency not in ("tracked", "final"):
        raise ValueError(f"saliency must be 'tracked' or 'final', got {saliency!r}")
    cfg = _Config(
        rank=rank,
        b1=b1,
        b2=b2,
        eps=eps,
        error_decay=error_decay,
        clip_threshold=clip_threshold,
        saliency_decay=saliency_decay,
        svd_method=svd_method,
        svd_every=svd_every,
        oversampling=oversampling,
        power_iterations=power_iterations,
        min_dim_size_to_factor=min_dim_size_to_factor,
        row_axes=row_axes or default_row_axes,
        bias_correction=bias_correction,
        track_saliency=saliency == "tracked",
        buffer_dtype=_as_dtype(buffer_dtype),
        adaptive_rank=adaptive_rank,
        max_rank=max_rank if max_rank is not None else 2 * rank,
        min_rank=min_rank,
        rank_step=rank_step,
        rank_update_every=rank_update_every,
        rank_grow_threshold=rank_grow_threshold,
        rank_shrink_threshold=rank_shrink_threshold,
        seed=seed,
        group_leaves=group_leaves,
    )
    _validate(cfg)
    base_key = jax.random.key(seed)

    def init_fn(params):
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = []
        for index, (path, param) in enumerate(paths_and_leaves):
            param = _concrete_param(cfg, path, param)
            _require_float(path, param.dtype, "parameter")
            layout = _layout(cfg, path, param.shape)
            leaves.append(_init_leaf(cfg, layout, param, jax.random.fold_in(base_key, index)))
        return ScaleByUmtamState(
            count=jnp.zeros([], jnp.int32), leaves=jax.tree_util.tree_unflatten(treedef, leaves)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_umtam needs params: call update(grads, state, params)")
        return _update(updates, state, params)

    # Full float32 products: the default on GPU/TPU would run them as TF32/bf16 passes,
    # whose ~1e-3 rounding breaks the orthonormality of U and V (measured on an H100).
    @full_precision
    def _update(updates, state, params):
        count = optax.safe_increment(state.count)
        grads_with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
        # Python scalar leaves become 0-d arrays, as optax's own transforms treat them.
        grads_with_path = [(path, jnp.asarray(g)) for path, g in grads_with_path]
        param_leaves = [jnp.asarray(w) for w in _flatten_like(treedef, params, "params")]
        state_leaves = _flatten_like(treedef, state.leaves, "the optimizer state (from init)")
        leaf_states = [as_leaf_state(x) for x in state_leaves]
        stack = cfg.group_leaves
        groups: dict[Any, list[int]] = {}
        layouts = []
        for index, ((path, g), w, leaf_state) in enumerate(
            zip(grads_with_path, param_leaves, leaf_states, strict=True)
        ):
            _require_float(path, g.dtype, "gradient")
            if g.shape != w.shape:
                raise ValueError(
                    f"gradient shape {g.shape} differs from parameter shape {w.shape} at "
                    f"{jax.tree_util.keystr(path)}"
                )
            layout = _layout(cfg, path, w.shape)
            layouts.append(layout)
            group = (index,)
            if stack and _stackable(cfg, layout, g, w):
                group = _stack_key(layout, g, w, leaf_state)
            groups.setdefault(group, []).append(index)
        grads = [g for _, g in grads_with_path]
        directions: list[Any] = [None] * len(grads)
        new_states: list[Any] = [None] * len(grads)
        pending, requests = [], []  # factored leaves wait for step 3, done for all at once
        for members in groups.values():
            layout = layouts[members[0]]
            args = [(grads[i], param_leaves[i], leaf_states[i]) for i in members]
            if layout.row_axes is None:
                dense = functools.partial(_update_dense, cfg)
                if layout.batch_axes:  # one clipping norm and ε_t per slice
                    out = _on_batch(layout, dense, args[0], count)
                    directions[members[0]] = out[0].astype(grads[members[0]].dtype)
                    new_states[members[0]] = out[1]
                    continue
                out = _on_stack(dense, [(*a, count) for a in args])
                for i, (d, new) in zip(members, _unstacked(out, len(members)), strict=True):
                    directions[i], new_states[i] = d.astype(grads[i].dtype), new
                continue
            keys = [jax.random.fold_in(jax.random.fold_in(base_key, i), count) for i in members]
            request_fn = functools.partial(_factored_request, cfg, layout)
            if layout.batch_axes:  # a stack of matrices in one leaf: mapped over its batch
                ((g, w, leaf_state),) = args
                batch = w.shape[: layout.batch_axes]
                flat = jax.tree.map(functools.partial(_merge_batch, layout), (g, w, leaf_state))
                keys = jax.random.split(keys[0], math.prod(batch))
                spec = _sharding.explicit_spec(flat[1])
                if spec is not None:  # vmap needs its mapped axis sharded alike
                    keys = _sharding.reshard_like(keys, spec[:1])
                mapped = jax.vmap(request_fn, in_axes=(0, 0, 0, None, 0))
                request, carry = mapped(*flat, count, keys)
            else:
                args = [(*a, count, key) for a, key in zip(args, keys, strict=True)]
                request, carry = _on_stack(request_fn, args)
            pending.append((members, layout, carry))
            requests.append(request._replace(rank=layout.buffer_rank))
        for (members, layout, carry), factors in zip(
            pending, _new_factors(cfg, requests, count), strict=True
        ):
            finish = functools.partial(_factored_finish, cfg, layout, count=count)
            if layout.batch_axes:
                batch = param_leaves[members[0]].shape[: layout.batch_axes]
                out = jax.tree.map(
                    lambda x, b=batch: _sharding.reshape(x, b + x.shape[1:]),
                    jax.vmap(finish)(carry, factors),
                )
                outs = [out]
            elif len(members) == 1:
                outs = [finish(carry, factors)]
            else:
                outs = _unstacked(jax.vmap(finish)(carry, factors), len(members))
            for i, (d, new) in zip(members, outs, strict=True):
                directions[i], new_states[i] = d.astype(grads[i].dtype), new
        return (
            jax.tree_util.tree_unflatten(treedef, directions),
            ScaleByUmtamState(
                count=count, leaves=jax.tree_util.tree_unflatten(treedef, new_states)
            ),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _concrete_param(cfg: _Config, path: tuple[Any, ...], param: Any) -> jax.Array:
    """The parameter as an array; an abstract one (``jax.ShapeDtypeStruct``) gives zeros of
    its shape, dtype and sharding, which is all ``init`` reads without tracked saliency."""
    if not isinstance(param, jax.ShapeDtypeStruct):
        return jnp.asarray(param)
    if cfg.track_saliency:
        raise ValueError(
            f"init got an abstract parameter (jax.ShapeDtypeStruct) at "
            f"{jax.tree_util.keystr(path) or 'the root'}: tracked saliency keeps the "
            "initial values W0, so pass the parameters themselves, use saliency='final', "
            "or take shapes with jax.eval_shape(opt.init, params)"
        )
    sharding = param.sharding if isinstance(param.sharding, jax.sharding.Sharding) else None
    return jnp.zeros(param.shape, param.dtype, device=sharding)


def _as_dtype(value: Any) -> Any:
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError:
        raise TypeError(f"buffer_dtype must be a dtype, got {value!r}") from None


def _check_learning_rate(value: Any) -> None:
    """A float, a 0-d array (or traced value) or an Optax schedule; finite when concrete."""
    if callable(value):
        return
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_scalar_array = isinstance(value, jax.Array | np.ndarray | np.generic) and not np.shape(value)
    if not (is_number or is_scalar_array):
        raise TypeError(
            "learning_rate must be a float, a scalar array or an optax schedule (a "
            f"callable of the step), got {value!r} ({type(value).__name__})"
        )


def _flatten_like(treedef: Any, tree: Any, what: str) -> list[Any]:
    """``treedef.flatten_up_to(tree)``, with an error that says which argument differs."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError):

        def short(structure: Any) -> str:
            text = str(structure)
            return text if len(text) <= 200 else text[:200] + "…"

        raise ValueError(
            f"{what} does not have the tree structure of the gradients: gradients "
            f"{short(treedef)}, {what} {short(jax.tree.structure(tree, is_leaf=is_leaf_state))}"
        ) from None


def _require_float(path, dtype, what: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what} at {jax.tree_util.keystr(path)} has dtype {dtype}; UMTAM needs real "
            "floating-point leaves (freeze the others with optax.masked / optax.partition)"
        )


def umtam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 32,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    error_decay: float = 0.9,
    clip_threshold: float | None = 1.0,
    saliency_decay: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any = None,
    svd_method: Literal["exact", "subspace"] = "subspace",
    svd_every: int = 1,
    min_dim_size_to_factor: int = 128,
    oversampling: int = 0,
    power_iterations: int = 0,
    row_axes: RowAxesFn | None = None,
    bias_correction: bool = False,
    saliency: Literal["tracked", "final"] = "tracked",
    buffer_dtype: Any = None,
    adaptive_rank: bool = False,
    max_rank: int | None = None,
    min_rank: int = 1,
    rank_step: int = 4,
    rank_update_every: int = 100,
    rank_grow_threshold: float = 1.5,
    rank_shrink_threshold: float = 0.5,
    seed: int = 0,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    """The UMTAM optimizer: ``chain(scale_by_umtam, add_decayed_weights, scale_by_learning_rate)``.

    With ``learning_rate=1`` and ``weight_decay=0`` the update is exactly ``−D`` of
    docs/algorithm.md §2.2. The state keeps, per parameter, what model merging needs
    (momentum factors, factored second moments, saliency): read it with
    :func:`umtam_jax.statistics`.

    Args:
      learning_rate: a float or an Optax schedule.
      rank: momentum rank r.
      b1: momentum decay.
      b2: second-moment decay.
      eps: base regulariser of the preconditioner.
      error_decay: error-feedback weight γ (0: no m×n momentum buffer).
      clip_threshold: per-parameter gradient-norm clipping (``None``: off).
      saliency_decay: saliency EMA decay α.
      weight_decay: decoupled weight decay, applied as in ``optax.adamw``.
      mask: pytree or callable choosing the parameters that receive weight decay.
      svd_method: ``"exact"`` or ``"subspace"`` (default, warm-started range finder).
      svd_every: fresh decomposition period (core re-projection in between).
      min_dim_size_to_factor: smallest side of a factored parameter.
      oversampling, power_iterations, row_axes, bias_correction, saliency, buffer_dtype,
        adaptive_rank, max_rank, min_rank, rank_step, rank_update_every,
        rank_grow_threshold, rank_shrink_threshold, seed, group_leaves: as in
        :func:`scale_by_umtam`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, umtam_jax
      >>> params = {"w": jnp.ones((256, 128))}
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), umtam_jax.umtam(1e-3, rank=8))
      >>> state = opt.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      UMTAM, arXiv:2512.17109.
    """
    _check_learning_rate(learning_rate)
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        number = _concrete(value)  # None for a schedule or a traced value
        _check(number is None or math.isfinite(number), f"{name} must be finite, got {value!r}")
    return optax.chain(
        scale_by_umtam(
            rank=rank,
            b1=b1,
            b2=b2,
            eps=eps,
            error_decay=error_decay,
            clip_threshold=clip_threshold,
            saliency_decay=saliency_decay,
            svd_method=svd_method,
            svd_every=svd_every,
            min_dim_size_to_factor=min_dim_size_to_factor,
            oversampling=oversampling,
            power_iterations=power_iterations,
            row_axes=row_axes,
            bias_correction=bias_correction,
            saliency=saliency,
            buffer_dtype=buffer_dtype,
            adaptive_rank=adaptive_rank,
            max_rank=max_rank,
            min_rank=min_rank,
            rank_step=rank_step,
            rank_update_every=rank_update_every,
            rank_grow_threshold=rank_grow_threshold,
            rank_shrink_threshold=rank_shrink_threshold,
            seed=seed,
            group_leaves=group_leaves,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
