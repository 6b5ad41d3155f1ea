"""Merge-comparison intervals: Student-t over seeds against a float64 reference and its
coverage, the one-seed paired bootstrap against the normal theory, pairing,
normalization, verdicts and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from umtam_jax.experiments.intervals import (
    Interval,
    paired_difference,
    score_interval,
    student_t,
)

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student-t quantiles, 2 and 3 df


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


def test_several_seeds_give_a_student_t_interval_over_the_per_seed_differences():
    labels = _labels(300, seeds=3, tasks=("a", "b"))
    a, b = _noisy(labels, 0.2, 1), _noisy(labels, 0.3, 2)
    norms = [{"a": 0.9, "b": 0.7}, {"a": 0.8, "b": 0.6}, {"a": 0.95, "b": 0.75}]
    per_seed = np.array(
        [
            np.mean([(accuracy(y[t], pa[t]) - accuracy(y[t], pb[t])) / n[t] for t in "ab"])
            for y, pa, pb, n in zip(labels, a, b, norms, strict=True)
        ],
        dtype=np.float64,
    )
    half = T_975[2] * per_seed.std(ddof=1) / np.sqrt(3)
    got = paired_difference(accuracy, labels, a, b, normalizers=norms)
    np.testing.assert_allclose(got.per_seed, per_seed, rtol=1e-9)
    np.testing.assert_allclose(
        [got.estimate, got.low, got.high],
        [per_seed.mean(), per_seed.mean() - half, per_seed.mean() + half],
        rtol=1e-9,
    )
    own = score_interval(accuracy, labels, a, normalizers=norms)
    assert len(own.per_seed) == 3 and own.low < own.estimate < own.high


def test_seed_to_seed_spread_widens_the_interval_past_the_test_examples_noise():
    # Seed 0 is far better than seed 1 for A only: the examples alone would give a narrow
    # interval; the seeds' interval covers both seeds' differences.
    labels = _labels(2000, seeds=2)
    a = [_noisy(labels[:1], 0.1, 1)[0], _noisy(labels[1:], 0.5, 2)[0]]
    b = _noisy(labels, 0.3, 3)
    got = paired_difference(accuracy, labels, a, b)
    per_seed = [
        accuracy(labels[s]["a"], a[s]["a"]) - accuracy(labels[s]["a"], b[s]["a"]) for s in range(2)
    ]
    assert got.low < min(per_seed) and got.high > max(per_seed)
    assert got.verdict() == "tied"


def test_student_t_covers_the_mean_at_its_level_where_seed_resampling_does_not():
    rng = np.random.default_rng(0)
    draws = rng.normal(0.3, 1.0, size=(4000, 3))
    covered = [c.low < 0.3 < c.high for c in map(student_t, draws)]
    within_range = (draws.min(1) < 0.3) & (draws.max(1) > 0.3)
    assert abs(np.mean(covered) - 0.95) < 0.015
    assert abs(np.mean(within_range) - 0.75) < 0.03  # what resampled seeds could reach
    c = student_t([0.1, 0.4, 0.2, 0.7], level=0.95)
    x = np.array([0.1, 0.4, 0.2, 0.7])
    half = T_975[3] * x.std(ddof=1) / 2
    np.testing.assert_allclose([c.low, c.high], [x.mean() - half, x.mean() + half], rtol=1e-9)


@pytest.mark.parametrize(
    ("values", "message"), [([1.0], "at least two"), ([1.0, np.nan], "finite")]
)
def test_student_t_refuses_what_it_cannot_estimate(values, message):
    with pytest.raises(ValueError, match=message):
        student_t(values)


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
    assert Interval(0.1, 0.0, 0.2, 0.95, (0.1, 0.1)).as_dict()["per_seed"] == [0.1, 0.1]


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


def test_a_seed_without_a_finite_score_gives_an_undefined_interval_not_an_error():
    """An empty split scores NaN (task_metrics): that method's row is undefined, the
    table around it is still built."""
    labels = _labels(20, seeds=2)
    preds = _noisy(labels, 0.3, 1)
    calls = []

    def second_seed_undefined(y, p):
        calls.append(None)
        return float("nan") if len(calls) == 2 else accuracy(y, p)

    got = score_interval(second_seed_undefined, labels, preds)
    assert np.isnan(got.low) and np.isnan(got.high) and got.verdict() == "undefined"
    assert np.isfinite(got.per_seed[0]) and np.isnan(got.per_seed[1])
