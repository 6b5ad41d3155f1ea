"""The momentum energy that rank-r truncations capture, measured for :mod:`benchmarks.spectrum`.

The singular values of UMTAM's momentum ``M̃ = U Σ Vᵀ + E``, rebuilt from its optimizer
state (:func:`spectra`, also read by :mod:`benchmarks.cold_start`), and one seed's training
run that measures them every few steps (:func:`run_seed`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._lm_training import set_lr, windows
from benchmarks._spectrum_report import CLAIM
from umtam_jax import ScaleByUmtamState
from umtam_jax.experiments.models.gpt import GPTConfig, init_gpt
from umtam_jax.optimizer._state import DenseLeafState, FactoredLeafState


def _umtam_state(opt_state) -> ScaleByUmtamState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, ScaleByUmtamState))
        if isinstance(s, ScaleByUmtamState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one UMTAM state, found {len(found)}")
    return found[0]


def factored_paths(opt_state) -> list[str]:
    leaves = _umtam_state(opt_state).leaves
    flat = jax.tree_util.tree_flatten_with_path(
        leaves, is_leaf=lambda n: isinstance(n, FactoredLeafState | DenseLeafState)
    )[0]
    return [jax.tree_util.keystr(p) for p, s in flat if isinstance(s, FactoredLeafState)]


@jax.jit
def spectra(opt_state):
    """Per factored leaf: singular values of M̃ = UΣVᵀ + E and ‖UΣVᵀ‖_F² (float32)."""
    leaves = _umtam_state(opt_state).leaves
    flat = jax.tree_util.tree_flatten_with_path(
        leaves, is_leaf=lambda n: isinstance(n, FactoredLeafState | DenseLeafState)
    )[0]
    out = []
    for _, s in flat:
        if not isinstance(s, FactoredLeafState):
            continue
        if s.dense_momentum is None:
            raise ValueError("run with error_decay > 0: the state then keeps M̃")
        r = s.sigma.shape[-1]
        u = s.u.reshape(-1, r)
        v = s.v.reshape(-1, r)
        low = (u @ s.sigma) @ v.T
        m_tilde = s.dense_momentum.reshape(low.shape).astype(low.dtype)
        sv = jnp.linalg.svd(m_tilde.astype(jnp.float32), compute_uv=False)
        out.append((sv, jnp.sum(jnp.square(low)), jnp.sum(jnp.square(m_tilde))))
    return out


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {
        "median": float(np.median(a)),
        "min": float(a.min()),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def run_seed(
    seed: int,
    *,
    size,
    cfg: GPTConfig,
    tx,
    step_fn,
    lr: float,
    rank: int,
    ranks: list[int],
    log_every: int,
    train: np.ndarray,
) -> dict[str, Any]:
    """Trains one seed's run and measures the captured energy at every logged step.

    Args:
        seed: Draws the initialisation (``jax.random.key(seed)``) and the batches.
        size: The training size (``benchmarks._lm_training.DEFAULT`` or ``QUICK``).
        cfg: The GPT's configuration.
        tx: The optimizer (lr 1 × schedule × traced lr, as ``benchmarks.training``).
        step_fn: The jitted training step of ``tx``.
        lr: Peak learning rate.
        rank: The rank of the UMTAM run (recorded with its own factors' fraction).
        ranks: Ranks at which the captured fraction is reported.
        log_every: Measure every this many steps (and at the first and last).
        train: The training tokens.

    Returns:
        The run's record: ``log_steps``, ``summary`` (per r), ``claim_check``,
        ``own_factors_captured``, ``per_matrix`` and ``wall_s``.
    """
    from tqdm.auto import tqdm

    batches = windows(train, (size.steps, size.batch), size.context + 1, seed)
    params = init_gpt(jax.random.key(seed), cfg)
    opt_state = set_lr(tx.init(params), lr)
    paths = factored_paths(opt_state)
    shapes = {
        jax.tree_util.keystr(k): list(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
        if jax.tree_util.keystr(k) in paths
    }

    log_steps, losses = [], []
    # frac[r][matrix] = list over logged steps; own[matrix] = optimizer's own captured fraction
    frac = {r: {p: [] for p in paths} for r in ranks}
    own = {p: [] for p in paths}
    stable_rank = {p: [] for p in paths}
    t0 = time.perf_counter()
    for t in tqdm(range(1, size.steps + 1), desc=f"spectrum seed {seed}", mininterval=5):
        params, opt_state, loss = step_fn(params, opt_state, batches[t - 1])
        losses.append(float(loss))
        if t == 1 or t % log_every == 0 or t == size.steps:
            log_steps.append(t)
            for p, (sv, low_sq, tot_sq) in zip(paths, spectra(opt_state), strict=True):
                e = np.asarray(sv, np.float64) ** 2
                cum = np.cumsum(e) / max(e.sum(), 1e-300)
                for r in ranks:
                    frac[r][p].append(float(cum[min(r, cum.size) - 1]))
                own[p].append(float(low_sq) / max(float(tot_sq), 1e-300))
                stable_rank[p].append(float(e.sum() / max(e[0], 1e-300)))
    wall = time.perf_counter() - t0

    summary = {}
    for r in ranks:
        final = [frac[r][p][-1] for p in paths]
        over_time_median = [
            float(np.median([frac[r][p][i] for p in paths])) for i in range(len(log_steps))
        ]
        allv = [x for p in paths for x in frac[r][p]]
        eff = sorted({min(r, *shapes[p]) for p in paths})
        nontrivial = [x for p in paths if r < min(shapes[p]) for x in frac[r][p]]
        summary[str(r)] = {
            "effective_ranks": eff,
            "all_steps_matrices_with_r_below_min_dim": _stats(nontrivial) if nontrivial else None,
            "final_step_over_matrices": _stats(final),
            "all_steps_and_matrices": _stats(allv),
            "median_over_matrices_per_step": over_time_median,
            "fraction_of_matrix_steps_above_claim": float(np.mean(np.asarray(allv) > CLAIM)),
        }
    claim = None
    if "32" in summary:
        s = summary["32"]
        claim = {
            "claim": ">82 % of momentum energy captured at r = 32",
            "median_final": s["final_step_over_matrices"]["median"],
            "min_final": s["final_step_over_matrices"]["min"],
            "median_all": s["all_steps_and_matrices"]["median"],
            "min_all": s["all_steps_and_matrices"]["min"],
            "holds_for_median_matrix": bool(s["all_steps_and_matrices"]["median"] > CLAIM),
            "holds_for_every_matrix_and_step": bool(s["all_steps_and_matrices"]["min"] > CLAIM),
        }
    return {
        "seed": seed,
        "matrices": shapes,
        "log_steps": log_steps,
        "train_loss_first_last": [losses[0], losses[-1]],
        "summary": summary,
        "claim_check": claim,
        "own_factors_captured": {"rank": rank, **_stats([x for p in paths for x in own[p]])},
        "per_matrix": {
            p: {
                "fraction": {str(r): frac[r][p] for r in ranks},
                "own_factors_captured": own[p],
                "stable_rank": stable_rank[p],
            }
            for p in paths
        },
        "wall_s": wall,
    }
