"""TSV-Merge, Iso-C and Iso-CTS by their defining properties: task arithmetic for one task,
the sum for disjoint subspaces, a flat spectrum, transposition, degenerate and
rank-deficient inputs, no direction outside the tasks' span, and float32 precision (full
precision products, small singular values kept)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging.subspace_helpers import REFS, _assert_close, _random
from umtam_jax import merging


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------------ properties


def test_tsv_one_full_rank_expert_is_task_arithmetic(x64):
    base, experts = _random(np.random.default_rng(0), 1)
    got = merging.tsv_merge(base, experts, scaling=0.6)
    want = merging.task_arithmetic(base, experts, scaling=0.6)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-10, 1e-12)


def _orthogonal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def test_tsv_merges_tasks_with_disjoint_singular_subspaces_as_their_sum():
    rng = np.random.default_rng(1)
    u, v = _orthogonal(rng, 8), _orthogonal(rng, 6)
    tasks = [  # rank 2 each (below k = 3: the third triplet is zero and dropped)
        u[:, 2 * t : 2 * t + 2] @ np.diag(rng.uniform(0.5, 2, 2)) @ v[:, 2 * t : 2 * t + 2].T
        for t in range(2)
    ]
    base = {"w": rng.standard_normal((8, 6)).astype(np.float32)}
    experts = [{"w": (base["w"] + d).astype(np.float32)} for d in tasks]
    got = merging.tsv_merge(base, experts)["w"]
    want = merging.task_arithmetic(base, experts)["w"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_every_matrix():
    base, experts = _random(np.random.default_rng(2), 2, np.float32)
    got = merging.iso_c(base, experts)
    for n in ("kernel", "wide", "stack"):
        delta = np.asarray(got[n], np.float64) - base[n]
        total = sum(e[n].astype(np.float64) - base[n] for e in experts)
        s = np.linalg.svd(delta.reshape(-1, *delta.shape[-2:]), compute_uv=False)
        mean = np.linalg.svd(total.reshape(s.shape[0], *delta.shape[-2:]), compute_uv=False)
        np.testing.assert_allclose(s, np.broadcast_to(mean.mean(-1)[:, None], s.shape), 1e-4)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, experts = _random(np.random.default_rng(4), 2, np.float32)
    got = merging.iso_cts(base, experts, common_space_fraction=1.0)
    want = merging.iso_c(base, experts)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-5, 1e-6)


@pytest.mark.parametrize("name", list(REFS))
def test_transposition(x64, name):
    base, experts = _random(np.random.default_rng(5), 3)
    tr = lambda t: {n: np.swapaxes(x, -1, -2) if x.ndim >= 2 else x for n, x in t.items()}  # noqa: E731
    kwargs = {"common_space_fraction": 0.4} if name == "iso_cts" else {}
    want = tr(getattr(merging, name)(base, experts, **kwargs))
    if name == "iso_cts":  # not invariant: the transposed layers need their layout
        other = merging.iso_cts(tr(base), [tr(e) for e in experts], **kwargs)
        assert not np.allclose(other["kernel"], want["kernel"], atol=1e-6)
        kwargs["layout"] = "out_in"
    got = getattr(merging, name)(tr(base), [tr(e) for e in experts], **kwargs)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-10, 1e-12)


@pytest.mark.parametrize("name", list(REFS))
def test_inputs_not_mutated_and_degenerate_inputs(name):
    base, experts = _random(np.random.default_rng(6), 2, np.float32)
    copies = jax.tree.map(np.copy, (base, experts))
    fn = getattr(merging, name)
    fn(base, experts)
    jax.tree.map(np.testing.assert_array_equal, (base, experts), copies)
    # Zero task vectors: the base; empty leaves pass through.
    same = fn(base, [base, base])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), same, base)
    empty = {"e": np.zeros((0, 3), np.float32), "f": np.zeros((2, 3, 0), np.float32)}
    assert jax.tree.map(np.shape, fn(empty, [empty])) == jax.tree.map(np.shape, empty)


def test_rank_deficient_inputs_are_deterministic():
    rng = np.random.default_rng(8)
    low = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))  # rank 2 of 5
    base = {"w": np.zeros((6, 5), np.float32)}
    twins = [{"w": low.astype(np.float32)}] * 2
    # Identical tasks (k = 2 each): whitening merges the shared directions once.
    np.testing.assert_allclose(merging.tsv_merge(base, twins)["w"], low, atol=1e-5)
    # Iso-C keeps the sum's two directions, each with the mean of all five σ.
    s = np.linalg.svd(2 * low, compute_uv=False)
    got = np.linalg.svd(np.asarray(merging.iso_c(base, twins)["w"]), compute_uv=False)
    np.testing.assert_allclose(got, [s.mean()] * 2 + [0] * 3, atol=1e-5)


def test_iso_cts_keeps_no_direction_outside_the_tasks_span():
    """Three rank-2 task vectors: the merge spans their six directions and no more. Each
    task's residual after the common subspace is rounding noise of the common basis; with
    a cutoff at the residual's own scale those noise directions were kept at weight σ̄."""
    rng = np.random.default_rng(12)
    n = 48
    tasks = [rng.standard_normal((n, 2)) @ rng.standard_normal((2, n)) * 0.01 for _ in range(3)]
    base = {"w": np.zeros((n, n), np.float32)}
    merged = merging.iso_cts(base, [{"w": t.astype(np.float32)} for t in tasks])["w"]
    s = np.linalg.svd(np.asarray(merged, np.float64), compute_uv=False)
    assert int(np.sum(s > 1e-3 * s[0])) == 6, s[:8]


@pytest.mark.parametrize("name", ["tsv_merge", "iso_c", "iso_cts"])
def test_products_of_svd_factors_run_at_full_float32_precision(name):
    """GPU/TPU default float32 matmuls run as TF32/bf16 passes (~1e-3 relative error), far
    above the cutoffs that tell a direction from rounding noise."""
    base = {"w": jnp.zeros((8, 6))}
    experts = [{"w": jnp.ones((8, 6))}, {"w": -jnp.ones((8, 6))}]
    fn = getattr(merging, name)
    text = jax.jit(lambda b, e: fn(b, e)).lower(base, experts).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("HIGHEST" in line for line in dots)


def test_small_but_resolved_singular_values_are_kept():
    """σ = 3e-5 beside sixty σ = 1 in a 64 × 64 float32 task vector is four times the
    SVD's resolution (64 · ε · σ₁ = 7.6e-6): kept. A cutoff scaled by ‖Δ‖_F (5.9e-5,
    √60 times larger) dropped those four directions of a full-rank input."""
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s = np.array([1.0] * 60 + [3e-5] * 4)
    delta = (u * s) @ v.T
    base, expert = {"w": np.zeros((64, 64), np.float32)}, {"w": delta.astype(np.float32)}
    np.testing.assert_allclose(merging.tsv_merge(base, [expert])["w"], delta, atol=2e-6)
    # Iso-C of one task: every direction with the mean σ (of the float32 input). The small
    # directions' vectors are resolved to ~ε/3e-5 = 4e-3; dropping them moves entries by
    # up to ~0.05.
    u, s, vt = np.linalg.svd(expert["w"].astype(np.float64))
    want = s.mean() * u @ vt
    got = np.asarray(merging.iso_c(base, [expert])["w"])
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(got - want).max() * 20 < np.abs(want - s[:60].mean() * u[:, :60] @ vt[:60]).max()


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_task_vectors_beyond_float32_squares_merge_as_scaled_ones(name):
    """The rounding scale Σ‖Δ‖_F overflowed for entries beyond ~1e19 (their squares pass
    float32's range), every singular value then counted as zero and the merge returned the
    base; the merge of scaled task vectors is the scaled merge."""
    base = {"w": jnp.zeros((2, 2))}
    small = [{"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}]
    big = [jax.tree.map(lambda x: x * 1e20, e) for e in small]
    want = np.asarray(getattr(merging, name)(base, small)["w"], np.float64) * 1e20
    np.testing.assert_allclose(getattr(merging, name)(base, big)["w"], want, rtol=1e-5)
