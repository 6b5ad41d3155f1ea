"""An independent float64 NumPy implementation of docs/algorithm.md §2 (Algorithm 1), for the tests.

It shares no code with ``umtam_jax``: only the random initial factors U0, V0 are taken from
the optimizer's ``init`` (they are inputs, not results).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Hyper:
    rank: int = 3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    error_decay: float = 0.9
    clip_threshold: float | None = 1.0
    saliency_decay: float = 0.9
    svd_every: int = 1
    bias_correction: bool = False
    adaptive_rank: bool = False
    max_rank: int = 6
    min_rank: int = 1
    rank_step: int = 1
    rank_update_every: int = 3
    rank_grow_threshold: float = 1.5
    rank_shrink_threshold: float = 0.5


def _clip(g: np.ndarray, hp: Hyper) -> np.ndarray:
    norm = np.linalg.norm(g)
    if hp.clip_threshold is None or norm == 0:
        return g
    return g * min(1.0, hp.clip_threshold / norm)


def _eps_t(g: np.ndarray, w: np.ndarray, hp: Hyper) -> float:
    w_norm = np.linalg.norm(w)
    ratio = np.linalg.norm(g) / w_norm if w_norm > 0 else 1.0
    return hp.eps * max(1.0, ratio)


class FactoredReference:
    """docs/algorithm.md §2.2 on one (m, n) matrix."""

    def __init__(self, u0, v0, w0, hp: Hyper):
        self.hp = hp
        self.shape = w0.shape
        self.w0 = np.asarray(w0, np.float64).reshape(u0.shape[0], v0.shape[0])
        m, n = self.w0.shape
        r = u0.shape[1]
        self.u, self.v = np.asarray(u0, np.float64), np.asarray(v0, np.float64)
        self.active = min(hp.rank, r) if hp.adaptive_rank else r
        self.sigma = hp.eps * np.diag(np.arange(r) < self.active)  # 0 beyond the active rank
        self.error = np.zeros((m, n))
        self.row, self.col = np.full(m, hp.eps), np.full(n, hp.eps)
        self.saliency_matrix = np.zeros((m, n))
        self.t = 0

    def step(self, grad, param):
        hp = self.hp
        self.t += 1
        t = self.t
        g = _clip(np.asarray(grad, np.float64).reshape(self.w0.shape), hp)
        w = np.asarray(param, np.float64).reshape(self.w0.shape)
        r = self.u.shape[1]
        m_tilde = hp.b1 * self.u @ self.sigma @ self.v.T + (1 - hp.b1) * g
        m_tilde = m_tilde + hp.error_decay * self.error
        full_s = np.linalg.svd(m_tilde, compute_uv=False)
        keep = np.arange(r) < self.active
        if (t - 1) % hp.svd_every == 0:
            u, s, vt = np.linalg.svd(m_tilde, full_matrices=False)
            self.u, self.v = u[:, :r], vt[:r].T
            self.sigma = np.diag(s[:r] * keep)
        else:
            self.sigma = (self.u.T @ m_tilde @ self.v) * np.outer(keep, keep)
        momentum = self.u @ self.sigma @ self.v.T
        self.error = m_tilde - momentum if hp.error_decay > 0 else np.zeros_like(m_tilde)
        self.row = hp.b2 * self.row + (1 - hp.b2) * np.sum(g * g, axis=1)
        self.col = hp.b2 * self.col + (1 - hp.b2) * np.sum(g * g, axis=0)
        c1 = 1 - hp.b1**t if hp.bias_correction else 1.0
        c2 = 1 - hp.b2**t if hp.bias_correction else 1.0
        s_hat = np.outer(self.row, self.col) / self.row.sum()
        direction = (momentum / c1) / np.sqrt(s_hat / c2 + _eps_t(g, w, hp))
        deviation = (w - self.w0) ** 2
        self.saliency_matrix = hp.saliency_decay * self.saliency_matrix + (
            1 - hp.saliency_decay
        ) * (deviation * np.sqrt(np.outer(self.row, self.col)))
        if hp.adaptive_rank and t % hp.rank_update_every == 0:
            stable = np.sum(m_tilde**2) / full_s[0] ** 2
            a = self.active
            if stable > hp.rank_grow_threshold * a and stable > 0.9 * a:
                self.active = min(a + hp.rank_step, r)
            elif stable < hp.rank_shrink_threshold * a or stable < 0.5 * a:
                self.active = max(a - hp.rank_step, hp.min_rank)
        return direction.reshape(self.shape)

    @property
    def saliency(self):
        return self.saliency_matrix.reshape(self.shape)

    @property
    def momentum(self):
        return (self.u @ self.sigma @ self.v.T).reshape(self.shape)

    @property
    def curvature(self):
        return (np.outer(self.row, self.col) / self.row.sum()).reshape(self.shape)


class DenseReference:
    """docs/algorithm.md §2.4 on one leaf."""

    def __init__(self, w0, hp: Hyper):
        self.hp = hp
        self.w0 = np.asarray(w0, np.float64)
        self.mu = np.zeros_like(self.w0)
        self.nu = np.full_like(self.w0, hp.eps)
        self.saliency = np.zeros_like(self.w0)
        self.t = 0

    def step(self, grad, param):
        hp = self.hp
        self.t += 1
        g = _clip(np.asarray(grad, np.float64), hp)
        w = np.asarray(param, np.float64)
        self.mu = hp.b1 * self.mu + (1 - hp.b1) * g
        self.nu = hp.b2 * self.nu + (1 - hp.b2) * g * g
        c1 = 1 - hp.b1**self.t if hp.bias_correction else 1.0
        c2 = 1 - hp.b2**self.t if hp.bias_correction else 1.0
        direction = (self.mu / c1) / np.sqrt(self.nu / c2 + _eps_t(g, w, hp))
        self.saliency = hp.saliency_decay * self.saliency + (1 - hp.saliency_decay) * (
            (w - self.w0) ** 2 * np.sqrt(self.nu)
        )
        return direction

    @property
    def momentum(self):
        return self.mu

    @property
    def curvature(self):
        return self.nu
