"""Design study: can the per-step decomposition cost two m×n×r products instead of three?

The default subspace method spends three products per step on a factored leaf: the sketch
``M̃ V``, the projection ``Qᵀ M̃`` and the expansion ``U Σ Vᵀ`` (the update must be
written out). An *alternating* one-sided scheme would drop the projection: on odd steps
``A = (M̃ V) Vᵀ`` (new left basis from ``M̃ V``), on even steps ``A = U (Uᵀ M̃)`` (new right
basis), i.e. half a subspace iteration per step. This float64 NumPy simulation runs both
against the exact truncated SVD on the gradient trajectories of
``tests/optimizer/test_behaviour.py`` (rank 16, b1 = 0.9, with and without the error
buffer) and prints the accuracy criteria of the subspace method (docs/algorithm.md §2.5):
captured energy within 1 % and momentum (hence update) relative error ≤ 1e-2.

    python benchmarks/design_alternating.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _test_trajectory():
    """``_trajectory`` of ``tests/optimizer/test_behaviour.py``: the very gradients the
    accuracy tests use (a decaying low-rank signal with fluctuating weights, plus noise)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "optimizer" / "test_behaviour.py"
    spec = importlib.util.spec_from_file_location("_umtam_test_behaviour", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._trajectory


def momenta(grads, method, rank=16, b1=0.9, error_decay=0.0):
    """Rank-``rank`` momentum approximations (docs/algorithm.md §2.2, steps 1–4) under
    ``method``."""
    m, n = grads[0].shape
    u = np.linalg.qr(np.random.default_rng(1).normal(size=(m, rank)))[0]
    v = np.linalg.qr(np.random.default_rng(2).normal(size=(n, rank)))[0]
    approx, error, out = np.zeros((m, n)), np.zeros((m, n)), []
    for t, g in enumerate(grads):
        g = g * min(1.0, 1.0 / np.linalg.norm(g))
        m_tilde = b1 * approx + (1 - b1) * g + error_decay * error
        if method == "exact" or t == 0:
            left, s, right_t = np.linalg.svd(m_tilde, full_matrices=False)
            u, v = left[:, :rank], right_t[:rank].T
            approx = (u * s[:rank]) @ v.T
        elif method == "subspace":  # the library's default: three products per step
            q = np.linalg.qr(m_tilde @ v)[0]
            b = q.T @ m_tilde
            ub, _, right_t = np.linalg.svd(b, full_matrices=False)
            approx, u, v = q @ b, q @ ub, right_t.T
        elif t % 2:  # alternating, odd step: keep V's span, refresh U
            y = m_tilde @ v
            approx, u = y @ v.T, np.linalg.qr(y)[0]
        else:  # alternating, even step: keep U's span, refresh V
            z = u.T @ m_tilde
            approx, v = u @ z, np.linalg.qr(z.T)[0]
        error = m_tilde - approx
        out.append(approx)
    return out


def main() -> None:
    print("| trajectory | error_decay | method | captured energy (min–max) | error median | max |")
    print("|---|---|---|---|---|---|")
    trajectory = _test_trajectory()
    for signal_rank, steps in ((16, 60), (64, 40)):
        grads = list(trajectory(signal_rank=signal_rank, steps=steps))
        for error_decay in (0.0, 0.9):
            exact = momenta(grads, "exact", error_decay=error_decay)
            for method in ("subspace", "alternating"):
                approx = momenta(grads, method, error_decay=error_decay)
                pairs = list(zip(approx, exact, strict=True))[10:]  # after a warm-up
                energy = [np.linalg.norm(a) ** 2 / np.linalg.norm(e) ** 2 for a, e in pairs]
                err = [np.linalg.norm(a - e) / np.linalg.norm(e) for a, e in pairs]
                print(
                    f"| signal rank {signal_rank} | {error_decay} | {method} | "
                    f"{min(energy):.4f}–{max(energy):.4f} | {np.median(err):.1e} | "
                    f"{max(err):.1e} |"
                )


if __name__ == "__main__":
    main()
