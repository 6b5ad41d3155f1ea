"""Factored (matrix-like) leaves, docs/algorithm.md §2.2: the state init of one leaf and
its update around step 3, which runs for all leaves together (:mod:`._decomposition`).

:func:`factored_request` does steps 1–2 (clipping, the momentum M̃ with error feedback),
:func:`factored_finish` steps 4–9 (error feedback state, the factored second moments R, C
and the preconditioner, the direction, saliency and adaptive rank). Both see one matrix;
stacks of matrices are mapped over with ``jax.vmap`` by the caller.

The m×n arrays (gradient, momentum, deviation, saliency, direction) keep the leaf's N-D
layout ``rows + cols`` throughout: reshaping them to m×n would merge sharded axes, which an
Auto mesh can only do by gathering the whole array (see :mod:`._nd`). Only the thin factors
are reshaped between ``rows + (r,)`` and m×r (``cols + (r,)`` and n×r). A leaf that is one
2-D matrix takes the plain 2-D operations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._clipping import (
    adaptive_eps,
    clipped_square_sums,
    saturated_ema,
    shares,
)
from umtam_jax.optimizer._config import Config, bias_corrections, compute_dtype, is_static_zero
from umtam_jax.optimizer._decomposition import FactorRequest
from umtam_jax.optimizer._layout import Layout
from umtam_jax.optimizer._lowrank import LowRankPlusDense
from umtam_jax.optimizer._rank import active_mask, next_rank, stable_rank
from umtam_jax.optimizer._state import FactoredLeafState


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


def init_factored(
    cfg: Config, layout: Layout, param: jax.Array, key: jax.Array
) -> FactoredLeafState:
    """The initial state of one factored leaf (Algorithm 1, line 3), every array placed and
    partitioned like the parameter's axes it keeps."""
    dtype = compute_dtype(param.dtype)
    buffer_dtype = cfg.buffer_dtype or dtype
    # State arrays live where the parameter lives, partitioned like its axes.
    spec = _sharding.partition_of(param) or (None,) * param.ndim
    place = lambda x, axes: _sharding.place_like(x, param, axes)  # noqa: E731
    # A copy, not the params buffer itself: a training step may donate params and state.
    initial = place(jnp.array(param, copy=True), spec) if cfg.track_saliency else None
    saliency = place(jnp.zeros_like(param, buffer_dtype), spec) if cfg.track_saliency else None
    nb, r = layout.batch_axes, layout.buffer_rank
    assert layout.row_axes is not None  # a factored leaf's layout has row axes
    k = nb + layout.row_axes  # batch and row axes: the leading axes of u and row
    batch = param.shape[:nb]
    rows_shape, cols_shape = param.shape[:k], batch + param.shape[k:]
    rows_spec, cols_spec = spec[:k], spec[:nb] + spec[k:]
    key_u, key_v = jax.random.split(key)
    # Algorithm 1, line 3: U ~ N(0, 1/√(m r)), V ~ N(0, 1/√(n r)), read as standard deviations.
    u = jax.random.normal(key_u, rows_shape + (r,), dtype) / math.sqrt(layout.rows * r)
    v = jax.random.normal(key_v, cols_shape + (r,), dtype) / math.sqrt(layout.cols * r)
    u, v = place(u, rows_spec + (None,)), place(v, cols_spec + (None,))
    # Σ0 = eps · I on the active components; with adaptive rank those beyond it are 0.
    active = min(cfg.rank, r) if cfg.adaptive_rank else r
    diagonal = cfg.eps * (jnp.arange(r) < active).astype(dtype)
    sigma = jnp.broadcast_to(jnp.diag(diagonal), batch + (r, r))
    sigma = place(sigma, spec[:nb] + (None, None)) if nb else sigma
    dense_momentum = None
    if not is_static_zero(cfg.error_decay):
        # M̃_0 = U_0 Σ_0 V_0ᵀ + E_0 with E_0 = 0 (see FactoredLeafState.dense_momentum),
        # contracted over r only, so that it is computed sharded like the parameter.
        expanded = _expand(u * diagonal, v, nb)
        dense_momentum = place(expanded.astype(buffer_dtype), spec)
    rank = None
    if cfg.adaptive_rank:
        rank = jnp.full(batch, active, jnp.int32)
        rank = place(rank, spec[:nb]) if nb else rank
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


def operand_row_axes(layout: Layout, ndim: int) -> int | None:
    """The number of row axes of a leaf of ``ndim`` axes whose matrices keep an N-D layout
    (see :class:`._decomposition.FactorRequest`), None when each matrix is 2-D."""
    return None if ndim - layout.batch_axes == 2 else layout.row_axes


def _outer(row: jax.Array, col: jax.Array) -> jax.Array:
    """``row colᵀ`` by broadcasting, laid out as ``rows + cols`` (keeps both vectors'
    shardings)."""
    if row.ndim == col.ndim == 1:
        return row[:, None] * col[None, :]
    return jnp.expand_dims(row, tuple(range(row.ndim, row.ndim + col.ndim))) * col


def _low_rank(left: jax.Array, v: jax.Array) -> jax.Array:
    """``left vᵀ`` laid out as ``rows + cols``, for factors shaped ``rows + (r,)`` and
    ``cols + (r,)``."""
    if left.ndim == v.ndim == 2:
        return left @ v.T
    return _expand(left, v, 0)


class FactoredCarry(NamedTuple):
    """What steps 5–9 of one factored leaf need from before step 3."""

    w: jax.Array
    state: FactoredLeafState
    m_tilde: jax.Array | None  # M̃ when materialised
    row_sq: jax.Array
    col_sq: jax.Array
    eps_t: jax.Array


def factored_request(
    cfg: Config, layout: Layout, g, w, state: FactoredLeafState, count, key
) -> tuple[FactorRequest, FactoredCarry]:
    """Steps 1–2 of one factored leaf: its :class:`FactorRequest` for step 3 (computed for
    all leaves together by :func:`umtam_jax.optimizer._decomposition.new_factors`) and the
    :class:`FactoredCarry` that :func:`factored_finish` continues from.

    Work per step (r the rank, every product below is m×n×r unless noted): the momentum
    ``M̃ = γ M̃_prev + (b1 − γ) U Σ Vᵀ + (1 − b1) s G`` (s the clip factor, applied as two
    square roots: see :func:`umtam_jax.optimizer._clipping.clipped_square_sums`) is
    materialised only when it is needed as a whole: to keep it in the state (γ > 0), for
    the exact SVD and for the adaptive rank's ‖M̃‖_F. With b1 = γ the old momentum is not
    expanded. Without the buffer (γ = 0) it stays a :class:`LowRankPlusDense`
    ``b1 U Σ Vᵀ + (1 − b1) s G``, and ``M̃ Ω``, ``Qᵀ M̃`` cost one product with G each. Per
    step: refresh: sketch (1), project (1), new momentum (1), plus one to build M̃ when
    γ > 0 and b1 ≠ γ; fixed basis (svd_every > 1): ``Uᵀ M̃ V`` (1) and the new momentum
    (1), plus the same build product. The decomposition and the outputs are then
    elementwise passes that XLA fuses.
    """
    dtype = state.sigma.dtype
    m, n, r = layout.rows, layout.cols, layout.buffer_rank
    g = g.astype(dtype)  # rows + cols: see the module docstring
    assert layout.row_axes is not None  # a factored leaf's layout has row axes
    row_sq, col_sq, g_norm, half_scale = clipped_square_sums(
        g, cfg, layout.row_axes, weight=1 - cfg.b2
    )
    w = w.astype(dtype)
    eps_t = adaptive_eps(cfg, g_norm, w)
    u, v = _sharding.reshape(state.u, (m, r)), _sharding.reshape(state.v, (n, r))
    sigma = state.sigma
    mask = active_mask(state.rank, r, dtype)

    # Step 2: M̃ = b1 U Σ Vᵀ + (1 − b1) G̃ + γ E with G̃ = (G · half) · half. The state keeps
    # M̃_prev instead of E = M̃_prev − U Σ Vᵀ, so M̃ = γ M̃_prev + (b1 − γ) U Σ Vᵀ + (1 − b1) G̃:
    # with b1 = γ (the defaults) the old momentum is never expanded.
    g_coef = (1 - cfg.b1) * half_scale
    m_tilde = None
    if state.dense_momentum is not None or cfg.adaptive_rank or cfg.svd_method == "exact":
        m_tilde = (g * half_scale) * g_coef
        low_rank_coef = cfg.b1
        if state.dense_momentum is not None:
            m_tilde = m_tilde + cfg.error_decay * state.dense_momentum.astype(dtype)
            low_rank_coef = cfg.b1 - cfg.error_decay
        if not is_static_zero(low_rank_coef):
            m_tilde = m_tilde + _low_rank(state.u @ (low_rank_coef * sigma), state.v)
        operand = m_tilde
    else:
        operand = LowRankPlusDense(g, g_coef, u @ (cfg.b1 * sigma), v, scale_out=half_scale)
    # The rank and the row axes are static: the caller adds them (a stacked request comes
    # out of jax.vmap).
    request = FactorRequest(operand, u, v, mask, key, rank=None)
    return request, FactoredCarry(w, state, m_tilde, row_sq, col_sq, eps_t)


def factored_saliency(
    cfg: Config,
    w: jax.Array,
    saliency: jax.Array,
    initial: jax.Array,
    row: jax.Array,
    col: jax.Array,
) -> jax.Array:
    """Step 9 of one factored leaf: ``S ← α S + (1 − α) (W − W0)² ⊙ sqrt(R_i C_j)`` from
    the new second moments ``row`` (R) and ``col`` (C); returned in ``saliency``'s dtype.

    An elementwise pass of its own, so that a stack of equally shaped leaves
    (``group_leaves``) can run it leaf by leaf and need not stack ``S`` and ``W0``.
    """
    dtype = row.dtype
    deviation = jnp.square(w.astype(dtype) - initial.astype(dtype))
    fresh = deviation * _outer(jnp.sqrt(row), jnp.sqrt(col))  # R Cᵀ may overflow
    return saturated_ema(cfg.saliency_decay, saliency, fresh)


def factored_finish(cfg: Config, layout: Layout, carry: FactoredCarry, factors, count):
    """Steps 4–9 of one factored leaf from its new factors ``(U, Σ, V, σ₁)``: returns
    ``(direction, new_state)``."""
    w, state, m_tilde, row_sq, col_sq, eps_t = carry
    new_u, new_sigma, new_v, top = factors
    dtype = state.sigma.dtype
    r = layout.buffer_rank
    # Back to rows + (r,) and cols + (r,) (thin), partitioned like the state's factors.
    new_u = _sharding.reshape_like(new_u, state.u)
    new_v = _sharding.reshape_like(new_v, state.v)
    momentum = _low_rank(new_u @ new_sigma, new_v)

    # Steps 5–6: factored second moments and the preconditioner Ŝ = R Cᵀ / sum(R), all
    # laid out like the leaf (R shaped rows, C shaped cols).
    # Saturated at the largest float: without clipping, sums of G² overflow for entries
    # near 1.8e19/√n, and inf / inf would make the update and every later one NaN.
    big = jnp.finfo(dtype).max
    row = jnp.minimum(cfg.b2 * state.row + row_sq, big)  # row_sq: (1 − b2) Σ_j G_ij²
    col = jnp.minimum(cfg.b2 * state.col + col_sq, big)
    c1, c2 = bias_corrections(cfg, count, dtype)
    s_hat = _outer(shares(row, tuple(range(row.ndim))), col) / c2
    # Step 8: D = (U Σ Vᵀ) ⊙ (Ŝ + ε_t)^(−1/2).
    direction = (momentum / c1) * jax.lax.rsqrt(s_hat + eps_t)

    saliency = None
    if state.saliency is not None:
        # Saliency and W0 are kept together (check_state_options matches the state to init).
        assert state.initial is not None
        saliency = factored_saliency(cfg, w, state.saliency, state.initial, row, col)

    dense_momentum = None
    if state.dense_momentum is not None:
        # Step 4, E ← M̃ − U Σ Vᵀ (also between refreshes, docs/algorithm.md §2.5), is kept
        # implicit: the state holds M̃ itself, and E = M̃ − U Σ Vᵀ with the new factors.
        assert m_tilde is not None  # factored_request materialises M̃ with a buffer
        dense_momentum = m_tilde.astype(state.dense_momentum.dtype)

    rank = state.rank
    if rank is not None:
        # A rank is kept only with adaptive_rank (check_state_options matches the state to
        # init), for which factored_request materialises M̃.
        assert m_tilde is not None
        frob_sq = jnp.sum(jnp.square(m_tilde))
        rank = next_rank(cfg, rank, stable_rank(frob_sq, top), r, count)

    new_state = state._replace(
        u=new_u,
        sigma=new_sigma,
        v=new_v,
        dense_momentum=dense_momentum,
        row=row,
        col=col,
        saliency=saliency,
        rank=rank,
    )
    return direction, new_state


def without_saliency(state: Any) -> Any:
    """A factored leaf's state without ``S`` and ``W0`` (parameter-sized, and only read by
    the elementwise step 9): what a stack of equally shaped leaves stacks."""
    return state._replace(saliency=None, initial=None)


def with_saliency(cfg: Config, new_state: Any, w: jax.Array, state: Any) -> Any:
    """The new state of one member of a stack, completed with step 9 from its own ``S`` and
    ``W0`` (``state``, before the step) when saliency is tracked."""
    if state.saliency is None:
        return new_state
    saliency = factored_saliency(
        cfg, w, state.saliency, state.initial, new_state.row, new_state.col
    )
    return new_state._replace(saliency=saliency, initial=state.initial)
