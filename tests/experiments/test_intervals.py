"""Paired hierarchical bootstrap: estimates, interval widths against the normal theory,
pairing, seed resampling, normalization, verdicts and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from umtam_jax.experiments.intervals import Interval, paired_difference, score_interval


def accuracy(y, p):
    return float(np.mean(y == p))


def _labels(n, seeds=1, tasks=("a",), seed=0):
    rng = np.random.default_rng(seed)
    return [{t: rng.integers(0, 3, n) for t in tasks} for _ in range(seeds)]


def _noisy(labels, error_rate, seed):
    rng = np.random.default_rng(seed)
    out = []
    for per_task in labels:
        run = {}
        for t, y in per_task.items():
            wrong = rng.random(len(y)) < error_rate
            run[t] = np.where(wrong, (y + 1) % 3, y)
        out.append(run)
    return out


def test_estimate_is_the_mean_of_task_scores_over_seeds_and_tasks():
    labels = _labels(50, seeds=2, tasks=("a", "b"))
    preds = _noisy(labels, 0.3, 1)
    want = np.mean([accuracy(labels[s][t], preds[s][t]) for s in range(2) for t in "ab"])
    got = score_interval(accuracy, labels, preds, samples=50)
    assert got.estimate == pytest.approx(want, abs=1e-12)
    assert got.low <= got.estimate <= got.high


def test_one_seed_interval_matches_the_normal_approximation():
    labels = _labels(2000)
    preds = _noisy(labels, 0.3, 1)
    got = score_interval(accuracy, labels, preds, samples=4000)
    p = got.estimate
    half = 1.959964 * np.sqrt(p * (1 - p) / 2000)
    assert (got.high - got.low) / 2 == pytest.approx(half, rel=0.1)


def test_paired_difference_width_follows_the_per_example_differences():
    labels = _labels(2000)
    a, b = _noisy(labels, 0.2, 1), _noisy(labels, 0.25, 2)
    got = paired_difference(accuracy, labels, a, b, samples=4000)
    d = (a[0]["a"] == labels[0]["a"]).astype(float) - (b[0]["a"] == labels[0]["a"])
    assert got.estimate == pytest.approx(d.mean(), abs=1e-12)
    half = 1.959964 * d.std() / np.sqrt(len(d))
    assert (got.high - got.low) / 2 == pytest.approx(half, rel=0.1)


def test_pairing_cancels_shared_noise():
    # B is A with 10 extra mistakes: every replicate sees A ahead, so the paired interval is
    # narrow and above 0, far narrower than either method's own interval.
    labels = _labels(1000)
    a = _noisy(labels, 0.4, 1)
    b = [{"a": a[0]["a"].copy()}]
    right = np.flatnonzero(a[0]["a"] == labels[0]["a"])[:10]
    b[0]["a"][right] = (labels[0]["a"][right] + 1) % 3
    diff = paired_difference(accuracy, labels, a, b, samples=2000)
    own = score_interval(accuracy, labels, a, samples=2000)
    assert diff.estimate == pytest.approx(0.01)
    assert diff.verdict() == "better" and diff.high - diff.low < 0.3 * (own.high - own.low)
    assert paired_difference(accuracy, labels, b, a, samples=2000).verdict() == "worse"


def test_identical_methods_are_tied_with_a_zero_interval():
    labels = _labels(100, seeds=3)
    a = _noisy(labels, 0.3, 1)
    got = paired_difference(accuracy, labels, a, a, samples=200)
    assert (got.estimate, got.low, got.high, got.verdict()) == (0.0, 0.0, 0.0, "tied")


def test_seeds_are_resampled_so_seed_to_seed_spread_widens_the_interval():
    # Seed 0 is far better than seed 1 for A only: the examples alone would give a narrow
    # interval; resampling seeds must cover both seeds' differences.
    labels = _labels(2000, seeds=2)
    a = [_noisy(labels[:1], 0.1, 1)[0], _noisy(labels[1:], 0.5, 2)[0]]
    b = _noisy(labels, 0.3, 3)
    got = paired_difference(accuracy, labels, a, b, samples=2000)
    per_seed = [
        accuracy(labels[s]["a"], a[s]["a"]) - accuracy(labels[s]["a"], b[s]["a"]) for s in range(2)
    ]
    assert got.low < min(per_seed) + 0.02 and got.high > max(per_seed) - 0.02
    assert got.verdict() == "tied"


def test_normalizers_divide_each_seed_and_task():
    labels = _labels(40, seeds=2, tasks=("a", "b"))
    preds = _noisy(labels, 0.3, 1)
    norms = [{"a": 0.5, "b": 0.8}, {"a": 0.9, "b": 0.6}]
    want = np.mean(
        [accuracy(labels[s][t], preds[s][t]) / norms[s][t] for s in range(2) for t in "ab"]
    )
    got = score_interval(accuracy, labels, preds, normalizers=norms, samples=20)
    assert got.estimate == pytest.approx(want, abs=1e-12)


def test_verdicts_and_dict():
    assert Interval(0.1, 0.01, 0.2).verdict() == "better"
    assert Interval(-0.1, -0.2, -0.01).verdict() == "worse"
    assert Interval(0.0, -0.1, 0.1).as_dict()["verdict"] == "tied"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda L, P, N: (L, [P[0]], N), "predictions 0 has 1 seeds, labels 2"),
        (lambda L, P, N: (L, [{"a": P[0]["a"]}, P[1]], N), r"predictions 0, seed 0: no task 'b'"),
        (lambda L, P, N: (L, [{**P[0], "a": P[0]["a"][:3]}, P[1]], N), r"task 'a': shape \(3,\)"),
        (lambda L, P, N: (L, P, [N[0], {"a": 0.0, "b": 1.0}]), r"normalizers\[1\]\['a'\]"),
        (lambda L, P, N: ([L[0], {"a": L[1]["a"]}], P, N), r"labels\[1\] has tasks \['a'\]"),
        (lambda L, P, N: ([], P, N), "no seeds"),
    ],
)
def test_bad_inputs_are_named(change, message):
    labels = _labels(10, seeds=2, tasks=("a", "b"))
    preds = _noisy(labels, 0.3, 1)
    norms = [{"a": 1.0, "b": 1.0}] * 2
    labels, preds, norms = change(labels, preds, norms)
    with pytest.raises(ValueError, match=message):
        score_interval(accuracy, labels, preds, normalizers=norms, samples=5)
