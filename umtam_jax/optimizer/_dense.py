"""Dense leaves (vectors, small matrices): an Adam-like rule with UMTAM's clipping,
adaptive ε_t and saliency (docs/algorithm.md §2.4), as the state init and update of one
leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._clipping import adaptive_eps, clip, saturated_ema
from umtam_jax.optimizer._config import Config, bias_corrections, compute_dtype
from umtam_jax.optimizer._state import DenseLeafState


def init_dense(cfg: Config, param: jax.Array) -> DenseLeafState:
    """The initial state of one dense leaf: ``m = 0``, ``v = eps``, ``S = 0``."""
    dtype = compute_dtype(param.dtype)
    buffer_dtype = cfg.buffer_dtype or dtype
    # A copy, not the params buffer itself: a training step may donate params and state.
    initial = jnp.array(param, copy=True) if cfg.track_saliency else None
    saliency = jnp.zeros_like(param, buffer_dtype) if cfg.track_saliency else None
    # State arrays live where the parameter lives, partitioned like it.
    spec = _sharding.partition_of(param) or (None,) * param.ndim

    def place(x: jax.Array) -> jax.Array:
        return _sharding.place_like(x, param, spec)

    return DenseLeafState(
        mu=place(jnp.zeros_like(param, dtype)),
        nu=place(jnp.full_like(param, cfg.eps, dtype)),
        saliency=None if saliency is None else place(saliency),
        initial=None if initial is None else place(initial),
    )


def update_dense(
    cfg: Config, g: jax.Array, w: jax.Array, state: DenseLeafState, count: jax.Array
) -> tuple[jax.Array, DenseLeafState]:
    """One step of one dense leaf: returns ``(direction, new_state)``.

    ``direction = m̂ / sqrt(v̂ + ε_t)`` from the clipped gradient; the saliency EMA reads
    ``(W − W0)² ⊙ sqrt(v)``.
    """
    dtype = state.mu.dtype
    g, g_norm = clip(g.astype(dtype), cfg)
    w = w.astype(dtype)
    eps_t = adaptive_eps(cfg, g_norm, w)
    mu = cfg.b1 * state.mu + (1 - cfg.b1) * g
    # Saturated, as the factored R and C: an overflowing g² gives a finite step and saliency.
    # (1 − b2) g² as h² with h = √(1 − b2) g: finite wherever the product is representable.
    # In a one-element leaf XLA rewrites h² into (1 − b2)·g², where g² overflows first; the
    # barrier keeps h whole there (a static shape test: larger leaves keep one fusion).
    h = jnp.sqrt(1 - cfg.b2) * g
    if g.size == 1:
        h = jax.lax.optimization_barrier(h)
    nu = cfg.b2 * state.nu + jnp.square(h)
    nu = jnp.minimum(nu, jnp.finfo(dtype).max)
    c1, c2 = bias_corrections(cfg, count, dtype)
    direction = (mu / c1) * jax.lax.rsqrt(nu / c2 + eps_t)
    saliency = None
    if state.saliency is not None:
        # Saliency and W0 are kept together (check_state_options matches the state to init).
        assert state.initial is not None
        deviation = jnp.square(w - state.initial.astype(dtype))
        saliency = saturated_ema(cfg.saliency_decay, state.saliency, deviation * jnp.sqrt(nu))
    return direction, state._replace(mu=mu, nu=nu, saliency=saliency)
