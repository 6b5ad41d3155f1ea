"""Adaptive rank (Eq. 16, docs/algorithm.md §2.6): the active components of a factored
leaf's momentum and the rule that grows or shrinks their number from its stable rank."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer._config import Config


def active_mask(rank: jax.Array | None, size: int, dtype: Any) -> jax.Array | None:
    """``1`` for the first ``rank`` of ``size`` components, else ``0`` (``None`` without
    adaptive rank)."""
    if rank is None:
        return None
    return (jnp.arange(size) < rank).astype(dtype)


def stable_rank(frob_sq: jax.Array, top: jax.Array) -> jax.Array:
    """``‖M‖_F² / σ₁(M)²`` (Eq. 5/15: the paper's r_s and r_eff coincide; docs/algorithm.md
    §2.6)."""
    return frob_sq / jnp.maximum(jnp.square(top), jnp.finfo(frob_sq.dtype).tiny)


def next_rank(cfg: Config, rank: jax.Array, stable_rank: jax.Array, limit: int, count):
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
