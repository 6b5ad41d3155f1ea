"""Step 3 for all factored leaves at once: the new momentum factors ``(U, Σ, V, σ₁)``,
from a fresh rank-r decomposition on refresh steps or by re-projecting the core onto the
kept bases in between (docs/algorithm.md §2.5).

Each leaf hands in a :class:`FactorRequest`; the subspace method runs all requests in
lockstep (:func:`umtam_jax.optimizer._lowrank.subspace_svd_many`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._config import Config, is_static_zero
from umtam_jax.optimizer._lowrank import (
    Decomposition,
    LowRankPlusDense,
    exact_svd,
    matmul_any,
    subspace_svd_many,
)

COLD_START_POWER_ITERATIONS = 4
"""Extra power iterations of the first decomposition without error feedback (its warm start
V0 is random); see :func:`cold_start_iterations`."""


def cold_start_iterations(cfg: Config) -> int:
    """How many extra power iterations the first decomposition runs: none with error feedback,
    :data:`COLD_START_POWER_ITERATIONS` without it (``error_decay=0``, lean).

    The first decomposition starts from a random ``V0``, so it keeps less of the momentum's
    top-r energy than later ones. With error feedback the part it misses stays in ``M̃`` and
    the next steps' warm-started iterations catch up (measured: the same captured energy from
    the third step on and the same final validation loss, ``benchmarks/cold_start.py``), so
    the step needs no conditional on the step count. Without error feedback the missed part is lost
    and the low-rank momentum keeps steering the next sketches towards the poor first
    subspace (measured: a clearly higher final validation loss), so lean mode keeps the extra
    iterations, in a ``lax.cond`` on the step count.
    """
    return COLD_START_POWER_ITERATIONS if is_static_zero(cfg.error_decay) else 0


class FactorRequest(NamedTuple):
    """What one factored leaf needs from step 3: its momentum and its previous factors.

    The momentum keeps the leaf's layout ``rows + cols`` (after any stack axes); ``u``
    (m×r) and ``v`` (n×r) are 2-D. ``rank`` and ``row_axes`` are static: the caller adds
    them (a stacked request comes out of ``jax.vmap``).
    """

    operand: jax.Array | LowRankPlusDense  # M̃ (always materialised for the exact SVD)
    u: jax.Array
    v: jax.Array
    mask: jax.Array | None  # adaptive rank: active components
    key: jax.Array
    rank: int | None
    row_axes: int | None = None  # the operand's row axes when N-D (see _nd), None if 2-D


def _as_matrix(req: FactorRequest) -> jax.Array:
    """The (materialised) momentum of ``req`` as 2-D matrices: the exact SVD's input."""
    # The exact SVD's requests always carry the materialised M̃ (see factored_request).
    assert not isinstance(req.operand, LowRankPlusDense)
    if req.row_axes is None:
        return req.operand
    stack = req.u.shape[:-2]
    return _sharding.reshape(req.operand, stack + (req.u.shape[-2], req.v.shape[-2]))


def _decompose_all(cfg: Config, requests: list[FactorRequest], count) -> list[Decomposition]:
    """Step 3 for every factored leaf; the subspace method runs the leaves in lockstep."""
    if cfg.svd_method == "exact":
        # The reference method decomposes the whole matrix (gathered anyway, see exact_svd).
        return [exact_svd(_as_matrix(req), req.rank) for req in requests]

    def subspace(cold_start=None, power_iterations=cfg.power_iterations):
        return subspace_svd_many(
            [req.operand for req in requests],
            [req.v for req in requests],
            [req.rank for req in requests],
            oversampling=cfg.oversampling,
            power_iterations=power_iterations,
            keys=[req.key for req in requests],
            cold_start=cold_start,
            row_axes=[req.row_axes for req in requests],
        )

    extra = cold_start_iterations(cfg)
    if not extra:
        return subspace()
    # The extra iterations sit in a lax.cond around those iterations only: a conditional
    # around the whole decomposition is run by XLA:CPU as one serialised unit (10–15 ms per
    # step on the 28M-parameter benchmark). The update is always traced (an eager call runs
    # it compiled), so the count here is never concrete.
    return subspace(cold_start=(count == 1, extra))


def _diag(s: jax.Array) -> jax.Array:
    """``diag(s)``, also for a stack of vectors."""
    return jnp.vectorize(jnp.diag, signature="(r)->(r,r)")(s)


def _decision_tops(cfg: Config, requests: list[FactorRequest], count) -> list[jax.Array]:
    """σ₁(M̃) of every request on a fixed-basis step, for the adaptive rank.

    Eq. 16 takes the stable rank of ``M̃`` itself, which the projected core (``Uᵀ M̃ V``
    on the old bases) does not give. The rank changes only every ``rank_update_every``
    steps: on those steps ``M̃`` is decomposed as on a refresh step (the bases are still
    kept), on the others the value is not read (zeros, in a ``lax.cond``).
    """

    def fresh():
        return [dec.s[..., 0] for dec in _decompose_all(cfg, requests, count)]

    def unused():
        return [jnp.zeros(req.u.shape[:-2], req.u.dtype) for req in requests]

    return jax.lax.cond(count % cfg.rank_update_every == 0, fresh, unused)


def new_factors(cfg: Config, requests: list[FactorRequest], count) -> list[tuple]:
    """``(U, Σ, V, σ₁)`` of every factored leaf: a fresh decomposition (step 3) on refresh
    steps, else the fixed-basis projection ``Σ ← Uᵀ M̃ V`` of docs/algorithm.md §2.5.

    All leaves share the step count, so one ``lax.cond`` decides for all of them. A
    request may hold a stack of equally shaped leaves (leading axis), see
    :func:`umtam_jax.optimizer._grouping.on_stack`.
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
        cores = []
        for req in requests:
            # docs/algorithm.md §2.5 / paper Eq. 34: keep U, V; Σ ← Uᵀ M̃ V.
            core = _sharding.matmul(req.u.mT, matmul_any(req.operand, req.v, req.row_axes))
            if req.mask is not None:
                core = core * req.mask[..., :, None] * req.mask[..., None, :]
            cores.append(core)
        if cfg.adaptive_rank:
            tops = _decision_tops(cfg, requests, count)
        else:  # read by nothing: the rank is fixed
            tops = [core[..., 0, 0] for core in cores]
        return [
            (req.u, core, req.v, top) for req, core, top in zip(requests, cores, tops, strict=True)
        ]

    if not requests:
        return []
    if cfg.svd_every == 1:
        return refresh()
    return jax.lax.cond((count - 1) % cfg.svd_every == 0, refresh, project)
