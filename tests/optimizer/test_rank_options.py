"""The adaptive-rank options: ``min_rank`` / ``max_rank`` given without
``adaptive_rank=True`` are refused at construction (they would be silently ignored), and
with it ``min_rank ≤ rank ≤ max_rank`` is required."""

from __future__ import annotations

import pytest

import umtam_jax


@pytest.mark.parametrize("factory", [umtam_jax.umtam, umtam_jax.scale_by_umtam])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rank": 8, "max_rank": 4}, "max_rank=4"),
        ({"rank": 8, "max_rank": 32}, "max_rank=32"),
        ({"rank": 8, "min_rank": 2}, "min_rank=2"),
    ],
)
def test_rank_bounds_without_adaptive_rank_are_refused(factory, kwargs, name):
    args = (1e-3,) if factory is umtam_jax.umtam else ()
    with pytest.raises(
        ValueError,
        match=f"{name} given without adaptive_rank=True: min_rank/max_rank take effect "
        "only with adaptive_rank=True",
    ):
        factory(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 8},
        {"rank": 8, "min_rank": 1},  # the defaults, given explicitly
        {"rank": 8, "max_rank": 16},
        {"rank": 8, "adaptive_rank": True, "min_rank": 2, "max_rank": 12},
    ],
)
def test_defaults_and_adaptive_rank_bounds_are_accepted(kwargs):
    umtam_jax.umtam(1e-3, **kwargs)


def test_adaptive_max_rank_below_rank_is_refused():
    with pytest.raises(ValueError, match="adaptive rank needs 1 ≤ min_rank ≤ rank ≤ max_rank"):
        umtam_jax.umtam(1e-3, rank=8, adaptive_rank=True, max_rank=4)
