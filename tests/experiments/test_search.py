"""Validation search: equal budgets, grids extended past edges, refinement, bounds."""

from __future__ import annotations

import math

import pytest

from umtam_jax.experiments.search import Axis, grid_search


def _counting(fn):
    calls = []

    def evaluate(hp):
        calls.append(dict(hp))
        return fn(hp)

    return evaluate, calls


def test_initial_grid_first_in_order_then_extension_past_the_edge():
    evaluate, calls = _counting(lambda hp: -abs(hp["density"] - 0.8))
    result = grid_search(evaluate, [Axis("density", (0.2, 0.4), low=0.05, high=1.0)], budget=5)
    assert [c["density"] for c in calls][:2] == [0.2, 0.4]
    assert [c["density"] for c in calls][2:4] == pytest.approx([0.6, 0.8])  # linear steps of 0.2
    assert result.best["density"] == pytest.approx(0.8) and result.open_edges == []
    assert len(result.trials) == 5  # the leftover evaluation refines


def test_budget_is_spent_exactly_and_never_exceeded():
    for budget in (4, 7, 12):
        evaluate, calls = _counting(lambda hp: -((hp["scaling"] - 1.3) ** 2) - hp["density"])
        axes = [
            Axis("scaling", (0.5, 1.0), low=0.0, log=True),
            Axis("density", (0.2, 0.4), low=0.01, high=1.0),
        ]
        result = grid_search(evaluate, axes, budget=budget)
        assert len(calls) == len(result.trials) == budget
        assert len({tuple(sorted(c.items())) for c in calls}) == budget  # no repeats


def test_edge_choice_without_budget_is_reported_open():
    result = grid_search(
        lambda hp: hp["scaling"], [Axis("scaling", (1.0, 2.0), log=True)], budget=3
    )
    assert result.best["scaling"] == 4.0 and result.open_edges == ["scaling"]


def test_bounds_stop_extension_and_the_bound_itself_is_tried():
    evaluate, calls = _counting(lambda hp: hp["density"])
    result = grid_search(evaluate, [Axis("density", (0.5, 0.8), low=0.0, high=1.0)], budget=10)
    assert result.best["density"] == 1.0 and result.open_edges == []
    assert max(c["density"] for c in calls) == 1.0


def test_refinement_finds_an_interior_optimum():
    f = lambda hp: -((math.log(hp["scaling"]) - math.log(1.7)) ** 2)  # noqa: E731
    result = grid_search(f, [Axis("scaling", (0.5, 1.0, 2.0, 4.0), low=0.0, log=True)], budget=12)
    assert abs(math.log(result.best["scaling"] / 1.7)) < 0.1
    assert result.open_edges == []


def test_integer_axes_and_fixed_keywords():
    evaluate, calls = _counting(lambda hp: -abs(hp["k"] - 4))
    result = grid_search(
        evaluate, [Axis("k", (1, 2), low=1, integer=True)], budget=6, fixed={"scaling": 1.0}
    )
    assert result.best == {"scaling": 1.0, "k": 4.0}
    assert all(c["scaling"] == 1.0 and float(c["k"]).is_integer() for c in calls)


def test_no_axes_is_one_evaluation_and_nan_scores_never_win():
    assert grid_search(lambda hp: 0.5, [], budget=5).trials == [({}, 0.5)]
    result = grid_search(
        lambda hp: math.nan if hp["s"] == 2.0 else hp["s"], [Axis("s", (1.0, 2.0))], budget=2
    )
    assert result.best["s"] == 1.0


def test_ties_keep_the_earlier_point():
    result = grid_search(lambda hp: 1.0, [Axis("s", (1.0, 2.0, 3.0))], budget=3)
    assert result.best["s"] == 1.0


@pytest.mark.parametrize(
    ("axes", "budget", "message"),
    [
        ([Axis("s", (1.0, 2.0, 3.0))], 2, "initial grid has 3 points, more than budget=2"),
        ([Axis("s", (1.0,)), Axis("s", (2.0,))], 5, "duplicate axes"),
    ],
)
def test_bad_searches_are_refused(axes, budget, message):
    with pytest.raises(ValueError, match=message):
        grid_search(lambda hp: 0.0, axes, budget=budget)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": ()}, "has no values"),
        ({"values": (0.5, 2.0), "high": 1.0}, r"outside \[None, 1.0\]"),
        ({"values": (0.0, 1.0), "log": True}, "log axes need positive values"),
        ({"values": (math.inf,)}, "not finite"),
    ],
)
def test_bad_axes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Axis("s", **kwargs)
